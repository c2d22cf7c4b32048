"""Spine benchmark: the default job end to end, and TRL's GRPOTrainer on the same start, side by side.

    .venv/bin/python tests/bench/spine.py [--config deploy/configs/tiny_cpu.yaml] [--skip-trl]
        [--trl-max-rl-seconds 900]

1. Runs `python -m services.driver` on the config exactly as `make run` does (fresh run dir) and reads
   its summary: total wall time (incl. model build, cold start, actor start-up), eval accuracy before
   RL and at the end, and RL seconds until held-out accuracy first reached +20 points (the time the
   weights that reached it were published; eval itself runs on the rollout worker, off the learner).
2. Runs TRL's GRPOTrainer (its own venv, tests/bench/trl_setup.sh) from the *same* cold-start
   checkpoint with the same task, eval split, group size, max new tokens, temperature and KL coefficient,
   16 groups per optimiser step, and 2 threads (the whole box), until +20 points or a time cap; its RL
   clock excludes its eval time. TRL runs at our lr and at each `--trl-lrs` (default 1e-4, its best on
   the earlier task); the faster one is reported, all are recorded.
3. First-reach times on a noisy eval favour whoever evaluates more often, so the table also gives the
   time at which the mean of 3 consecutive evals reached each gain.
Prints a table and writes tests/bench/results/spine.json with the ratio TRL / ours (>1 = we are faster).
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

from services.config import load_config  # noqa: E402
from services.driver import prepare_model  # noqa: E402


def run_ours(config: Path, run_name: str, runs_dir: Path, overrides: tuple[str, ...] = ()) -> dict:
    """`python -m services.driver` on `config` (+ dotted `overrides`) in a fresh run dir; its summary.json."""
    cmd = [
        sys.executable,
        "-m",
        "services.driver",
        "--config",
        str(config),
        f"run.name={run_name}",
        f"run.runs_dir={runs_dir}",
        "run.progress=false",
        *overrides,
    ]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"our run failed:\n{out.stderr[-4000:]}")
    summary = json.loads((runs_dir / run_name / "summary.json").read_text())
    summary["process_wall_s"] = time.perf_counter() - t0
    return summary


def trl_python() -> Path:
    """The TRL venv's python: `$TRL_VENV/bin/python` (tests/bench/trl_setup.sh's default too: repo/.venv-trl)."""
    return Path(os.environ.get("TRL_VENV", REPO / ".venv-trl")) / "bin/python"


def run_trl(cfg, model_dir: Path, out_json: Path, max_rl_seconds: float, lr: float) -> dict:
    subprocess.run(["bash", str(REPO / "tests/bench/trl_setup.sh")], check=True, cwd=REPO)
    rc = cfg.rollout
    cmd = [
        str(trl_python()),
        str(REPO / "tests/bench/trl_baseline.py"),
        "--model-dir",
        str(model_dir),
        "--out",
        str(out_json),
        "--task-json",
        cfg.task.model_dump_json(),
        # TRL's best setting found on this task (tests/bench/results/trl_*.json): 64 prompts per generation,
        # 4 optimiser steps of 16 prompts each -- the same 16 groups per step our learner takes.
        "--group-size",
        str(rc.group_size),
        "--prompts-per-step",
        "64",
        "--updates-per-batch",
        "4",
        "--lr",
        str(lr),
        "--max-new-tokens",
        str(rc.max_new_tokens),
        "--temperature",
        str(rc.temperature),
        # TRL's beta is a KL to a reference model (a second model copy), not to the behaviour policy:
        # our behaviour-KL has no TRL equivalent, so TRL runs with its default beta=0.
        "--beta",
        "0.0",
        "--target-gain",
        "0.2",
        "--max-rl-seconds",
        str(max_rl_seconds),
        "--threads",
        "2",
        "--seed",
        str(cfg.rollout.seed),
    ]
    subprocess.run(cmd, check=True, cwd=REPO)
    return json.loads(out_json.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(REPO / "deploy/configs/tiny_cpu.yaml"))
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--trl-max-rl-seconds", type=float, default=900.0)
    ap.add_argument("--trl-lrs", type=float, nargs="*", default=[1e-4], help="TRL lrs to try besides ours")
    args = ap.parse_args()
    results = REPO / "tests/bench/results"
    results.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config)
    ours = run_ours(Path(args.config), "bench-spine", REPO / "runs")
    model_dir, _ = prepare_model(
        cfg, (REPO / cfg.run.cache_dir).resolve()
    )  # cached: the checkpoint our run started from
    trl, trl_runs = None, {}
    if not args.skip_trl:  # TRL at our lr and at its best lr on the earlier task; the faster one is reported
        for lr in dict.fromkeys([cfg.learner.lr, *args.trl_lrs]):
            trl_runs[lr] = run_trl(cfg, model_dir, results / f"trl_spine_lr{lr:g}.json", args.trl_max_rl_seconds, lr)
        trl = min(trl_runs.values(), key=lambda r: r.get("rl_seconds_to_target") or float("inf"))
        (results / "trl_spine.json").write_text(json.dumps(trl, indent=1))
    report = {
        "config": str(Path(args.config).relative_to(REPO)),
        "ours": {
            k: ours[k]
            for k in (
                "eval_accuracy_initial",
                "eval_accuracy_final",
                "eval_accuracy_best",
                "wall_s",
                "cold_start_s",
                "rl_wall_s",
                "rl_seconds_to_target",
                "learner_steps",
                "policy_versions_published",
                "traces_consumed",
                "max_staleness_seen",
            )
        },
        "trl": None
        if trl is None
        else {
            k: trl.get(k)
            for k in (
                "initial_accuracy",
                "final_accuracy",
                "rl_seconds_to_target",
                "steps",
                "completions_sampled",
                "versions",
            )
        },
    }
    o = report["ours"]
    report["gain_points"] = 100 * (o["eval_accuracy_final"] - o["eval_accuracy_initial"])
    ours_curve = _our_curve(REPO / "runs" / "bench-spine")
    trl_curve = [(c["rl_seconds"], c["accuracy"]) for c in (trl or {}).get("accuracy_curve", [])]
    report["seconds_to_gain"] = {
        f"+{g}": {"ours": _first_reach(ours_curve, g / 100), "trl": _first_reach(trl_curve, g / 100) if trl else None}
        for g in GAINS
    }
    report["trl_runs"] = {
        f"{lr:g}": {"rl_seconds_to_target": r.get("rl_seconds_to_target"), "steps": r.get("steps")}
        for lr, r in trl_runs.items()
    }
    report["trl_lr"] = (trl or {}).get("config", {}).get("lr")
    report["seconds_to_gain_3eval_mean"] = {  # less eval noise: the mean of 3 consecutive evals reaches the gain
        f"+{g}": {
            "ours": _first_reach(ours_curve, g / 100, window=3),
            "trl": _first_reach(trl_curve, g / 100, window=3) if trl else None,
        }
        for g in GAINS
    }
    for row in [*report["seconds_to_gain"].values(), *report["seconds_to_gain_3eval_mean"].values()]:
        row["trl_over_ours"] = row["trl"] / row["ours"] if row["ours"] and row["trl"] else None
    report["default_job_within_15_min"] = o["wall_s"] <= 900
    t_ours, t_trl = o["rl_seconds_to_target"], (trl or {}).get("rl_seconds_to_target")
    report["trl_over_ours_time_to_target"] = (t_trl / t_ours) if (t_ours and t_trl) else None
    (results / "spine.json").write_text(json.dumps(report, indent=1))
    print(format_table(report))


GAINS = (5, 10, 15, 20)


def _our_curve(run_dir: Path) -> list[tuple[float, float]]:
    """(RL seconds when the evaluated weights were published, accuracy) from metrics.jsonl."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["t_published"], r["accuracy"]) for r in recs if r["kind"] == "eval"]


