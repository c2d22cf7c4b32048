"""Bring-your-own-model benchmark: the built-in Qwen-shaped BPE model on a reasoning-gym task, cold start then RL.

    .venv/bin/python tests/bench/byo_model.py [--config deploy/configs/bpe_reasoning_cpu.yaml] [--budget-s 900]
        [--keep-cache] [overrides ...]

1. In a fresh cache directory (the DeepSpeed op build is reused; nothing else is) it builds the model,
   trains its BPE tokenizer on the task's text and runs the cold start (`services.driver.prepare_model`,
   timed), then runs `python -m services.driver` on the config, which reuses that cold start, with
   `run.max_wall_s` = what is left of `--budget-s` after a fixed allowance for Ray/vLLM/DeepSpeed start-up,
   the final eval and the save. `wall_s` covers all of it, so the whole job fits the budget.
2. The baseline is the same run's cold-started policy: held-out accuracy (greedy, the task's verifier,
   `task.eval_size` problems from the eval seed) before the first RL step (`eval_accuracy_initial`) against
   the last evaluation (`eval_accuracy_final`); `gain_points` is their difference, `gain_ratio` final/initial.
3. Records the eval curve, RL seconds to +10/+15/+20 points (first eval and mean of 3 consecutive evals) and
   the box's load average before and after (the box is shared: read the ratios, not the seconds).
Prints a table and writes tests/bench/results/byo_model.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see services/driver.py
REPO = Path(__file__).resolve().parents[2]
GAINS = (0.10, 0.15, 0.20)
START_UP_ALLOWANCE_S = 120.0  # Ray + actor start-up, the initial and final evals, the save (measured: 60-110 s)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "deploy/configs/bpe_reasoning_cpu.yaml"))
    ap.add_argument("--budget-s", type=float, default=900.0, help="the whole job's wall-clock budget")
    ap.add_argument("--out", default=str(REPO / "tests/bench/results/byo_model.json"))
    ap.add_argument("--keep-cache", action="store_true", help="reuse .cache (cold start cached): RL only")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. cold_start.steps=200")
    return ap.parse_args(argv)


def fresh_cache(keep: bool) -> Path:
    """A cache dir with only the DeepSpeed op build (a one-time ~2 min compile on a fresh machine)."""
    if keep:
        return REPO / ".cache"
    cache = Path(tempfile.mkdtemp(prefix="byo_cache_"))
    ops = REPO / ".cache" / "torch_extensions"
    if ops.exists():
        shutil.copytree(ops, cache / "torch_extensions", symlinks=True)
    return cache


def run_job(args: argparse.Namespace, cache: Path, runs: Path) -> tuple[dict, list[dict], float, float]:
    """Model build + cold start here (timed, cached in `cache`), then the driver with the RL budget left."""
    sys.path.insert(0, str(REPO))
    from services.config import load_config
    from services.driver import prepare_model

    base = [*args.overrides, f"run.cache_dir={cache}", f"run.runs_dir={runs}", "run.name=byo", "run.progress=false"]
    t0 = time.perf_counter()
    prepare_model(load_config(args.config, base), cache)
    prep_s = time.perf_counter() - t0
    rl_budget = args.budget_s - prep_s - START_UP_ALLOWANCE_S
    if rl_budget <= 0:
        raise SystemExit(f"model build + cold start took {prep_s:.0f} s: nothing left of --budget-s={args.budget_s}")
    cmd = [sys.executable, "-m", "services.driver", "--config", args.config, *base, f"run.max_wall_s={rl_budget:.0f}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall_s = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"the run failed:\n{out.stderr[-5000:]}")
    records = [json.loads(line) for line in (runs / "byo" / "metrics.jsonl").read_text().splitlines()]
    return json.loads((runs / "byo" / "summary.json").read_text()), records, wall_s, prep_s


def reach_times(evals: list[dict], initial: float) -> dict:
    """RL seconds (publish time of the evaluated weights) when accuracy first reached each gain, by a single
    eval and by the mean of 3 consecutive evals."""
    out = {}
    for gain in GAINS:
        key = f"+{round(gain * 100)}"
        first = next((e["t_published"] for e in evals if e["accuracy"] >= initial + gain - 1e-9), None)
        means = [
            (evals[i + 2]["t_published"], sum(e["accuracy"] for e in evals[i : i + 3]) / 3)
            for i in range(len(evals) - 2)
        ]
        mean3 = next((t for t, acc in means if acc >= initial + gain - 1e-9), None)
        out[key] = {"first_eval_s": first, "mean3_s": mean3}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    cache, runs = fresh_cache(args.keep_cache), Path(tempfile.mkdtemp(prefix="byo_runs_"))
    summary, records, wall_s, prep_s = run_job(args, cache, runs)
    evals = sorted((r for r in records if r["kind"] == "eval"), key=lambda r: r["policy_version"])
    initial, final = summary["eval_accuracy_initial"], summary["eval_accuracy_final"]
    result = {
        "config": str(Path(args.config).relative_to(REPO)) if Path(args.config).is_relative_to(REPO) else args.config,
        "overrides": args.overrides,
        "eval_accuracy_initial": initial,
        "eval_accuracy_final": final,
        "eval_accuracy_best": summary["eval_accuracy_best"],
        "gain_points": round(100 * (final - initial), 1),
        "gain_ratio": final / initial if initial > 0 else None,
        "wall_s": round(wall_s, 1),
        "wall_s_budget": args.budget_s,
        "model_build_and_cold_start_s": round(prep_s, 1),
        "rl_wall_s": round(summary["rl_wall_s"], 1),
        "learner_steps": summary["learner_steps"],
        "rl_seconds_to_gain": reach_times(evals, initial),
        "eval_curve": [
            {"t": e["t_published"], "policy_version": e["policy_version"], "accuracy": e["accuracy"]} for e in evals
        ],
        "uniform_groups_dropped": summary["uniform_groups"],
        "fresh_cache": not args.keep_cache,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "note": "taken on a shared 2-core box while other jobs ran (see load averages): read gains, not seconds",
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print_table(result)
    if not args.keep_cache:
        shutil.rmtree(cache, ignore_errors=True)
    return 0


def print_table(r: dict) -> None:
    rows = [
        ("held-out accuracy after cold start", f"{r['eval_accuracy_initial']:.3f}"),
        (
            "held-out accuracy after RL (final / best)",
            f"{r['eval_accuracy_final']:.3f} / {r['eval_accuracy_best']:.3f}",
        ),
        ("gain", f"{r['gain_points']:+.1f} points"),
        ("whole job wall s (budget)", f"{r['wall_s']:.0f} ({r['wall_s_budget']:.0f})"),
        (
            "model build + cold start s / RL s / learner steps",
            f"{r['model_build_and_cold_start_s']:.0f} / {r['rl_wall_s']:.0f} / {r['learner_steps']}",
        ),
        *(
            (f"RL s to {k} (first / mean of 3)", f"{v['first_eval_s']} / {v['mean3_s']}")
            for k, v in r["rl_seconds_to_gain"].items()
        ),
        ("load average before / after", f"{r['load_average_before']} / {r['load_average_after']}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


if __name__ == "__main__":
    sys.exit(main())
