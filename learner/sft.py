"""Supervised cold start: a short teacher-forced run before RL, for any tokenizer and either rendering.

Contract:
- An example is a problem and a completion text: the task's reference completion
  (`task.reference_completion`, the answer in the form its verifier reads), a worked solution generated
  for it (`cold_start.worked_solutions`, rollout/worked_solutions.py: steps, then that reference) or a
  worked solution from `cold_start.solutions_path` (JSONL rows `{"prompt": ..., "completion": ...}`). Its ids are
  `renderer.encode_prompt(problem) + renderer.target_ids(problem, completion)` - the prompt exactly as
  rollout feeds it, the completion ending with the stop token that closes the turn - and the loss covers
  only the target ids: with chat rendering, the assistant's tokens and nothing of the template around
  the prompt.
- Training problems come from `task.train_stream(seed=cfg.seed)`; worked solutions whose prompt is in the
  task's eval split are dropped. With `torch.manual_seed(cfg.seed)` and one thread a run is deterministic.
- The cold start is stopped early on purpose (DeepSeek-R1 style): it teaches the output format and some
  skill, leaving room for RL to improve held-out accuracy.
- `cold_start` caches: `out_dir/flywheel_sft.json` records the key (base model files incl. tokenizer,
  task config, render config, SFT config, worked-solutions file hash) and is written last, so a
  directory holding it is a finished checkpoint for exactly that key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from learner.lr_schedule import lr_multiplier
from rollout.datasets import DatasetError
from rollout.problem import Problem
from rollout.render import RenderConfig, Renderer
from rollout.tasks import Task
from rollout.worked_solutions import WORKED_SOLUTIONS

log = logging.getLogger(__name__)
MARKER = "flywheel_sft.json"
Example = tuple[Problem, str]  # (problem, completion text to imitate)


class SFTConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    # Defaults: a deliberately short cold start for the default task/model (tests/bench/recipe_probe.py);
    # the cosine anneal makes the end point far less noisy across seeds than a constant lr.
    steps: int = Field(300, ge=1, description="optimizer steps; keep it short so RL has headroom")
    batch_size: int = Field(64, ge=1, description="examples per step")
    lr: float = Field(3e-3, gt=0.0, description="AdamW peak learning rate")
    warmup_steps: int = Field(20, ge=0, description="linear warmup steps")
    schedule: Literal["constant", "cosine"] = Field("cosine", description="after warmup: constant, or cosine to 10%")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0.0, description="global gradient-norm clip")
    seed: int = Field(0, description="seeds the data order and the torch RNG")
    solutions_path: str | None = Field(
        None,
        description="a JSONL of worked solutions, one {prompt, completion} object per line, to imitate instead of "
        "the task's reference answers (step-by-step text ending in the answer the verifier reads)",
    )
    worked_solutions: Literal["column_addition", "running_sum", "rewrite_chain"] | None = Field(
        None,
        description="generate a worked solution for each training problem (rollout/worked_solutions.py) and "
        "imitate it instead of the bare reference answer; None = the reference answer. column_addition: sums "
        "written digit column by column with carries; running_sum: +/- chains (reasoning_gym chain_sum) one term "
        "per line; rewrite_chain: the same chains rewritten after each step (first two terms replaced by their "
        "result, the rest copied), easier for a small model to learn. Set one so the policy reasons before it "
        "answers and RL has a longer generation to improve",
    )

    @model_validator(mode="after")
    def _one_source(self) -> SFTConfig:
        if self.solutions_path is not None and self.worked_solutions is not None:
            raise ValueError(
                "cold_start.solutions_path and cold_start.worked_solutions both name worked solutions: keep one"
            )
        return self


def sft_batch(renderer: Renderer, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids [B, T]`, `labels [B, T]` (-100 off the target) and `attention_mask [B, T]`."""
    rows, targets = [], []
    for problem, completion in examples:
        prompt, target = renderer.encode_prompt(problem), renderer.target_ids(problem, completion)
        rows.append(prompt + target)
        targets.append([-100] * len(prompt) + target)
    pad = renderer.tokenizer.pad_token_id
    pad = pad if pad is not None else renderer.end_id
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, tgt) in enumerate(zip(rows, targets)):
        ids[i, : len(row)], labels[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), torch.tensor(tgt), 1
    return ids, labels, mask


def lr_factor(step: int, cfg: SFTConfig) -> float:
    """Linear warmup over `warmup_steps`, then constant or cosine decay to 10% at `steps`."""
    return lr_multiplier(step, cfg.warmup_steps, cfg.schedule, cfg.steps, min_ratio=0.1)


def reference_examples(task: Task, seed: int, worked: str | None = None) -> Iterator[Example]:
    """The task's training problems with its verifier's reference completion, or with the generated worked
    solution `worked` (a `rollout.worked_solutions.WORKED_SOLUTIONS` name) ending in that completion."""
    write = None if worked is None else WORKED_SOLUTIONS[worked]
    for problem in task.train_stream(seed=seed):
        reference = task.reference_completion(problem)
        yield problem, reference if write is None else write(problem, reference)


