"""Schedule-Free AdamW for the learner (Defazio et al., "The Road Less Scheduled", arXiv:2405.15682; the
optimiser of RPG, arXiv:2505.17508): no learning-rate schedule, an averaged iterate instead.

Contract: Schedule-Free keeps two parameter sets. Gradients are taken at the interpolation y (what the model
holds in "train" mode); the point to evaluate, checkpoint and serve is the average x ("eval" mode).
`ClippedScheduleFreeAdamW` starts in train mode, clips by the global gradient norm like the learner's
`_ClippedAdamW` (a non-finite norm skips the step and sets `overflow`, which DeepSpeed honours), and
`eval_parameters(optimizer)` swaps the model's parameters to x for the duration of a `with` block (weights
published to rollout, the saved model, checkpoints), then back to y; for any other optimiser it does nothing.

The swap is an in-place lerp of each parameter toward the optimiser's `z` state, so it must see the very
tensors the model holds: true at ZeRO-0 with fp32 weights (or autocast), where DeepSpeed hands the client
optimiser the model's parameters. ZeRO-1/2/3 and DeepSpeed's bf16/fp16 master copies step flat fp32
partitions instead, so `learner.config` refuses those combinations at start-up.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import schedulefree
import torch


class ClippedScheduleFreeAdamW(schedulefree.AdamWScheduleFree):
    """AdamWScheduleFree with global-norm clipping (the norm kept for diagnostics), in train mode from the start."""

    def __init__(self, params, max_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm, self._global_grad_norm, self.overflow = max_norm, None, False
        self.train()

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        self._global_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_norm))
        self.overflow = not math.isfinite(self._global_grad_norm)
        return None if self.overflow else super().step(closure)


def is_schedule_free(optimizer) -> bool:
    return isinstance(optimizer, schedulefree.AdamWScheduleFree)


@contextlib.contextmanager
def eval_parameters(optimizer) -> Iterator[None]:
    """Inside the block the model holds Schedule-Free's averaged x (the evaluation point); y again after it."""
    if not is_schedule_free(optimizer) or not optimizer.param_groups[0]["train_mode"]:
        yield
        return
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
