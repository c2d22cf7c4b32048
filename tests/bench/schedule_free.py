"""Schedule-Free AdamW vs AdamW on the default task: held-out accuracy after the same number of learner steps.

    .venv/bin/python tests/bench/schedule_free.py [--steps 80] [--seeds 0 1 2] [--sf-lr 2e-4]

Arms (both on deploy/configs/tiny_cpu.yaml with learner.zero_stage=0, which Schedule-Free needs, so the only
difference is the optimiser): `adamw` (the default recipe's lr, constant after warm-up) and
`schedule_free_adamw` (no schedule; rollout and evaluation get its averaged weights). Writes
tests/bench/results/schedule_free.json (per-run curves, per-arm means, final accuracy as a ratio to AdamW's)
and tests/bench/results/schedule_free.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ab_runs import REPO, plot, print_table, run_arm, summarise, write


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=80, help="learner steps per run (the comparison is at equal steps)")
    ap.add_argument("--max-wall-s", type=float, default=1800.0, help="safety cap on each run's RL seconds")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sf-lr", type=float, default=2e-4, help="Schedule-Free's lr (it often takes a larger one)")
    ap.add_argument("--config", default="deploy/configs/tiny_cpu.yaml")
    args = ap.parse_args()
    common = ["learner.zero_stage=0"]
    arms = {
        "adamw": common,
        "schedule_free_adamw": [*common, "learner.optimizer=schedule_free_adamw", f"learner.lr={args.sf_lr}"],
    }
    out, runs = REPO / "tests/bench/results/schedule_free.json", []
    for seed in args.seeds:
        for arm, overrides in arms.items():
            runs.append(run_arm(arm, overrides, args.steps, seed, args.config, REPO / "runs", args.max_wall_s))
            rows = summarise(runs, baseline="adamw")
            write(out, runs, rows, steps=args.steps, config=args.config)
    print_table(rows)
    plot(runs, Path(out).with_suffix(".png"), f"Schedule-Free vs AdamW ({args.steps} learner steps)")


if __name__ == "__main__":
    main()
