"""`ReplayShard`: one Ray actor around a `replay.table.ReplayTable`.

Contract: the actor is threaded (`max_concurrency`); one condition variable serialises every table
call, so an insert proceeds while a `sample(timeout_s=...)` waits for data, and a sample wakes
inserts blocked by back-pressure. `insert` waits up to `cfg.insert_timeout_s` for room (on_full="block"
or the rate limiter), then inserts what fits and rejects the rest with a reason — it never blocks
forever and never drops an acknowledged group. With `cfg.segment_dir` set, a restarted actor (Ray
`max_restarts`) rebuilds its table from disk in `__init__`.

A draw may carry the caller's `draw_id`. If this process dies after journalling the draw but before the
reply reaches the caller, the restarted actor hands the same groups back once through `reclaim_split` /
`reclaim` (`ReplayTable.reclaim`); a draw that was not journalled left its groups in replay.
"""

from __future__ import annotations

import os
import threading
import time

import pyarrow as pa
import pyarrow.compute as pc
import ray

from replay.config import ReplayConfig
from replay.parts import empty_meta, split_for_ranks
from replay.schema import schema_problem
from replay.table import InsertResult, ReplayStats, ReplayTable, SampleResult
from services import faults, metrics

MAX_CONCURRENCY = 16


def _demand(batch: pa.RecordBatch) -> tuple[int, int, int]:
    """(groups, traces, prompt + completion tokens) a batch asks room for; zeros if its schema is wrong
    (the table then rejects it with the reason)."""
    if schema_problem(batch) is not None:
        return 0, 0, 0
    tokens = sum(pc.sum(pc.list_value_length(batch[c])).as_py() or 0 for c in ("prompt_ids", "completion_ids"))
    return pc.count_distinct(batch["group_id"]).as_py(), batch.num_rows, tokens


def _traces_per_group(batch: pa.RecordBatch) -> dict[str, int]:
    if "group_id" not in batch.schema.names:
        return {}
    counts = pc.value_counts(batch["group_id"])
    return dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))


