"""Schedule-Free AdamW for the learner (Defazio et al., "The Road Less Scheduled", arXiv:2405.15682; the
optimiser of RPG, arXiv:2505.17508): no learning-rate schedule, an averaged iterate instead.

Contract: Schedule-Free keeps two parameter sets. Gradients are taken at the interpolation y (what the model
holds in "train" mode); the point to evaluate and serve is the average x ("eval" mode), with
x = y + (1 - 1/beta1) (z - y) for the optimiser's state z. `ClippedScheduleFreeAdamW` starts in train mode;
given `max_norm` it clips by the global gradient norm like the learner's `_ClippedAdamW` (a non-finite norm
skips the step and sets `overflow`, which DeepSpeed honours); with `max_norm=None` DeepSpeed's ZeRO/bf16
wrapper clips by the global norm before calling it. `eval_parameters(optimizer)` makes the model hold x for
the duration of a `with` block (weights published to rollout, the saved final model), then y again; for any
other optimiser it does nothing.

Where the weights live: at ZeRO-0 (fp32 or autocast) DeepSpeed hands the client optimiser the model's own
parameters. Under ZeRO-1/2 and DeepSpeed's bf16 master weights it steps flat fp32 partitions of this rank's
share (the model holds a copy, all-gathered after each step), and under ZeRO-3 flat fp32 partitions whose
model copy is itself partitioned. So the swap is Schedule-Free's own in-place lerp applied to the tensors the
optimiser steps (`_master_partitions`), after which the model is refreshed the way DeepSpeed does after a step
(`_refresh_model`: partition -> model copy plus all-gather; under ZeRO-3 only the persistent small parameters
are gathered, the rest stay partitioned until a consumer gathers them). With >1 rank the block is therefore
collective: every rank must enter it at the same point. The lerp round trip x -> y restores y to fp32
rounding (about one ulp of |z - y|), as in the `schedulefree` package's own eval()/train().

Checkpoints hold y (train mode): restoring them continues bit for bit; a checkpoint written in eval mode is
swapped back to y on load. DeepSpeed's CPU/NVMe offload and fp16 loss scaling are not supported here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import schedulefree
import torch


class ClippedScheduleFreeAdamW(schedulefree.AdamWScheduleFree):
    """AdamWScheduleFree in train mode from the start, clipping by the global gradient norm when `max_norm` is set
    (ZeRO-0; the norm is kept for diagnostics). `max_norm=None`: DeepSpeed's ZeRO/bf16 wrapper has clipped."""

    def __init__(self, params, max_norm: float | None, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm, self._global_grad_norm, self.overflow = max_norm, None, False
        for group in self.param_groups:  # train mode; no z yet, so nothing to swap (train() would add empty
            group["train_mode"] = True  # state entries for tensors ZeRO replaces, breaking its state_dict)

    def step(self, closure=None):
        if self.max_norm is None:
            return super().step(closure)
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        self._global_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_norm))
        self.overflow = not math.isfinite(self._global_grad_norm)
        return None if self.overflow else super().step(closure)


def schedule_free_of(optimizer) -> schedulefree.AdamWScheduleFree | None:
    """The Schedule-Free optimiser behind `optimizer`: itself (ZeRO-0) or the one a DeepSpeed wrapper steps."""
    for candidate in (optimizer, getattr(optimizer, "optimizer", None)):
        if isinstance(candidate, schedulefree.AdamWScheduleFree):
            return candidate
    return None


def is_schedule_free(optimizer) -> bool:
    return schedule_free_of(optimizer) is not None


def _master_partitions(optimizer) -> list[tuple[torch.Tensor, dict]]:
    """(tensor the Schedule-Free optimiser steps, its param group) for this rank, whatever DeepSpeed wraps it in."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    sf = schedule_free_of(optimizer)
    if optimizer is sf:  # ZeRO-0: the model's own parameters
        return [(p, g) for g in sf.param_groups for p in g["params"]]
    if isinstance(optimizer, DeepSpeedZeroOptimizer):  # ZeRO-1/2: partition i belongs to param group i
        return list(zip(optimizer.single_partition_of_fp32_groups, sf.param_groups))
    if isinstance(optimizer, BF16_Optimizer):  # bf16 master weights at ZeRO-1
        return list(zip(optimizer.fp32_groups_flat_partition, sf.param_groups))
    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):  # sub-groups; `params` is emptied between steps
        groups = [
            sf.param_groups[optimizer.sub_group_to_group_id[i]]
            for i in range(len(optimizer.fp32_partitioned_groups_flat))
        ]
        return list(zip(optimizer.fp32_partitioned_groups_flat, groups))
    raise TypeError(
        f"Schedule-Free under {type(optimizer).__name__} is not supported (use ZeRO-0/1/2/3 without offload)"
    )


def _refresh_model(optimizer) -> None:
    """Copy the optimiser's partitions into the model's parameters, as DeepSpeed does after its step."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    if optimizer is schedule_free_of(optimizer):
        return  # ZeRO-0: the swap already acted on the model's parameters
    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        for i in range(len(optimizer.fp32_partitioned_groups_flat)):
            optimizer._reassign_or_swap_out_partitioned_parameters(i)  # fp32 -> model dtype partition
        persistent = optimizer.persistent_parameters  # small parameters ZeRO-3 keeps whole on every rank:
        if persistent:  # drop their stale whole copies, then gather them again from the refreshed partitions
            persistent[0].partition(persistent)
            persistent[0].all_gather(persistent)
        return
    optimizer.update_lp_params()  # ZeRO-1/2 and bf16: partition -> model copy, then all-gather


@torch.no_grad()
def _swap(optimizer, to_train: bool) -> None:
    """Schedule-Free's eval()/train() lerp toward z on the tensors it steps, then the model refreshed from them."""
    sf = schedule_free_of(optimizer)
    for p, group in _master_partitions(optimizer):
        z = sf.state.get(p, {}).get("z")
        if z is not None and group["train_mode"] != to_train:
            beta1 = group["betas"][0]
            p.lerp_(end=z.to(p.device), weight=1 - beta1 if to_train else 1 - 1 / beta1)
    for group in sf.param_groups:
        group["train_mode"] = to_train
    _refresh_model(optimizer)


def ensure_train_mode(optimizer) -> None:
    """Back to y if the optimiser is in eval mode (e.g. a checkpoint written at x); collective with >1 rank."""
    sf = schedule_free_of(optimizer)
    if sf is not None and not sf.param_groups[0]["train_mode"]:
        _swap(optimizer, to_train=True)


@contextlib.contextmanager
def eval_parameters(optimizer) -> Iterator[None]:
    """Inside the block the model holds Schedule-Free's averaged x (the evaluation point); y again after it.

    `optimizer` is what DeepSpeed returned (its ZeRO/bf16 wrapper, or the client optimiser at ZeRO-0). With
    more than one rank every rank must enter and leave the block together (the refresh all-gathers)."""
    sf = schedule_free_of(optimizer)
    if sf is None or not sf.param_groups[0]["train_mode"]:
        yield
        return
    _swap(optimizer, to_train=False)
    try:
        yield
    finally:
        _swap(optimizer, to_train=True)
