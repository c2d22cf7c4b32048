"""Long-generation reasoning RL: Flywheel asynchronous vs Flywheel synchronous vs TRL's GRPOTrainer.

    .venv/bin/python tests/bench/reasoning.py [--config deploy/configs/reasoning_cpu.yaml] [--seeds 0 1]
        [--rl-s 600] [--systems async sync trl] [--trl-lrs ...] [--out tests/bench/results/reasoning.json]
        [overrides ...]

1. Builds the config's model and cold start once (`services.driver.prepare_model`, cached): every system
   and seed starts from that checkpoint, on the same task, held-out eval set, group size, prompts per step
   and max new tokens.
2. Per seed (`rollout.seed`/`replay.seed` for Flywheel, `--seed` for TRL; the task seed, so the eval set,
   stays fixed) runs, each for a fixed RL budget of `--rl-s` seconds:
   - `async`: `python -m services.driver` on the config as written (bounded staleness, rollout and learner
     on their own cores);
   - `sync`: the same with `replay.max_staleness=0` (generate, then learn, at one policy version);
   - `trl`: tests/bench/trl_baseline.py in the TRL venv (`$TRL_VENV`, built by tests/bench/trl_setup.sh)
     with `--fixed-budget`, 2 threads, the same prompts per generation, 16 groups per optimiser step (as our
     learner), the same render, verifier and eval cadence in learner steps; at our lr and each `--trl-lrs`,
     the one fastest to +20 points (3-eval mean) reported per seed, all recorded.
3. Per system and seed: RL seconds to +10 and +20 points of held-out greedy accuracy (first eval and mean
   of 3 consecutive evals; Flywheel's clock is when the evaluated weights were published, TRL's excludes its
   own eval time), accuracy at the end, generated and learner tokens/s, and where the time went
   (`flywheel_breakdown`, `trl_breakdown`).
4. Writes `--out` (default tests/bench/results/reasoning.json) with `speedup_vs_trl` (TRL / async) and
   `speedup_async_vs_sync` (sync / async): ratios of the seed-mean RL seconds to +20 points (3-eval mean),
   null with the reason when a system did not get there in every seed; plus per-seed values and their
   spread, and a figure (`.png` next to it) of accuracy against RL seconds for the three systems.
The box is shared unless the run says otherwise: the JSON records load averages; read ratios, not seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.bench.spine import _first_reach, run_ours, trl_python  # noqa: E402

GAINS = (10, 20)
SYSTEMS = ("async", "sync", "trl")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="deploy/configs/reasoning_cpu.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--rl-s", type=float, default=600.0, help="fixed RL budget per system and seed (seconds)")
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    ap.add_argument("--trl-lrs", type=float, nargs="*", default=[], help="TRL lrs to try besides ours")
    ap.add_argument("--out", default=str(REPO / "tests/bench/results/reasoning.json"))
    ap.add_argument("--runs-dir", default=str(REPO / "runs/bench-reasoning"))
    ap.add_argument("overrides", nargs="*", help="dotted config overrides for every system (e.g. task.eval_size=100)")
    return ap.parse_args(argv)


# -- what the logs say ----------------------------------------------------------------------------------------
def gains(curve: list[tuple[float, float]]) -> dict:
    """RL seconds to each gain in GAINS (points over the first eval): first eval and 3-eval mean."""
    return {
        f"+{g}": {"first": _first_reach(curve, g / 100), "mean3": _first_reach(curve, g / 100, window=3)} for g in GAINS
    }


def flywheel_curve(records: list[dict]) -> list[tuple[float, float]]:
    """(RL seconds when the evaluated weights were published, accuracy), in publish order."""
    return sorted((r["t_published"], r["accuracy"]) for r in records if r["kind"] == "eval")


def flywheel_breakdown(records: list[dict], rl_wall_s: float) -> dict:
    """Where a Flywheel run's RL seconds went, from metrics.jsonl records.

    Rollout workers' seconds split into generation (`generate_s`), reward scoring and replay insert
    (`total_s - generate_s`), receiving weights (`weights_received_s`), evaluation when an eval ran on a
    rollout worker, and idle (the rest of `rl_wall_s` per worker); the learner's into steps (`step_s`) and
    idle. `eval_s` is dispatch-to-result on whichever worker evaluated."""
    rollouts = [r for r in records if r["kind"] == "rollout"]
    steps = [r for r in records if r["kind"] == "learner_step"]
    evals = [r for r in records if r["kind"] == "eval" and "eval_s" in r]
    workers = {r["worker_id"] for r in rollouts} or {0}
    generation = sum(r["generate_s"] for r in rollouts)
    scoring = sum(r["total_s"] - r["generate_s"] for r in rollouts)
    sync = sum(r.get("weights_received_s", 0.0) for r in rollouts)
    eval_s = sum(r["eval_s"] for r in evals)
    eval_on_rollout = sum(r["eval_s"] for r in evals if r.get("worker") in workers)
    learner = sum(r["step_s"] for r in steps)
    generated = sum(r["tokens"] for r in rollouts)
    trained = sum(sum(r["rank_tokens"]) for r in steps)
    busy = generation + scoring + sync + eval_on_rollout
    return {
        "rl_wall_s": rl_wall_s,
        "rollout_workers": len(workers),
        "generation_s": generation,
        "reward_and_insert_s": scoring,
        "weight_sync_s": sync,
        "eval_s": eval_s,
        "learner_s": learner,
        "rollout_idle_s": max(0.0, rl_wall_s * len(workers) - busy),
        "learner_idle_s": max(0.0, rl_wall_s - learner),
        "generated_tokens": generated,
        "learner_tokens": trained,
        "generated_tokens_per_s": generated / rl_wall_s if rl_wall_s > 0 else None,
        "learner_tokens_per_s": trained / rl_wall_s if rl_wall_s > 0 else None,
    }


def trl_breakdown(trl: dict) -> dict:
    """Where TRL's RL seconds went: one process that generates, scores, then trains, in turn.

    Its eval is off its RL clock (recorded apart); there is no weight sync (one model) and idle is the
    clock outside optimiser steps (callbacks, data loading)."""
    wall, step = trl["rl_seconds_total"], trl["step_seconds_total"]
    generation, rollout = trl["generation_seconds_total"], trl["rollout_seconds_total"]
    tokens = trl["generated_tokens"]
    return {
        "rl_wall_s": wall,
        "generation_s": generation,
        "reward_and_insert_s": rollout - generation,
        "weight_sync_s": 0.0,
        "eval_s": trl["eval_seconds_total"],
        "learner_s": step - rollout,
        "idle_s": max(0.0, wall - step),
        "generated_tokens": tokens,
        "learner_tokens": tokens,  # each completion is trained on once
        "generated_tokens_per_s": tokens / wall if wall > 0 else None,
        "learner_tokens_per_s": tokens / wall if wall > 0 else None,
    }


def seed_result(curve: list[tuple[float, float]], breakdown: dict, extra: dict) -> dict:
    return {
        "initial_accuracy": curve[0][1] if curve else None,
        "final_accuracy": curve[-1][1] if curve else None,
        "best_accuracy": max((a for _, a in curve), default=None),
        "seconds_to_gain": gains(curve),
        "breakdown": breakdown,
        "curve": [[round(t, 3), a] for t, a in curve],
        **extra,
    }


def spread(values: list[float | None]) -> dict:
    """Mean, min and max over seeds; mean is None unless every seed has a value (a miss is not averaged away)."""
    got = [v for v in values if v is not None]
    return {
        "per_seed": values,
        "mean": sum(got) / len(got) if got and len(got) == len(values) else None,
        "min": min(got, default=None),
        "max": max(got, default=None),
    }


def summarize(per_seed: list[dict]) -> dict:
    """A system's per-seed results folded into spreads of the headline numbers."""
    out = {
        f"seconds_to_{g}_{kind}": spread([s["seconds_to_gain"][g][kind] for s in per_seed])
        for g in ("+10", "+20")
        for kind in ("first", "mean3")
    }
    out["final_accuracy"] = spread([s["final_accuracy"] for s in per_seed])
    out["initial_accuracy"] = spread([s["initial_accuracy"] for s in per_seed])
    for key in ("generated_tokens_per_s", "learner_tokens_per_s"):
        out[key] = spread([s["breakdown"][key] for s in per_seed])
    parts = [k for k in per_seed[0]["breakdown"] if k.endswith("_s") and not k.endswith("_per_s") and k != "rl_wall_s"]
    total = sum(s["breakdown"]["rl_wall_s"] for s in per_seed)
    out["time_share"] = {k: sum(s["breakdown"][k] for s in per_seed) / total if total else None for k in parts}
    return out


