"""What reward-model and DPO training share: the optimiser section, pair batches, a one-process DeepSpeed engine.

Contract:
- `PairTrainConfig` is the optimiser/batching section of both trainers (pairs per step, AdamW, warm-up,
  clipping, ZeRO stage, held-out evaluation cadence).
- `pack_sequences(prompts, completions, pad_id)` lays out sequences like `learner.batch.collate`: prompts
  left-padded to a common width P, completions right-padded after column P, so `Tokens` and
  `learner.logprobs.completion_outputs` apply unchanged.
- `pair_tokens(pairs, pad_id)` stacks chosen rows [0, B) then rejected rows [B, 2B) in one batch, so both
  halves of a pair go through the same forward (and the same dropout-free numerics).
- `deepspeed_engine(module, cfg)` wraps a module in a DeepSpeed engine (gloo, one rank unless the
  process was started as a rank of a larger group) with torch AdamW (no fused-op build on CPU).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from learner.batch import Tokens


class PairTrainConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    steps: int = Field(200, ge=1, description="optimiser steps; each sees `pairs_per_step` pairs")
    pairs_per_step: int = Field(16, ge=1, description="preference pairs per optimiser step")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate after warm-up (RMs: 1e-5..1e-4 at this size)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(10, ge=0, description="steps of linear learning-rate warm-up")
    grad_clip: float = Field(1.0, gt=0, description="clip the global gradient norm of each step to this")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage (raise for models that do not fit)")
    eval_every_steps: int = Field(25, ge=1, description="evaluate on the held-out pairs this often (and at the end)")
    eval_batch_pairs: int = Field(64, ge=1, description="held-out pairs per evaluation forward pass")
    seed: int = Field(0, description="seeds the pair order and the new head's initialisation")


def pack_sequences(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int) -> Tokens:
    """`Tokens` of `[B, P+T]` sequences: prompts left-padded to P, completions right-padded from column P."""
    p, t = max(map(len, prompts)), max(map(len, completions))
    b = len(prompts)
    input_ids = torch.full((b, p + t), pad_id, dtype=torch.long)
    attention = torch.zeros((b, p + t), dtype=torch.long)
    for i, (pr, co) in enumerate(zip(prompts, completions)):
        input_ids[i, p - len(pr) : p] = torch.tensor(pr, dtype=torch.long)
        input_ids[i, p : p + len(co)] = torch.tensor(co, dtype=torch.long)
        attention[i, p - len(pr) : p + len(co)] = 1
    mask = attention[:, p:].float()
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return Tokens(input_ids, attention, positions, input_ids[:, p:], mask)


def pair_tokens(pairs: Sequence, pad_id: int) -> Tokens:
    """Chosen sequences in rows [0, B), rejected in [B, 2B) (pairs: `rollout.preferences.PreferencePair`)."""
    prompts = [p.prompt_ids for p in pairs] * 2
    completions = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    return pack_sequences(prompts, completions, pad_id)


def pair_batches(pairs: Sequence, size: int, seed: int) -> Iterator[list]:
    """Endless batches of `size` pairs, each pass a fresh seeded shuffle."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(pairs), generator=g).tolist()
        for start in range(0, max(1, len(order) - size + 1), size):
            yield [pairs[i] for i in order[start : start + size]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_engine(module: torch.nn.Module, cfg: PairTrainConfig):
    """(engine, scheduler): `module` under DeepSpeed with AdamW and linear warm-up; one gloo rank by default."""
    import deepspeed

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, cfg.warmup_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, _, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
    )
    return engine, scheduler
