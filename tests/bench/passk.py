"""pass@k before and after RL: does RL sharpen pass@1 while narrowing pass@k (Yue et al. 2025)?

    .venv/bin/python tests/bench/passk.py [--config deploy/configs/tiny_cpu.yaml] [--name tiny] [--rl-s 150]
        [--n 64] [--limit N] [overrides ...]

1. Runs the driver on the config for `--rl-s` seconds of RL (`run.max_wall_s`) from the config's cold start
   (built or found in `.cache`, as `make run` does), in a temporary runs directory.
2. Evaluates the cold-started model and the run's `final_model` with `python -m services.evaluate`: greedy
   pass@1 and, for `--n` samples per held-out prompt at the rollout temperature, unbiased pass@k (Chen et al.
   2021), maj@k and mean@k for k = 1, 2, 4, ..., n, scored by the task's verifier.
3. Writes tests/bench/results/passk_<name>.json (the evaluation's JSON plus the run's summary and the box's
   load average), passk_<name>.png (pass@k against k, both models) and passk_<name>_run_report.png (the RL
   run's own report.png), and prints the table.
The baseline is the cold start, measured in the same run on the same prompts and seeds.
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

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "tests/bench/results"
SUMMARY_KEYS = ("eval_accuracy_initial", "eval_accuracy_final", "learner_steps", "rl_wall_s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="deploy/configs/tiny_cpu.yaml")
    ap.add_argument("--name", default="tiny", help="results go to results/passk_<name>.json/.png")
    ap.add_argument("--rl-s", type=float, default=150.0, help="seconds of RL (run.max_wall_s)")
    ap.add_argument("--n", type=int, default=64, help="samples per held-out prompt")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N held-out prompts")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides for both the run and the evaluation")
    return ap.parse_args(argv)


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    py = sys.executable
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="passk_bench_"))
    try:
        name = f"passk-{args.name}"
        t0 = time.monotonic()
        run_overrides = [f"run.runs_dir={tmp}", f"run.name={name}", f"run.max_wall_s={args.rl_s}", "run.progress=false"]
        run([py, "-m", "services.driver", "--config", args.config, *args.overrides, *run_overrides])
        rl_wall_s = time.monotonic() - t0
        summary = json.loads((tmp / name / "summary.json").read_text())
        out = tmp / "eval"
        cmd = [py, "-m", "services.evaluate", "--config", args.config, "--n", str(args.n), "--out", str(out)]
        cmd += ["--model", "@coldstart", "--label", "cold start"]
        cmd += ["--model", str(tmp / name / "final_model"), "--label", f"RL {args.rl_s:g} s"]
        if args.limit is not None:
            cmd += ["--limit", str(args.limit)]
        t1 = time.monotonic()
        run(cmd + list(args.overrides))
        result = json.loads((out / "passk.json").read_text())
        result["bench"] = {
            "config": args.config,
            "overrides": args.overrides,
            "rl_s": args.rl_s,
            "run_wall_s": rl_wall_s,
            "eval_wall_s": time.monotonic() - t1,
            "run_summary": {k: summary.get(k) for k in SUMMARY_KEYS},
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"passk_{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
        shutil.copy(out / "passk.png", RESULTS / f"passk_{args.name}.png")
        shutil.copy(tmp / name / "report.png", RESULTS / f"passk_{args.name}_run_report.png")
        print_table(result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def print_table(result: dict) -> None:
    models = result["models"]
    print("| k | " + " | ".join(f"{m['label']} pass@k | {m['label']} maj@k" for m in models) + " |")
    print("|---|" + "---|---|" * len(models))
    for i, point in enumerate(models[0]["curve"]):
        cells = [f"{m['curve'][i]['pass_at_k']:.3f} | {m['curve'][i]['maj_at_k']:.3f}" for m in models]
        print(f"| {point['k']} | " + " | ".join(cells) + " |")
    print("| greedy pass@1 | " + " | ".join(f"{m['greedy_pass_at_1']:.3f} | -" for m in models) + " |")


if __name__ == "__main__":
    sys.exit(main())
