"""Distillation vs RL alone on the default task: a small student, the same number of learner steps in every arm
(or, with `--rl-s`, the same RL wall-clock seconds).

    .venv/bin/python tests/bench/distill.py [--teacher-steps 360] [--steps 60 | --rl-s 150] [--seeds 0 1 2]
        [--teacher-dir runs/distill-teacher-seed0/final_model] [--teacher-hidden 256 --teacher-layers 4]
        [--teacher-set cold_start.steps=800 cold_start.lr=1e-3]

1. Teacher: the default recipe trained for `--teacher-steps` learner steps (several times the students' budget;
   0 = its cold start alone, evaluated greedily on the held-out split),
   optionally on a larger built-in model (`--teacher-hidden`, `--teacher-layers`; the same char tokenizer, so
   on-policy distillation compares log-probs of the same ids) with its own recipe overrides (`--teacher-set`: a
   4x larger model needs a longer cold start at a lower lr than the student's deliberately short one);
   skipped with `--teacher-dir` (a run's final_model: its accuracy is read from the run's summary.json). The
   bench stops at the first student run if the teacher's held-out accuracy is not above the students' cold
   start, and records whether it beats the RL-only student's final accuracy (`teacher_beats_rl_student`):
   distilling from a weaker teacher measures nothing.
2. Student arms, each the default small model for `--steps` learner steps:
   rl                  - the default recipe (GRPO on the task reward);
   on_policy           - plus `learner.teacher.path` and `objective.kl_teacher` (reverse KL to the teacher on the
                         student's own samples, k1 per token in the loss, coef `--kl-coef`), task reward kept;
   on_policy_only      - the same with `objective.task_reward_coef=0`: the teacher's signal alone;
   on_policy_reward    - the teacher's signal alone as per-token rewards (`kl_teacher.placement=reward`,
                         advantage `reinforce_pp` at gamma 0: -(log pi - log teacher) per token, whitened), the
                         form of Thinking Machines' on-policy distillation;
   offline             - the cold start imitates the teacher's verified samples (services.distill_offline,
                         `cold_start.solutions_path`), then the default RL.
With `--rl-s S` every student run trains for S seconds of RL (`run.max_wall_s`; cold start and start-up not
counted) instead of a step count: the teacher's forward pass on the student's samples costs time, and equal
wall-clock is the comparison a user paying for the hardware makes. Arms run interleaved within each seed so
a change in the box's load hits every arm alike.
Writes tests/bench/results/distill.json and tests/bench/results/distill.png (accuracy vs learner steps, or vs
RL seconds with `--rl-s`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from ab_runs import EQUAL_STEPS_NOTE, REPO, cold_started_model, plot, print_table, run_arm, summarise, write

UNBOUNDED_STEPS = 1_000_000  # with --rl-s the wall clock, not a step count, ends each run


def train_teacher(args) -> tuple[Path, dict]:
    size = [] if args.teacher_hidden is None else [f"model.hidden_size={args.teacher_hidden}"]
    size += [] if args.teacher_hidden is None else [f"model.intermediate_size={4 * args.teacher_hidden}"]
    size += [] if args.teacher_layers is None else [f"model.num_hidden_layers={args.teacher_layers}"]
    overrides = [*size, *args.teacher_set]
    if args.teacher_steps == 0:  # the teacher is its cold start (SFT) alone
        path, built = cold_started_model(args.config, ["run.name=distill-teacher", *overrides])
        acc, params = built["greedy_accuracy"], built["params"]
        return path, {
            "accuracy_initial": acc,
            "accuracy_final": acc,
            "accuracy_best": acc,
            "learner_steps": 0,
            "params": params,
        }
    run = run_arm("distill-teacher", overrides, args.teacher_steps, 0, args.config, REPO / "runs", args.max_wall_s)
    if "error" in run:
        raise SystemExit(f"teacher run failed:\n{run['error']}")
    return Path(run["run_dir"]) / "final_model", run


def given_teacher(teacher: Path) -> dict:
    """A teacher from an earlier run's final_model: its numbers from that run's summary.json."""
    summary = teacher.parent / "summary.json"
    if not summary.exists():
        raise SystemExit(f"--teacher-dir {teacher}: no {summary} to read its held-out accuracy from")
    d = json.loads(summary.read_text())
    return {
        "accuracy_initial": d["eval_accuracy_initial"],
        "accuracy_final": d["eval_accuracy_final"],
        "accuracy_best": d["eval_accuracy_best"],
        "learner_steps": d["learner_steps"],
    }


def offline_solutions(teacher: Path, args) -> Path:
    out = REPO / "runs" / "distill-teacher-solutions.jsonl"
    cmd = [sys.executable, "-m", "services.distill_offline", "--config", args.config, "--teacher", str(teacher)]
    cmd += ["--out", str(out), "--problems", str(args.offline_problems), "--samples", "4"]
    subprocess.run(cmd, cwd=REPO, check=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher-steps", type=int, default=360, help="0 = the teacher is its cold start alone")
    ap.add_argument("--teacher-dir", default=None, help="an earlier run's final_model (skips step 1)")
    ap.add_argument("--teacher-hidden", type=int, default=None, help="None = the student's architecture")
    ap.add_argument("--teacher-layers", type=int, default=None)
    ap.add_argument(
        "--teacher-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for the teacher's run only, e.g. cold_start.steps=800 cold_start.lr=1e-3",
    )
    ap.add_argument("--steps", type=int, default=60, help="learner steps per student run")
    ap.add_argument("--max-wall-s", type=float, default=1800.0, help="safety cap on each run's RL seconds")
    ap.add_argument("--rl-s", type=float, default=None, help="equal RL wall-clock per student run (replaces --steps)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--offline-problems", type=int, default=4000)
    ap.add_argument("--arms", nargs="+", default=["rl", "on_policy", "on_policy_only", "on_policy_reward", "offline"])
    ap.add_argument("--out", type=Path, default=REPO / "tests/bench/results/distill.json")
    ap.add_argument("--append", action="store_true", help="add these runs to --out's (same teacher and budget)")
    ap.add_argument("--config", default="deploy/configs/tiny_cpu.yaml")
    args = ap.parse_args()
    if args.teacher_dir:
        teacher = Path(args.teacher_dir).resolve()
        teacher_run = given_teacher(teacher)
    else:
        teacher, teacher_run = train_teacher(args)
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
        # the teacher's signal alone as a per-token reward (Thinking Machines' on-policy distillation): advantage
        # -(log pi - log teacher) per token, whitened over the batch, instead of the loss-placed surrogate
        "on_policy_reward": [
            f"learner.teacher.path={teacher}",
            f"learner.objective.kl_teacher.coef={args.kl_coef}",
            "learner.objective.kl_teacher.placement=reward",
            "learner.objective.advantage={kind: reinforce_pp, gamma: 0}",
            "learner.objective.task_reward_coef=0",
            "rollout.drop_uniform_groups=false",
            "learner.objective.filter_zero_variance_groups=false",
        ],
    }
    if "offline" in args.arms:
        arms["offline"] = [f"cold_start.solutions_path={offline_solutions(teacher, args)}"]
    out, runs = args.out, []
    if args.append:  # more arms or seeds for an earlier run of the same comparison: same teacher, same budget
        prior = json.loads(out.read_text())
        same = (
            prior.get("teacher") == str(teacher)
            and prior.get("rl_s") == args.rl_s
            and prior.get("steps") == (None if args.rl_s else args.steps)
        )
        if not same:
            raise SystemExit(f"--append: {out} was run with another teacher or budget; write to a new --out")
        runs = prior["runs"]
    keys = ("accuracy_initial", "accuracy_final", "accuracy_best", "learner_steps", "params")
    teacher_info = {k: teacher_run.get(k) for k in keys}
    steps, cap_s = (UNBOUNDED_STEPS, args.rl_s) if args.rl_s else (args.steps, args.max_wall_s)
    budget = {"rl_s": args.rl_s} if args.rl_s else {"steps": args.steps}
    note = (
        f"every student run trained for {args.rl_s:g} s of RL (equal wall-clock; arms interleaved per seed); "
        "taken on a shared 2-core box under load from other jobs, so step counts differ with the load"
        if args.rl_s
        else EQUAL_STEPS_NOTE
    )
    teacher_info["size"] = {"hidden": args.teacher_hidden, "layers": args.teacher_layers}
    teacher_info["overrides"] = [] if args.teacher_dir else args.teacher_set
    for seed in args.seeds:
        for arm in args.arms:
            runs.append(run_arm(arm, arms[arm], steps, seed, args.config, REPO / "runs", cap_s))
            cold = runs[-1].get("accuracy_initial")
            if arm != "offline" and cold is not None and teacher_info["accuracy_final"] <= cold:
                raise SystemExit(
                    f"teacher {teacher} ({teacher_info['accuracy_final']:.3f} held-out) is no better than the "
                    f"students' cold start ({cold:.3f}): distilling from it measures nothing; train it longer or "
                    "larger (--teacher-steps, --teacher-hidden/--teacher-layers, --teacher-set cold_start.steps=...)"
                )
            rows = summarise(runs, baseline="rl")
            rl = next((r["accuracy_final"] for r in rows if r["arm"] == "rl"), None)
            beats = None if rl is None else teacher_info["accuracy_final"] > rl
            extra = {**budget, "teacher": str(teacher), "teacher_run": teacher_info}
            write(out, runs, rows, note=note, **extra, teacher_beats_rl_student=beats)
    print_table(rows)
    print(json.dumps({"teacher": str(teacher), **teacher_info}))
    what = f"{args.rl_s:g} s of RL" if args.rl_s else f"{args.steps} learner steps"
    plot(runs, Path(out).with_suffix(".png"), f"distillation vs RL alone ({what})", "seconds" if args.rl_s else "steps")


if __name__ == "__main__":
    main()