def speedup(systems: dict, slow: str, fast: str) -> dict:
    """slow/fast seed-mean RL seconds to +20 points (3-eval mean), or null with the reason."""
    if slow not in systems or fast not in systems:
        return {"value": None, "reason": f"{slow} or {fast} was not run"}
    a, b = (systems[n]["summary"]["seconds_to_+20_mean3"] for n in (slow, fast))
    missing = [n for n, s in ((slow, a), (fast, b)) if s["mean"] is None]
    if missing:
        return {"value": None, "reason": f"{' and '.join(missing)} did not reach +20 points in every seed"}
    return {"value": a["mean"] / b["mean"], "reason": None}


# -- running the systems --------------------------------------------------------------------------------------
def run_flywheel(args: argparse.Namespace, system: str, seed: int) -> dict:
    name = f"reasoning-{system}-s{seed}"
    overrides = [*args.overrides, f"run.max_wall_s={args.rl_s}", f"rollout.seed={seed}", f"replay.seed={seed}"]
    if system == "sync":
        overrides.append("replay.max_staleness=0")
    print(f"[reasoning] {system} seed {seed}: driver, {args.rl_s:g} s of RL", flush=True)
    summary = run_ours(REPO / args.config, name, Path(args.runs_dir), tuple(overrides))
    records = [json.loads(line) for line in (Path(args.runs_dir) / name / "metrics.jsonl").read_text().splitlines()]
    extra = {"learner_steps": summary["learner_steps"], "max_staleness_seen": summary["max_staleness_seen"]}
    extra["process_wall_s"] = summary["process_wall_s"]
    return seed_result(flywheel_curve(records), flywheel_breakdown(records, summary["rl_wall_s"]), extra)


