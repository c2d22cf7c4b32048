"""Supervised cold start: a short teacher-forced run on task problems before RL.

Contract:
- Each example is `encode_prompt(prompt) + answer ids + [<eos>]` (rollout.evaluation.encode_prompt, so
  the model sees exactly the ids rollout feeds it); the loss covers only the answer and `<eos>` tokens.
- Problems come from `task.train_stream(seed=cfg.seed)`, never the eval split; with `torch.manual_seed
  (cfg.seed)` and one thread the run is deterministic for a seed.
- The cold start is stopped early on purpose (DeepSeek-R1 style): it teaches the output format and
  some skill, leaving room for RL to improve held-out accuracy.
- `cold_start` caches: `out_dir/flywheel_sft.json` records (base model hash, task config, SFT config)
  and is written last, so a directory holding it is a finished checkpoint for exactly that key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from rollout.evaluation import encode_prompt
from rollout.tasks import ArithmeticTask, Problem

log = logging.getLogger(__name__)
MARKER = "flywheel_sft.json"


class SFTConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    # Defaults: a deliberately short cold start for the default task/model (tests/bench/recipe_probe.py);
    # the cosine anneal makes the end point far less noisy across seeds than a constant lr.
    steps: int = Field(300, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0.0)
    warmup_steps: int = Field(20, ge=0)
    schedule: Literal["constant", "cosine"] = "cosine"
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    seed: int = 0


def sft_batch(tokenizer, problems: Sequence[Problem]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids [B, T]`, `labels [B, T]` (-100 off the answer+eos) and `attention_mask [B, T]`."""
    rows, targets = [], []
    for p in problems:
        prompt = encode_prompt(tokenizer, p.prompt)
        answer = [*tokenizer.encode(p.answer, add_special_tokens=False), tokenizer.eos_token_id]
        rows.append(prompt + answer)
        targets.append([-100] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, tgt) in enumerate(zip(rows, targets)):
        ids[i, : len(row)], labels[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), torch.tensor(tgt), 1
    return ids, labels, mask


def lr_factor(step: int, cfg: SFTConfig) -> float:
    """Linear warmup over `warmup_steps`, then constant or cosine decay to 10% at `steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _batches(stream: Iterator[Problem], batch_size: int) -> Iterator[list[Problem]]:
    while True:
        yield [next(stream) for _ in range(batch_size)]


def train_sft(
    model, tokenizer, problems: Iterable[Problem], cfg: SFTConfig, on_step: Callable[[int, float], None] | None = None
) -> list[float]:
    """Run `cfg.steps` AdamW steps on `problems` (in order); returns the per-step mean token loss.

    `on_step(step, loss)` is called after every optimizer step (e.g. a probe evaluating mid-run).
    """
    torch.manual_seed(cfg.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    losses: list[float] = []
    for step, batch in zip(range(cfg.steps), _batches(iter(problems), cfg.batch_size)):
        ids, labels, mask = sft_batch(tokenizer, batch)
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


def _base_hash(base_model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        path = base_model_dir / name
        if not path.exists():
            raise FileNotFoundError(f"{path} missing; build the base model first (learner.tiny_model.build_tiny_model)")
        h.update(path.read_bytes())
    return h.hexdigest()


def _cache_key(base_model_dir: Path, task: ArithmeticTask, cfg: SFTConfig) -> dict:
    return {
        "base_model_sha256": _base_hash(base_model_dir),
        "task": task.cfg.model_dump(mode="json"),
        "sft": cfg.model_dump(mode="json"),
    }


def cold_start(
    base_model_dir: Path,
    out_dir: Path,
    task: ArithmeticTask,
    cfg: SFTConfig,
    threads: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """SFT `base_model_dir` on `task` and save model + tokenizer (HF format) to `out_dir`; cached by key.

    `on_step(step, loss)` is forwarded to `train_sft` (the driver draws a progress bar with it).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_model_dir, out_dir = Path(base_model_dir), Path(out_dir)
    key = _cache_key(base_model_dir, task, cfg)
    marker = out_dir / MARKER
    if marker.exists() and json.loads(marker.read_text()).get("key") == key:
        return out_dir
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
        model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
        losses = train_sft(model, tokenizer, task.train_stream(seed=cfg.seed), cfg, on_step=on_step)
    finally:
        torch.set_num_threads(previous_threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    marker.write_text(json.dumps({"key": key, "final_loss": losses[-1]}, indent=1))
    return out_dir
