"""`ReplayConfig`: how one replay table samples, removes, limits and persists groups.

All counts are in GRPO groups (the unit of insert, sample and eviction) unless the name says
traces or tokens. Tokens are prompt + completion tokens. With `num_shards > 1` every limit
(capacity, `min_size_to_sample`, the rate limiter) applies per shard, as in Reverb.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ReplayConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    num_shards: int = Field(
        1, ge=1, description="replay shards (Ray actors); more spread insert/sample load; each limit applies per shard"
    )
    sampler: Literal["fifo", "uniform", "prioritized", "lifo"] = Field(
        "fifo",
        description="which held groups a sample takes: oldest first, uniformly, by priority (PER), or newest first",
    )
    # Remover: a group is removed after being sampled this many times; None = only capacity/staleness remove.
    max_times_sampled: int | None = Field(
        1, ge=1, description="remove a group after this many samples (1 = on-policy-style use once; null = never)"
    )
    capacity_groups: int = Field(4096, ge=1, description="most groups a shard holds")
    capacity_traces: int | None = Field(None, ge=1, description="most traces a shard holds (null = no limit)")
    capacity_tokens: int | None = Field(
        None, ge=1, description="most prompt + completion tokens a shard holds (null = no limit)"
    )
    on_full: Literal["block", "evict_oldest"] = Field(
        "evict_oldest", description="a full shard evicts its oldest group, or blocks inserts up to insert_timeout_s"
    )
    insert_timeout_s: float = Field(
        30.0, ge=0.0, description="on_full=block: how long an insert waits for room before it is rejected"
    )
    # A group whose shard is down (Ray restarting it) is re-sent for up to this long before it is rejected.
    insert_retry_s: float = Field(
        60.0, ge=0.0, description="how long a group is re-sent to a shard that is down (restarting) before rejection"
    )
    # A shard killed between journalling a draw and replying is waited for, then asked for that draw back.
    reclaim_timeout_s: float = Field(
        60.0,
        ge=0.0,
        description="how long the learner's sampler waits for a shard that died mid-draw to restart and hand "
        "the draw's groups back; past it they are counted as unrecovered draws (raise it if restores are slow)",
    )
    # Rate limiter (Reverb's SampleToInsertRatio): sample only when >= min_size_to_sample groups are held,
    # and keep inserts * samples_per_insert - samples within error_buffer of its start value.
    min_size_to_sample: int = Field(1, ge=1, description="sampling waits until a shard holds this many groups")
    samples_per_insert: float | None = Field(
        None,
        gt=0.0,
        description="rate limiter (Reverb's SampleToInsertRatio): samples per inserted group, kept within "
        "error_buffer; null = no ratio (sampling is limited by what is held)",
    )
    error_buffer: float = Field(512.0, gt=0.0, description="rate limiter slack around samples_per_insert")
    # Staleness in policy versions: learner's policy_version - group's oldest policy_version.
    max_staleness: int | None = Field(
        4,
        ge=0,
        description="most policy versions a sampled group may lag the learner (0 = synchronous on-policy; "
        "null = unbounded); lower = more on-policy, more rollout idle",
    )
    stale_policy: Literal["evict", "downweight"] = Field(
        "evict", description="groups past max_staleness are evicted, or kept and down-weighted in the loss"
    )
    # downweight: a group `s` versions past max_staleness is weighted stale_weight_decay ** s.
    stale_weight_decay: float = Field(
        0.5, gt=0.0, le=1.0, description="stale_policy=downweight: weight decay ** (versions past max_staleness)"
    )
    hard_max_staleness: int | None = Field(
        None,
        ge=0,
        description="stale_policy=downweight only: a group more than this many policy versions stale is evicted "
        "(down-weighting alone never bounds how old the data gets). None = 2 * max_staleness. Raise it to keep "
        "down-weighted data longer; it must be >= max_staleness",
    )
    # Prioritized sampling (Schaul et al., PER): P(i) ∝ p_i^priority_exponent, weight (N P(i))^-importance_exponent.
    priority_exponent: float = Field(1.0, ge=0.0, description="sampler=prioritized: P(i) ∝ priority^this (0 = uniform)")
    importance_exponent: float = Field(
        0.4, ge=0.0, description="sampler=prioritized: importance weight (N P(i))^-this corrects the sampling bias"
    )
    priority_epsilon: float = Field(1e-3, gt=0.0, description="sampler=prioritized: floor added to every priority")
    # Persistence: each shard journals under segment_dir/shard-<id>/ (replay/segments.py).
    segment_dir: str | None = Field(
        None,
        description="journal directory (each shard under shard-<id>/); null = the run's replay/ directory, "
        "so acknowledged traces survive a crash and the run's traces form a dataset",
    )
    segment_bytes: int = Field(64 << 20, ge=1 << 16, description="a journal segment is sealed at this size")
    fsync: bool = Field(
        True,
        description="fsync every journal append before it is acknowledged, so an acknowledged trace survives a "
        "power loss or kernel crash, not only a killed process (tests/bench/replay.py measures the cost); "
        "False keeps process-crash safety only, for local experiments on slow disks",
    )
    prune_traces: bool = Field(
        False,
        description="also delete sealed traces segments that no kept checkpoint needs (run.keep_checkpoints); "
        "False keeps them as the run's dataset (read_dataset). Turn on when disk, not the dataset, matters",
    )
    seed: int = Field(0, description="seeds uniform and prioritized sampling")

    @model_validator(mode="after")
    def _rate_limiter_can_progress(self) -> ReplayConfig:
        spi = self.samples_per_insert
        if spi is not None and self.error_buffer < max(1.0, spi):
            raise ValueError(
                f"replay.error_buffer={self.error_buffer} < max(1, samples_per_insert={spi}); "
                "the rate limiter would deadlock: raise error_buffer (it must admit one insert and one sample)"
            )
        if self.min_size_to_sample > self.capacity_groups:
            raise ValueError(
                f"replay.min_size_to_sample={self.min_size_to_sample} > capacity_groups={self.capacity_groups}; "
                "sampling could never start: lower min_size_to_sample or raise capacity_groups"
            )
        return self

    @model_validator(mode="after")
    def _hard_bound(self) -> ReplayConfig:
        h = self.hard_max_staleness
        if h is None:
            return self
        if self.stale_policy != "downweight" or self.max_staleness is None:
            raise ValueError(
                f"replay.hard_max_staleness={h} applies only with stale_policy='downweight' and a max_staleness; "
                "with 'evict' max_staleness is already the hard bound: remove hard_max_staleness"
            )
        if h < self.max_staleness:
            raise ValueError(
                f"replay.hard_max_staleness={h} < max_staleness={self.max_staleness}: groups would be evicted before "
                "they are ever down-weighted; set hard_max_staleness >= max_staleness"
            )
        return self

    @property
    def eviction_staleness(self) -> int | None:
        """Staleness past which a group is evicted: max_staleness (evict) or the hard bound (downweight)."""
        if self.max_staleness is None:
            return None
        if self.stale_policy == "evict":
            return self.max_staleness
        return self.hard_max_staleness if self.hard_max_staleness is not None else 2 * self.max_staleness