def trl_command(cfg, model_dir: Path, out: Path, rl_s: float, lr: float, seed: int) -> list[str]:
    rc, groups_per_step = cfg.rollout, cfg.learner.groups_per_step
    args = {
        "--model-dir": model_dir,
        "--out": out,
        "--task-json": cfg.task.model_dump_json(),
        "--render-json": cfg.render.model_dump_json(),
        "--group-size": rc.group_size,
        "--prompts-per-step": rc.prompts_per_step,  # one generation batch = our rollout call
        "--updates-per-batch": max(1, rc.prompts_per_step // groups_per_step),  # 16 groups per optimiser step
        "--lr": lr,
        "--max-new-tokens": rc.max_new_tokens,
        "--temperature": rc.temperature,
        "--beta": 0.0,  # TRL's beta is a KL to a reference copy; ours is to the behaviour policy (see spine.py)
        "--eval-every-steps": cfg.run.eval_every_steps,
        "--max-rl-seconds": rl_s,
        "--threads": 2,
        "--seed": seed,
    }
    return [str(trl_python()), str(REPO / "tests/bench/trl_baseline.py"), "--fixed-budget"] + [
        str(x) for kv in args.items() for x in kv
    ]


def run_trl(args: argparse.Namespace, cfg, model_dir: Path, seed: int) -> dict:
    subprocess.run(["bash", str(REPO / "tests/bench/trl_setup.sh")], check=True, cwd=REPO)
    runs: dict[str, dict] = {}
    for lr in dict.fromkeys([cfg.learner.lr, *args.trl_lrs]):
        out = Path(args.runs_dir) / f"trl-s{seed}-lr{lr:g}.json"
        print(f"[reasoning] trl seed {seed} lr {lr:g}: {args.rl_s:g} s of RL", flush=True)
        t0 = time.perf_counter()
        subprocess.run(trl_command(cfg, model_dir, out, args.rl_s, lr, seed), check=True, cwd=REPO)
        trl = json.loads(out.read_text())
        curve = [(c["rl_seconds"], c["accuracy"]) for c in trl["accuracy_curve"]]
        extra = {"lr": lr, "learner_steps": trl["steps"], "process_wall_s": time.perf_counter() - t0}
        runs[f"{lr:g}"] = seed_result(curve, trl_breakdown(trl), extra)
    best = min(runs.values(), key=lambda r: r["seconds_to_gain"]["+20"]["mean3"] or float("inf"))
    return {**best, "lr_runs": {lr: r["seconds_to_gain"]["+20"] for lr, r in runs.items()}}


def figure(systems: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (name, sys_), color in zip(systems.items(), ("tab:blue", "tab:orange", "tab:green")):
        for i, run in enumerate(sys_["per_seed"]):
            t, acc = zip(*run["curve"]) if run["curve"] else ((), ())
            ax.plot(t, acc, color=color, ls=("-", "--", ":", "-.")[i % 4], label=f"{name} seed {run['seed']}")
    ax.set_xlabel("RL seconds (Flywheel: when the evaluated weights were published; TRL: its eval excluded)")
    ax.set_ylabel("held-out greedy accuracy")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cell(c: dict, fmt) -> str:
    return f"{fmt(c['mean'])} [{fmt(c['min'])}..{fmt(c['max'])}]"


def format_table(report: dict) -> str:
    fmt = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))  # noqa: E731
    rows = [
        ("RL s to +10 (first eval)", "seconds_to_+10_first"),
        ("RL s to +20 (first eval)", "seconds_to_+20_first"),
        ("RL s to +10 (3-eval mean)", "seconds_to_+10_mean3"),
        ("RL s to +20 (3-eval mean)", "seconds_to_+20_mean3"),
        ("accuracy after cold start", "initial_accuracy"),
        ("accuracy at end of budget", "final_accuracy"),
        ("generated tokens/s", "generated_tokens_per_s"),
        ("learner tokens/s", "learner_tokens_per_s"),
    ]
    names = list(report["systems"])
    table = [[_cell(report["systems"][n]["summary"][key], fmt) for n in names] for _, key in rows]
    w = max(24, *(len(c) + 2 for row in table for c in row))  # columns never run into each other
    lines = [f"{'seed mean [min..max]':<28}" + "".join(f"{n:>{w}}" for n in names)]
    for (label, _), cells in zip(rows, table):
        lines.append(f"{label:<28}" + "".join(f"{c:>{w}}" for c in cells))
    parts = sorted({k for n in names for k in report["systems"][n]["summary"]["time_share"]})
    for part in parts:
        cells = [report["systems"][n]["summary"]["time_share"].get(part) for n in names]
        lines.append(f"{'share: ' + part:<28}" + "".join(f"{fmt(c):>{w}}" for c in cells))
    for key in ("speedup_vs_trl", "speedup_async_vs_sync"):
        lines.append(f"{key}: {fmt(report[key]['value'])} {report[key]['reason'] or ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from services.config import load_config
    from services.driver import prepare_model

    cfg = load_config(REPO / args.config, args.overrides)
    load_before, t0 = os.getloadavg(), time.perf_counter()
    model_dir, cold_start_s = prepare_model(cfg, (REPO / cfg.run.cache_dir).resolve())  # every system's start
    Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
    systems: dict[str, dict] = {}
    for name in args.systems:
        per_seed = []
        for seed in args.seeds:
            run = run_trl(args, cfg, model_dir, seed) if name == "trl" else run_flywheel(args, name, seed)
            per_seed.append({"seed": seed, **run})
        systems[name] = {"per_seed": per_seed, "summary": summarize(per_seed)}
    report = {
        "config": args.config,
        "overrides": args.overrides,
        "rl_s": args.rl_s,
        "seeds": args.seeds,
        "cold_start_s": cold_start_s,
        "speedup_vs_trl": speedup(systems, "trl", "async"),
        "speedup_async_vs_sync": speedup(systems, "sync", "async"),
        "systems": systems,
        "bench_wall_s": time.perf_counter() - t0,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "note": "taken on a shared 2-core box unless re-run on a quiet one: read the ratios, not the seconds",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    figure(systems, out.with_suffix(".png"))
    print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
