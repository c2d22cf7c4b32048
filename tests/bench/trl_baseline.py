"""TRL `GRPOTrainer` baseline: RL wall-clock time to +target_gain held-out accuracy, CPU, no vLLM.

Run in the TRL venv (tests/bench/trl_setup.sh), from anywhere:
    .venv-trl/bin/python tests/bench/trl_baseline.py --model-dir runs/cold_start --out tests/bench/results/trl_x.json

Contract:
- Same model, task, prompts and evaluation as Flywheel's side: prompt ids are `rollout.render.Renderer`'s
  (`--render-json`, raw by default; a chat rendering is passed to TRL as the template's text, checked row by
  row against what TRL's own tokenization yields), held-out accuracy is `rollout.evaluation.greedy_accuracy`
  (greedy with the model's KV cache, as HF `generate` decodes: the eval time a TRL user sees) on
  `task.eval_set()` (the task built with that renderer, so over-long prompts are skipped as Flywheel skips
  them), the reward is the task's verifier (`task.score`: exact match for arithmetic, reasoning-gym's scorer).
- `--task-json` is any task config with a `kind` (arithmetic, reasoning_gym); reasoning_gym needs the
  `reasoning_gym` package in this venv (deploy/requirements-trl.lock has it).
- A user's competent TRL setup: TRL's default loss (`loss_type`, group reward scaling, clipping), HF
  `generate` sampling, one optimizer step per `prompts_per_step * group_size` completions (no reuse),
  constant lr, fp32, CPU, no checkpoints.
- The RL clock runs from `on_train_begin`; held-out eval time is measured and excluded from it
  (both are recorded). Training stops once the mean of `--stop-window` consecutive evals reaches
  initial + target_gain (the first single eval to reach it is `rl_seconds_to_target`), or when the RL clock passes
  `max_rl_seconds` (then `rl_seconds_to_target` is null); with `--fixed-budget` it never stops early (a
  fixed RL budget for comparing accuracy at the end). Generated tokens are counted from each sampled
  batch's completion mask (each completion is trained on once, so they are also the learner's tokens).
  Generation vs training time per step is
  measured by wrapping the trainer's rollout methods (timing only; behaviour unchanged).
- Imports only what .venv-trl has (torch, transformers, trl, pydantic) plus our `rollout` package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rollout.evaluation import greedy_accuracy  # noqa: E402
from rollout.render import RenderConfig, Renderer  # noqa: E402
from rollout.tasks import Problem, Task, TaskConfig, make_task  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", required=True, type=Path, help="HF model + tokenizer dir (the cold-start checkpoint)")
    p.add_argument("--out", required=True, type=Path, help="result JSON path")
    p.add_argument("--task-json", default="{}", help="a task config with its `kind` as JSON (default: TaskConfig())")
    p.add_argument("--render-json", default="{}", help="a rollout.render.RenderConfig as JSON (default: raw)")
    p.add_argument("--fixed-budget", action="store_true", help="run all of --max-rl-seconds; no stop at the target")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--updates-per-batch",
        type=int,
        default=1,
        help="optimizer steps per sampled batch (TRL steps_per_generation; each sees 1/N of the batch)",
    )
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (TRL's default 0.0 loads no ref model)")
    p.add_argument("--eval-every-steps", type=int, default=10)
    p.add_argument(
        "--stop-window",
        type=int,
        default=3,
        help="stop once the mean of this many consecutive evals reaches the target "
        "(first reach is recorded either way)",
    )
    p.add_argument("--target-gain", type=float, default=0.20)
    p.add_argument("--max-rl-seconds", type=float, default=900.0)
    p.add_argument("--max-steps", type=int, default=5000, help="hard step cap (also sizes the prompt dataset)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def task_config(task_json: str):
    """The task config `task_json` names by its `kind` (arithmetic when it has none)."""
    import json as _json

    kind = _json.loads(task_json).get("kind", "arithmetic")
    if kind == "reasoning_gym":
        from rollout.reasoning_gym_task import ReasoningGymTaskConfig

        return ReasoningGymTaskConfig.model_validate_json(task_json)
    if kind != "arithmetic":
        raise SystemExit(f"--task-json kind={kind!r}: this baseline runs arithmetic and reasoning_gym tasks")
    return TaskConfig.model_validate_json(task_json)


def build_dataset(task: Task, renderer: Renderer, rows: int, seed: int):
    """`rows` training problems as a TRL standard-format prompt dataset: `prompt` is the rendered text (a chat
    rendering is the template's text, so TRL sees the same ids), plus what the reward needs to rebuild each
    `Problem`. The stream seed is offset from the task seed so RL prompts are not the SFT cold start's
    problems replayed."""
    from datasets import Dataset

    stream = task.train_stream(seed=1000 + seed)
    problems = [next(stream) for _ in range(rows)]
    texts = [renderer.prompt_text(p) for p in problems]
    trl_ids = renderer.tokenizer(text=texts)["input_ids"]  # GRPOTrainer._tokenize_prompts' call for text prompts
    for problem, ids in zip(problems, trl_ids):
        if ids != renderer.encode_prompt(problem):
            raise RuntimeError(
                f"TRL would feed {ids} for {problem.prompt!r}, Flywheel feeds "
                f"{renderer.encode_prompt(problem)}; fix build_dataset() so they agree"
            )
    return Dataset.from_dict(
        {
            "prompt": texts,
            "problem_prompt": [p.prompt for p in problems],
            "answer": [p.answer for p in problems],
            "task_name": [p.task for p in problems],
            "metadata": [p.metadata or "" for p in problems],
        }
    )


def verifier_reward(task: Task):
    """The task's verifier on each decoded completion (TRL decodes with skip_special_tokens=True)."""

    def task_reward(prompts, completions, problem_prompt, answer, task_name, metadata, **_) -> list[float]:
        return [
            task.score(Problem(prompt=p, answer=a, task=t, metadata=m or None), c)
            for p, c, a, t, m in zip(problem_prompt, completions, answer, task_name, metadata)
        ]

    return task_reward


class TokenCounter:
    """Counts completion tokens in the batches `GRPOTrainer._generate_and_score_completions` returns."""

    def __init__(self):
        self.tokens = 0

    def wrap(self, fn):
        def counted(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.tokens += int(out["completion_mask"].sum().item())
            return out

        return counted


class Stopwatch:
    """Accumulates wall and process-CPU seconds spent inside wrapped callables."""

    def __init__(self):
        self.seconds = self.cpu_seconds = 0.0
        self.calls = 0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.cpu_seconds += time.process_time() - c0
                self.calls += 1

        return timed


def make_callback(task, renderer, args, initial_accuracy: float):
    from transformers import TrainerCallback

    class HeldOutEval(TrainerCallback):
        """Greedy held-out eval every N steps; stops at the target or the RL time limit; eval time off the clock."""

        def __init__(self):
            self.eval_problems = task.eval_set()
            self.target = initial_accuracy + args.target_gain
            self.t_begin = self.cpu_begin = None
            self.eval_seconds = self.eval_cpu_seconds = 0.0
            self.step_seconds: list[float] = []
            self.step_cpu_seconds: list[float] = []
            self.curve: list[dict] = []
            self.reached: dict | None = None
            self.stop_reason = "max_steps"
            self._t_step = self._c_step = 0.0

        def rl_seconds(self) -> float:
            return time.perf_counter() - self.t_begin - self.eval_seconds

        def rl_cpu_seconds(self) -> float:
            return time.process_time() - self.cpu_begin - self.eval_cpu_seconds

        def on_train_begin(self, a, state, control, **kw):
            self.t_begin, self.cpu_begin = time.perf_counter(), time.process_time()
            self.curve.append({"step": 0, "rl_seconds": 0.0, "rl_cpu_seconds": 0.0, "accuracy": initial_accuracy})

        def on_step_begin(self, a, state, control, **kw):
            self._t_step, self._c_step = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, model=None, **kw):
            self.step_seconds.append(time.perf_counter() - self._t_step)
            self.step_cpu_seconds.append(time.process_time() - self._c_step)
            rl_s = self.rl_seconds()
            out_of_time = rl_s >= args.max_rl_seconds
            last = state.global_step >= state.max_steps
            if state.global_step % args.eval_every_steps and not (out_of_time or last):
                return control
            rl_cpu_s, t0, c0 = self.rl_cpu_seconds(), time.perf_counter(), time.process_time()
            acc = greedy_accuracy(model, renderer, self.eval_problems, args.max_new_tokens, task.score)
            self.eval_seconds += time.perf_counter() - t0
            self.eval_cpu_seconds += time.process_time() - c0
            point = {
                "step": state.global_step,
                "rl_seconds": round(rl_s, 3),
                "rl_cpu_seconds": round(rl_cpu_s, 3),
                "accuracy": acc,
            }
            self.curve.append(point)
            print(
                f"[trl_baseline] step {state.global_step} rl {rl_s:.1f}s acc {acc:.3f} (target {self.target:.3f})",
                flush=True,
            )
            if acc >= self.target - 1e-9 and self.reached is None:
                self.reached = point
            recent = [c["accuracy"] for c in self.curve[1:][-args.stop_window :]]
            if (
                not args.fixed_budget
                and len(recent) == args.stop_window
                and sum(recent) / len(recent) >= self.target - 1e-9
            ):
                self.stop_reason, control.should_training_stop = "target", True
            elif out_of_time:
                self.stop_reason, control.should_training_stop = "max_rl_seconds", True
            return control

    return HeldOutEval()


def grpo_config(args, out_dir: str):
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=out_dir,
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=args.seed,
        data_seed=args.seed,
        # A generation batch is prompts_per_step groups, split into updates_per_batch optimizer steps
        # (TRL's steps_per_generation); each completion is trained on once (num_iterations=1).
        per_device_train_batch_size=args.prompts_per_step * args.group_size // args.updates_per_batch,
        steps_per_generation=args.updates_per_batch,
        gradient_accumulation_steps=1,
        num_generations=args.group_size,
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature,
        beta=args.beta,
        learning_rate=args.lr,
        # The default linear decay to 0 over max_steps would tie the lr to an arbitrary step cap.
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_steps=args.max_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_steps=args.eval_every_steps,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, tokenizer


def versions() -> dict:
    import transformers
    import trl

    return {
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


def run(args: argparse.Namespace) -> dict:
    from trl import GRPOTrainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load_avg_start = os.getloadavg()
    model, tokenizer = load(args.model_dir)
    renderer = Renderer.from_pretrained(RenderConfig.model_validate_json(args.render_json), args.model_dir)
    task = make_task(task_config(args.task_json), renderer)
    t0 = time.perf_counter()
    initial = greedy_accuracy(model, renderer, task.eval_set(), args.max_new_tokens, task.score)
    initial_eval_s = time.perf_counter() - t0
    print(f"[trl_baseline] initial held-out accuracy {initial:.3f} ({initial_eval_s:.1f}s)", flush=True)
    t_setup = time.perf_counter()
    batches = -(-args.max_steps // args.updates_per_batch)
    dataset = build_dataset(task, renderer, batches * args.prompts_per_step, args.seed)
    callback = make_callback(task, renderer, args, initial)
    with tempfile.TemporaryDirectory(prefix="trl_baseline_") as out_dir:
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[verifier_reward(task)],
            args=grpo_config(args, out_dir),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[callback],
        )
        gen, rollout, counter = Stopwatch(), Stopwatch(), TokenCounter()
        trainer._generate_single_turn = gen.wrap(trainer._generate_single_turn)
        trainer._generate_and_score_completions = rollout.wrap(counter.wrap(trainer._generate_and_score_completions))
        setup_s = time.perf_counter() - t_setup
        trainer.train()
        threads_in_use = torch.get_num_threads()
        log_history = trainer.state.log_history
    return report(
        args,
        task,
        callback,
        gen,
        rollout,
        initial,
        initial_eval_s,
        setup_s,
        threads_in_use,
        load_avg_start,
        log_history,
        counter.tokens,
    )


def report(
    args,
    task,
    cb,
    gen,
    rollout,
    initial,
    initial_eval_s,
    setup_s,
    threads_in_use,
    load_avg_start,
    log_history,
    generated_tokens,
) -> dict:
    steps = len(cb.step_seconds)
    step_total, step_cpu_total = sum(cb.step_seconds), sum(cb.step_cpu_seconds)

    def per_step(s):
        return round(s / steps, 4) if steps else None

    def per_batch(s):
        return round(s / rollout.calls, 4) if rollout.calls else None

    completions = rollout.calls * args.prompts_per_step * args.group_size
    return {
        "system": "trl.GRPOTrainer (HF generate, CPU)",
        "versions": versions(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "task": task.cfg.model_dump(mode="json"),
        "initial_accuracy": initial,
        "target_accuracy": initial + args.target_gain,
        "final_accuracy": cb.curve[-1]["accuracy"],
        "best_accuracy": max(pt["accuracy"] for pt in cb.curve),
        "reached_target": cb.reached is not None,
        "rl_seconds_to_target": cb.reached["rl_seconds"] if cb.reached else None,
        "rl_cpu_seconds_to_target": cb.reached["rl_cpu_seconds"] if cb.reached else None,
        "steps_to_target": cb.reached["step"] if cb.reached else None,
        "stop_reason": cb.stop_reason,
        "steps": steps,
        "sampled_batches": rollout.calls,
        "completions_sampled": completions,
        "generated_tokens": generated_tokens,
        "generation_seconds_total": round(gen.seconds, 3),
        "rollout_seconds_total": round(rollout.seconds, 3),
        "step_seconds_total": round(step_total, 3),
        "rl_seconds_total": round(cb.rl_seconds(), 3) if cb.t_begin else 0.0,
        "rl_cpu_seconds_total": round(cb.rl_cpu_seconds(), 3) if cb.t_begin else 0.0,
        "eval_seconds_total": round(cb.eval_seconds + initial_eval_s, 3),
        "setup_seconds": round(setup_s, 3),
        "per_step_seconds": {
            "step": per_step(step_total),
            "generation": per_step(gen.seconds),
            "rollout_incl_reward_and_advantages": per_step(rollout.seconds),
            "training": per_step(step_total - rollout.seconds),
        },
        # One sampled batch = prompts_per_step groups = updates_per_batch optimizer steps (same as per-step when 1).
        "per_sampled_batch_seconds": {
            "total": per_batch(step_total),
            "generation": per_batch(gen.seconds),
            "training": per_batch(step_total - rollout.seconds),
        },
        "per_step_cpu_seconds": {
            "step": per_step(step_cpu_total),
            "generation": per_step(gen.cpu_seconds),
            "rollout_incl_reward_and_advantages": per_step(rollout.cpu_seconds),
            "training": per_step(step_cpu_total - rollout.cpu_seconds),
        },
        "threads": threads_in_use,
        "load_avg_at_start": load_avg_start,
        "accuracy_curve": cb.curve,
        "train_log": [
            {
                k: v
                for k, v in row.items()
                if k in ("step", "reward", "reward_std", "loss", "entropy", "completions/mean_length", "learning_rate")
            }
            for row in log_history
        ],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not (args.model_dir / "config.json").exists():
        sys.exit(
            f"--model-dir {args.model_dir} has no config.json; build one with learner.tiny_model "
            "(or learner.sft.cold_start) first"
        )
    if (args.prompts_per_step * args.group_size) % args.updates_per_batch:
        sys.exit(
            f"--updates-per-batch {args.updates_per_batch} must divide prompts_per_step*group_size "
            f"= {args.prompts_per_step * args.group_size}"
        )
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(
        f"[trl_baseline] wrote {args.out}: initial {result['initial_accuracy']:.3f} final "
        f"{result['final_accuracy']:.3f} rl_seconds_to_target {result['rl_seconds_to_target']} "
        f"steps {result['steps']} per-step {result['per_step_seconds']}",
        flush=True,
    )


if __name__ == "__main__":
    main()
