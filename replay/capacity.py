"""Capacity in groups, traces and tokens: whether more fits, and a message naming the limit if not.

Contract: `overflow(cfg, held, adding)` is None iff `held + adding` is within every configured
limit (`capacity_groups`, `capacity_traces`, `capacity_tokens`; None = unbounded), else it names
the first limit that would be exceeded and the config field to raise.
"""

from __future__ import annotations

import dataclasses

from replay.config import ReplayConfig


@dataclasses.dataclass(frozen=True)
class Usage:
    groups: int
    traces: int
    tokens: int


def overflow(cfg: ReplayConfig, held: Usage, adding: Usage) -> str | None:
    limits = (("groups", cfg.capacity_groups), ("traces", cfg.capacity_traces), ("tokens", cfg.capacity_tokens))
    for name, cap in limits:
        now, more = getattr(held, name), getattr(adding, name)
        if cap is not None and now + more > cap:
            return f"{now} {name} held + {more} new > replay.capacity_{name}={cap}"
    return None