def _first_reach(curve: list[tuple[float, float]], gain: float, window: int = 1) -> float | None:
    """Seconds at which accuracy (the mean of the last `window` evals) first reached curve[0] + gain."""
    if not curve:
        return None
    start = curve[0][1]
    for i in range(len(curve)):
        recent = [acc for _, acc in curve[max(0, i - window + 1) : i + 1]]
        if sum(recent) / len(recent) >= start + gain - 1e-9:
            return curve[i][0]
    return None


def format_table(r: dict) -> str:
    o, t = r["ours"], r["trl"] or {}
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    rows = [
        ("eval accuracy after cold start", o["eval_accuracy_initial"], t.get("initial_accuracy")),
        ("eval accuracy at end", o["eval_accuracy_final"], t.get("final_accuracy")),
        ("RL seconds to +20 points", o["rl_seconds_to_target"], t.get("rl_seconds_to_target")),
        ("learner steps", o["learner_steps"], t.get("steps")),
        ("whole job wall seconds", o["wall_s"], None),
    ]
    lines = [f"{'':<34}{'flywheel':>12}{'TRL GRPO':>12}"] + [
        f"{name:<34}{fmt(a):>12}{fmt(b):>12}" for name, a, b in rows
    ]
    lines += [
        f"{'RL seconds to ' + k + ' points':<34}{fmt(v['ours']):>12}{fmt(v['trl']):>12}   TRL/ours "
        f"{fmt(v['trl_over_ours'])}"
        for k, v in r["seconds_to_gain"].items()
    ]
    lines += [
        f"{'  same, mean of 3 evals ' + k:<34}{fmt(v['ours']):>12}{fmt(v['trl']):>12}   TRL/ours "
        f"{fmt(v['trl_over_ours'])}"
        for k, v in r["seconds_to_gain_3eval_mean"].items()
    ]
    lines.append(f"TRL runs (lr: seconds to +20): {r['trl_runs']}; reported: lr {r['trl_lr']}")
    lines.append(
        f"gain {r['gain_points']:.1f} points; job within 15 min: {r['default_job_within_15_min']}; "
        f"TRL/flywheel time to target: {fmt(r['trl_over_ours_time_to_target'])}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
