"""Learning-rate multipliers shared by the RL learner and the SFT cold start.

Contract: `lr_multiplier(step, warmup_steps, schedule, total_steps, min_ratio)` is the factor on the base
learning rate at optimiser step `step` (0-based): linear warm-up over `warmup_steps`, then constant, or a
linear / cosine decay that reaches `min_ratio` at `total_steps` and stays there (the shapes of
`transformers`' `get_linear_schedule_with_warmup` / `get_cosine_schedule_with_warmup`, with a floor).
"""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["constant", "linear", "cosine"]


def lr_multiplier(
    step: int, warmup_steps: int, schedule: Schedule, total_steps: int | None = None, min_ratio: float = 0.0
) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if total_steps is None:
        raise ValueError(f"a {schedule!r} learning-rate decay needs total_steps")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape
