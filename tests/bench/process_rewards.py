"""Outcome vs process rewards on the default task: held-out accuracy after the same number of learner steps.

    .venv/bin/python tests/bench/process_rewards.py [--steps 80] [--seeds 0 1 2] [--coef 0.1]

The default task writes its answer least-significant digit first, one column (plus carry) per digit, so each
answer digit is a reasoning step. Arms on deploy/configs/tiny_cpu.yaml:
  outcome        - the default: reward 1 for an exactly right answer;
  process        - plus `task.step_reward.kind=answer_digits`: +coef / -coef on each right / wrong digit's token,
                   same GRPO advantage (steps act as partial credit on the sequence);
  process_tokens - the same step rewards with a token-level estimator (`reinforce_pp_baseline`: returns-to-go,
                   so a wrong digit is blamed on its own and later tokens, not on the right ones before it).
Writes tests/bench/results/process_rewards.json and tests/bench/results/process_rewards.png.
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
    ap.add_argument("--coef", type=float, default=0.1)
    ap.add_argument("--arms", nargs="+", default=["outcome", "process", "process_tokens"])
    ap.add_argument("--config", default="deploy/configs/tiny_cpu.yaml")
    args = ap.parse_args()
    steps = ["task.step_reward.kind=answer_digits", f"task.step_reward.coef={args.coef}"]
    all_arms = {
        "outcome": [],
        "process": steps,
        "process_tokens": [*steps, "learner.objective.advantage=reinforce_pp_baseline"],
    }
    out, runs = REPO / "tests/bench/results/process_rewards.json", []
    for seed in args.seeds:
        for arm in args.arms:
            runs.append(run_arm(arm, all_arms[arm], args.steps, seed, args.config, REPO / "runs", args.max_wall_s))
            rows = summarise(runs, baseline="outcome")
            write(out, runs, rows, steps=args.steps, config=args.config, step_coef=args.coef)
    print_table(rows)
    plot(runs, Path(out).with_suffix(".png"), f"outcome vs process rewards ({args.steps} learner steps)")


if __name__ == "__main__":
    main()