@ray.remote(num_cpus=0, max_concurrency=MAX_CONCURRENCY)
class ReplayShard:
    def __init__(self, cfg: ReplayConfig, shard_id: int):
        self._cfg = cfg
        self._table = ReplayTable(cfg, shard_id)
        self._cond = threading.Condition()
        self._meter = metrics.ReplayMeter(shard_id, cfg.max_staleness, self._table.stats())
        self._meter_lock = threading.Lock()  # the meter keeps the last stats: one writer at a time

    def insert(self, batch: pa.RecordBatch) -> InsertResult:
        demand = _demand(batch)
        blocked_s = None
        with self._cond:
            if self._table.can_accept_ever(*demand):
                t0 = time.monotonic()
                self._cond.wait_for(lambda: self._table.can_accept(*demand), self._cfg.insert_timeout_s)
                blocked_s = time.monotonic() - t0
            result = self._table.insert(batch)
            stats = self._table.stats()
            self._cond.notify_all()
        with self._meter_lock:
            if blocked_s is not None:
                self._meter.on_insert_blocked(blocked_s)
            self._meter.update(stats)
        if result.rejected:
            metrics.record_rejected(self._table.shard_id, result, _traces_per_group(batch))
        return result

    def sample(
        self, n_groups: int, policy_version: int, timeout_s: float = 0.0, draw_id: str | None = None
    ) -> SampleResult | None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                result = self._table.sample(n_groups, policy_version, draw_id)
                remaining = deadline - time.monotonic()
                if result is not None or remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._cond.notify_all()  # a sample frees room and rate-limiter budget for blocked inserts
            stats = self._table.stats()
        if result is not None:
            faults.shard_draw_hook(self._table.shard_id)  # test hook (kill -9 here); production: a no-op
        self._record_sample(result, stats)
        return result

    def draw(self, n_groups: int, policy_version: int, draw_id: str | None = None) -> tuple[SampleResult | None, int]:
        """A non-waiting sample plus how many groups this shard could still give (for the client's plan)."""
        with self._cond:
            result = self._table.sample(n_groups, policy_version, draw_id)
            left = self._table.available(policy_version)
            if result is not None:
                self._cond.notify_all()
            stats = self._table.stats()
        if result is not None:
            faults.shard_draw_hook(self._table.shard_id)
        self._record_sample(result, stats)
        return result, left

    def draw_split(
        self,
        n_groups: int,
        policy_version: int,
        ranks: int,
        timeout_s: float = 0.0,
        first_part: int = 0,
        draw_id: str | None = None,
    ) -> tuple:
        """Sample (waiting up to `timeout_s`) and cut the draw into `ranks` token-balanced parts.

        Call with `.options(num_returns=1 + ranks)`: the first return is a `SampleMeta` (ids and sizes,
        what the caller `ray.get`s), each other one a `RankPart` or None, which stays in this process's
        object store until the rank that gets the ref resolves it (replay/parts.py).
        """
        result = self.sample(n_groups, policy_version, timeout_s, draw_id)
        return self._split(result, policy_version, ranks, first_part)

    def reclaim(self, draw_id: str, policy_version: int) -> tuple[SampleResult | None, int]:
        """`draw`'s answer for a draw journalled by this shard's previous process (None if it was not)."""
        with self._cond:
            result = self._table.reclaim(draw_id, policy_version)
            left = self._table.available(policy_version)
        return result, left

    def reclaim_split(self, draw_id: str, policy_version: int, ranks: int, first_part: int = 0) -> tuple:
        """`draw_split`'s answer for a draw journalled by this shard's previous process (empty if it was not)."""
        with self._cond:
            result = self._table.reclaim(draw_id, policy_version)
        return self._split(result, policy_version, ranks, first_part)

    def _split(self, result: SampleResult | None, policy_version: int, ranks: int, first_part: int) -> tuple:
        with self._cond:
            left = self._table.available(policy_version)
        if result is None:
            return (empty_meta(ranks, left),) + (None,) * ranks
        meta, parts = split_for_ranks(result, ranks, left, first_part)
        return (meta, *parts)

    def _record_sample(self, result: SampleResult | None, stats: ReplayStats) -> None:
        """Metrics after the table's lock is released (per-trace ages are not worth blocking inserts for)."""
        with self._meter_lock:
            if result is not None:
                self._meter.on_sample(result.staleness, result.batch.column("created_at").to_pylist(), time.time())
            self._meter.update(stats)

    def available(self, policy_version: int) -> int:
        with self._cond:
            left = self._table.available(policy_version)  # may evict stale groups
            stats = self._table.stats()
        with self._meter_lock:
            self._meter.update(stats)
        return left

    def evict_newer(self, policy_version: int) -> int:
        """Resume: evict groups sampled by policies newer than the checkpoint's (`ReplayTable.evict_newer`)."""
        with self._cond:
            n = self._table.evict_newer(policy_version)
            stats = self._table.stats()
            self._cond.notify_all()  # room freed for blocked inserts
        with self._meter_lock:
            self._meter.update(stats)
        return n

    def update_priorities(self, group_ids: list[str], priorities: list[float]) -> int:
        with self._cond:
            return self._table.update_priorities(group_ids, priorities)

    def stats(self) -> ReplayStats:
        with self._cond:
            return self._table.stats()

    def checkpoint(self) -> str:
        with self._cond:
            return self._table.checkpoint()

    def close(self) -> None:
        with self._cond:
            self._table.close()

    def arrow_allocated_bytes(self) -> int:
        """Bytes Arrow's memory pool holds in this process now (the table's data plus any temporaries)."""
        return pa.total_allocated_bytes()

    def pid(self) -> int:
        """The actor's process id (fault tests kill -9 it)."""
        return os.getpid()
