"""Distillation vs RL alone on the default task: a small student, the same RL wall-clock in every arm.

    .venv/bin/python tests/bench/distill.py [--teacher-seconds 600] [--rl-seconds 300] [--seeds 0 1 2]
        [--teacher-dir runs/distill-teacher-seed0/final_model]

1. Teacher: the default recipe on a larger built-in model (`--teacher-hidden`, `--teacher-layers`; same char
   tokenizer, so on-policy distillation can compare token log-probs), trained for `--teacher-seconds` (skipped
   with `--teacher-dir`). Its held-out accuracy is recorded.
2. Student arms, each the default small model for `--rl-seconds` of RL:
   rl                  - the default recipe (GRPO on the task reward);
   on_policy           - plus `learner.teacher.path` and `objective.kl_teacher` (reverse KL to the teacher on the
                         student's own samples, k1 per token in the loss, coef `--kl-coef`), task reward kept;
   on_policy_only      - the same with `objective.task_reward_coef=0`: the teacher's signal alone;
   offline             - the cold start imitates the teacher's verified samples (services.distill_offline,
                         `cold_start.solutions_path`), then the default RL.
Writes tests/bench/results/distill.json and tests/bench/results/distill.png (accuracy vs RL seconds).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from ab_runs import REPO, plot, print_table, run_arm, summarise, write


def train_teacher(args) -> tuple[Path, dict]:
    size = [
        f"model.hidden_size={args.teacher_hidden}",
        f"model.intermediate_size={2 * args.teacher_hidden}",
        f"model.num_hidden_layers={args.teacher_layers}",
    ]
    run = run_arm("distill-teacher", size, args.teacher_seconds, 0, args.config, REPO / "runs")
    if "error" in run:
        raise SystemExit(f"teacher run failed:\n{run['error']}")
    return Path(run["run_dir"]) / "final_model", run


def offline_solutions(teacher: Path, args) -> Path:
    out = REPO / "runs" / "distill-teacher-solutions.jsonl"
    cmd = [sys.executable, "-m", "services.distill_offline", "--config", args.config, "--teacher", str(teacher)]
    cmd += ["--out", str(out), "--problems", str(args.offline_problems), "--samples", "4"]
    subprocess.run(cmd, cwd=REPO, check=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher-seconds", type=float, default=600.0)
    ap.add_argument("--teacher-dir", default=None, help="an already trained teacher (skips step 1)")
    ap.add_argument("--teacher-hidden", type=int, default=256)
    ap.add_argument("--teacher-layers", type=int, default=4)
    ap.add_argument("--rl-seconds", type=float, default=300.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--offline-problems", type=int, default=4000)
    ap.add_argument("--arms", nargs="+", default=["rl", "on_policy", "on_policy_only", "offline"])
    ap.add_argument("--config", default="deploy/configs/tiny_cpu.yaml")
    args = ap.parse_args()
    teacher, teacher_run = (Path(args.teacher_dir), {}) if args.teacher_dir else train_teacher(args)
    on_policy = [
        f"learner.teacher.path={teacher}",
        f"learner.objective.kl_teacher.coef={args.kl_coef}",
        "learner.objective.kl_teacher.placement=loss",
    ]
    arms = {
        "rl": [],
        "on_policy": on_policy,
        "on_policy_only": [
            *on_policy,
            "learner.objective.task_reward_coef=0",
            "rollout.drop_uniform_groups=false",
            "learner.objective.filter_zero_variance_groups=false",
        ],
    }
    if "offline" in args.arms:
        arms["offline"] = [f"cold_start.solutions_path={offline_solutions(teacher, args)}"]
    out, runs = REPO / "tests/bench/results/distill.json", []
    teacher_info = {k: teacher_run.get(k) for k in ("accuracy_final", "accuracy_best", "learner_steps")}
    for seed in args.seeds:
        for arm in args.arms:
            runs.append(run_arm(arm, arms[arm], args.rl_seconds, seed, args.config, REPO / "runs"))
            rows = summarise(runs, baseline="rl")
            write(out, runs, rows, rl_seconds=args.rl_seconds, teacher=str(teacher), teacher_run=teacher_info)
    print_table(rows)
    print(json.dumps({"teacher": str(teacher), **teacher_info}))
    plot(runs, Path(out).with_suffix(".png"), f"distillation vs RL alone ({args.rl_seconds:.0f} s RL)")


if __name__ == "__main__":
    main()