def load_solutions(path: str | Path, eval_keys: set[str], task_name: str = "solutions") -> list[Example]:
    """Worked solutions from JSONL (`{"prompt", "completion"}` per line); rows whose prompt is held out are
    dropped. A malformed row is an error naming the line (this file is the user's own training data)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"cold_start.solutions_path={str(path)!r} is not a file; give a JSONL of worked solutions")
    out, held_out = [], 0
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, completion = row["prompt"], row["completion"]
            if not (isinstance(prompt, str) and isinstance(completion, str) and prompt.strip() and completion.strip()):
                raise TypeError("prompt and completion must be non-empty strings")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DatasetError(
                f"{path}:{line_no}: not a worked solution ({type(e).__name__}: {e}); each line must be "
                '{"prompt": "...", "completion": "..."} (cold_start.solutions_path)'
            ) from None
        if prompt in eval_keys:
            held_out += 1
            continue
        out.append((Problem(prompt=prompt, answer=completion, task=task_name), completion))
    if not out:
        raise DatasetError(f"cold_start.solutions_path={str(path)!r} holds no usable rows ({held_out} held out)")
    if held_out:
        log.info("cold start: %d worked solutions skipped because their prompt is in the eval split", held_out)
    return out


def _cycle_shuffled(examples: list[Example], seed: int) -> Iterator[Example]:
    rng = random.Random(seed)
    while True:
        yield from rng.sample(examples, len(examples))


def training_examples(task: Task, cfg: SFTConfig) -> Iterator[Example]:
    """What the cold start imitates: worked solutions when `cfg.solutions_path` is set, else reference answers."""
    if cfg.solutions_path is None:
        return reference_examples(task, cfg.seed, cfg.worked_solutions)
    eval_keys = {p.key for p in task.eval_set()}
    return _cycle_shuffled(load_solutions(cfg.solutions_path, eval_keys, task.name), cfg.seed)


def _batches(stream: Iterator[Example], batch_size: int) -> Iterator[list[Example]]:
    while True:
        yield [next(stream) for _ in range(batch_size)]


def train_sft(
    model,
    renderer: Renderer,
    examples: Iterable[Example],
    cfg: SFTConfig,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Run `cfg.steps` AdamW steps on `examples` (in order); returns the per-step mean token loss.

    `on_step(step, loss)` is called after every optimizer step (e.g. a probe evaluating mid-run).
    """
    torch.manual_seed(cfg.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    losses: list[float] = []
    for step, batch in zip(range(cfg.steps), _batches(iter(examples), cfg.batch_size)):
        ids, labels, mask = sft_batch(renderer, batch)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
        if step % 50 == 0 or step == cfg.steps - 1:
            log.info("sft step %d/%d loss %.4f", step + 1, cfg.steps, loss.item())
    model.eval()
    return losses


def _file_hash(h, path: Path) -> None:
    h.update(path.name.encode() + b"\0")
    h.update(path.read_bytes())


def _base_hash(base_model_dir: Path) -> str:
    """Weights, config and every tokenizer file: all of them shape what the cold start produces."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        path = base_model_dir / name
        if not path.exists():
            raise FileNotFoundError(f"{path} missing; build the base model first (learner.tiny_model.build_tiny_model)")
        _file_hash(h, path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (base_model_dir / name).exists():
            _file_hash(h, base_model_dir / name)
    return h.hexdigest()


def cache_key(base_model_dir: Path, task: Task, cfg: SFTConfig, render: RenderConfig) -> dict:
    solutions = None
    if cfg.solutions_path is not None and Path(cfg.solutions_path).expanduser().is_file():
        solutions = hashlib.sha256(Path(cfg.solutions_path).expanduser().read_bytes()).hexdigest()
    return {
        "base_model_sha256": _base_hash(base_model_dir),
        # step rewards change RL, not the examples imitated here: runs that differ only in them share a cold start
        "task": task.cfg.model_dump(mode="json", exclude={"step_reward"}),
        "render": render.model_dump(mode="json"),
        "sft": cfg.model_dump(mode="json"),
        "solutions_sha256": solutions,
    }


def cold_start(
    base_model_dir: Path,
    out_dir: Path,
    task: Task,
    cfg: SFTConfig,
    render: RenderConfig | None = None,
    threads: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """SFT `base_model_dir` on `task` and save model + tokenizer (HF format) to `out_dir`; cached by key.

    `on_step(step, loss)` is forwarded to `train_sft` (the driver draws a progress bar with it).
    """
    from transformers import AutoModelForCausalLM

    base_model_dir, out_dir, render = Path(base_model_dir), Path(out_dir), render or RenderConfig()
    key = cache_key(base_model_dir, task, cfg, render)
    marker = out_dir / MARKER
    if marker.exists() and json.loads(marker.read_text()).get("key") == key:
        return out_dir
    renderer = Renderer.from_pretrained(render, base_model_dir)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
        losses = train_sft(model, renderer, training_examples(task, cfg), cfg, on_step=on_step)
    finally:
        torch.set_num_threads(previous_threads)
    return save_cold_start(model, renderer, out_dir, key, losses[-1])


def save_cold_start(model, renderer: Renderer, out_dir: Path, key: dict, final_loss: float) -> Path:
    """Write a cold-started `model` and its tokenizer to `out_dir` under `key` (`cache_key`), so `cold_start`
    with the same inputs returns it instead of training again. The marker goes last: a half-written
    directory is never taken for a finished one."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / MARKER
    marker.unlink(missing_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    renderer.tokenizer.save_pretrained(out_dir)
    marker.write_text(json.dumps({"key": key, "final_loss": final_loss}, indent=1))
    return out_dir
