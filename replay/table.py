"""`ReplayTable`: one shard's groups, sampler, remover, capacity, rate limiter and staleness control.

Contract (pure Python + pyarrow, no ray; not thread-safe — `services/replay_shard.py` serialises calls):
- `insert(batch)` takes a `TRACE_SCHEMA` RecordBatch of whole groups. A group with any invalid trace
  (`replay.schema.invalid_rows`), a group_id already held or seen recently, or a group that does not fit
  (capacity with on_full="block", the rate limiter, or larger than the whole capacity) is rejected
  with a reason; every other group of the batch is kept. Groups are stored as slices of one compacted
  Arrow chunk per insert, so memory is the Arrow bytes plus a small per-group index.
- `sample(n_groups, policy_version)` first applies staleness (evict or down-weight groups whose
  `policy_version - min(group policy_version) > max_staleness`; down-weighted groups are still evicted
  past `cfg.eviction_staleness`), then returns every trace of
  `n_groups` distinct groups, or None if fewer are eligible or the rate limiter says no.
  A group leaves after `max_times_sampled` samples, or when evicted (oldest first) to make room.
- `sample(..., draw_id=...)` journals the draw's id with its events; a table restored after a crash hands
  a journalled draw's groups back once with `reclaim(draw_id, policy_version)` (the caller never got them:
  the shard died between journalling the draw and replying), so a shard death loses no sampled group.
- `evict_newer(policy_version)` (a resume) evicts, as stale, every group sampled by a policy newer
  than the checkpoint's: that policy was discarded with the steps after the checkpoint.
- With `cfg.segment_dir` set, every accepted chunk and every removal is appended to disk before the
  call returns (`replay.segments`), and a new table on the same directory restores them.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq

import numpy as np
import pyarrow as pa

from replay.capacity import Usage, overflow
from replay.config import ReplayConfig
from replay.draws import Drawn, RecentDraws
from replay.group_index import Chunk, Group, compact, split_groups
from replay.rate_limiter import RateLimiter
from replay.rejections import RejectReason
from replay.samplers import select
from replay.schema import TraceError, invalid_rows, schema_problem
from replay.segments import Event, Restored, SegmentStore

_RECENT_GROUP_IDS = 1 << 16  # group_ids remembered after removal, to catch a group spread over inserts


@dataclasses.dataclass(frozen=True)
class InsertResult:
    accepted_groups: int
    accepted_traces: int
    rejected: tuple[tuple[str, str], ...]  # (group_id, message for people)
    reasons: tuple[RejectReason, ...] = ()  # one per `rejected` entry, same order


@dataclasses.dataclass(frozen=True)
class SampleResult:
    batch: pa.RecordBatch  # every trace of the sampled groups, TRACE_SCHEMA, grouped by group_id
    group_weights: tuple[float, ...]  # one per group, in order of first appearance in `batch`
    staleness: tuple[int, ...]  # policy_version - group's oldest policy_version, per group


@dataclasses.dataclass(frozen=True)
class ReplayStats:
    """groups/traces/tokens/bytes are held now; the rest count since the shard began (kept across restarts)."""

    groups: int
    traces: int
    tokens: int
    inserted_groups: int
    sampled_groups: int
    evicted_stale: int
    evicted_capacity: int
    rejected: int
    bytes: int
    shard_id: int = 0
    removed_sampled: int = 0
    inserted_traces: int = 0
    sampled_traces: int = 0
    quarantined: int = 0  # corrupt journal records / segment files skipped when this shard last opened
    reclaimed_groups: int = 0  # groups of draws whose reply died with the shard, handed back after its restart


class ReplayTable:
    def __init__(self, cfg: ReplayConfig, shard_id: int = 0):
        self.cfg = cfg
        self.shard_id = shard_id
        self._groups: collections.OrderedDict[str, Group] = collections.OrderedDict()  # insertion order
        self._stale_heap: list[tuple[int, int, str]] = []  # (min_version, seq, group_id), lazy deletion
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._limiter = RateLimiter(cfg.min_size_to_sample, cfg.samples_per_insert, cfg.error_buffer)
        self._rng = np.random.default_rng([cfg.seed, shard_id])
        self._seq = 0
        self._counts = collections.Counter()
        self._traces = self._tokens = self._bytes = 0
        self._pending_events: list[Event] = []
        self._drawn = RecentDraws()  # filled on restore: draws journalled before a crash, for `reclaim`
        self._quarantined = 0
        self._store = SegmentStore(cfg, shard_id) if cfg.segment_dir else None
        restored = self._store.restore() if self._store is not None else None
        if restored is not None:
            self._restore(restored)

    def __len__(self) -> int:
        return len(self._groups)

    # ---- insert ---------------------------------------------------------------------------------
    def can_accept(self, n_groups: int, n_traces: int, n_tokens: int) -> bool:
        """Would these new groups be admitted now without waiting (rate limiter, and capacity if on_full=block)?"""
        if not self._limiter.can_insert(n_groups):
            return False
        return (
            self.cfg.on_full == "evict_oldest"
            or overflow(self.cfg, self._usage(), Usage(n_groups, n_traces, n_tokens)) is None
        )

    def can_accept_ever(self, n_groups: int, n_traces: int, n_tokens: int) -> bool:
        """False if these groups would not fit even an empty table (on_full=block): waiting is pointless."""
        return (
            self.cfg.on_full == "evict_oldest"
            or overflow(self.cfg, Usage(0, 0, 0), Usage(n_groups, n_traces, n_tokens)) is None
        )

    def _usage(self) -> Usage:
        return Usage(len(self._groups), self._traces, self._tokens)

    def insert(self, batch: pa.RecordBatch) -> InsertResult:
        problem = schema_problem(batch)
        if problem is not None:
            return self._reject_all(batch, problem)
        chunk, groups, rejected = split_groups(batch, invalid_rows(batch), self._seen, self.cfg.priority_epsilon)
        accepted: list[Group] = []
        for g in groups:
            why = self._why_no_room(g)
            if why is None:
                self._admit(g)
                accepted.append(g)
            else:
                rejected.append((g.group_id, *why))
        self._counts["rejected"] += len(rejected)
        if accepted and self._store is not None:
            self._journal_insert(chunk, accepted, len(groups))
        self._settle(chunk)
        self._flush_events()
        return InsertResult(
            len(accepted),
            sum(g.length for g in accepted),
            tuple((g, w) for g, w, _ in rejected),
            tuple(r for *_, r in rejected),
        )

    def _journal_insert(self, chunk: Chunk, accepted: list[Group], n_kept: int) -> None:
        data = chunk.batch
        if len(accepted) < n_kept:  # some groups did not fit: the dataset holds only acknowledged traces
            data = pa.concat_batches([g.rows() for g in accepted])
        self._store.append_traces(data)

    def _flush_events(self) -> None:
        if self._store is not None and self._pending_events:
            self._store.append_events(self._pending_events)
        self._pending_events.clear()

    def _seen(self, group_id: str) -> bool:
        return group_id in self._groups or group_id in self._recent

    def _reject_all(self, batch: pa.RecordBatch, problem: str) -> InsertResult:
        if "group_id" not in batch.schema.names or batch.schema.field("group_id").type != pa.string():
            raise TraceError(problem)
        gids = sorted(set(batch["group_id"].to_pylist()) - {None})
        self._counts["rejected"] += len(gids)
        return InsertResult(0, 0, tuple((g, problem) for g in gids), (RejectReason.BAD_SCHEMA,) * len(gids))

    def _why_no_room(self, g: Group) -> tuple[str, RejectReason] | None:
        adding = Usage(1, g.length, g.tokens)
        too_big = overflow(self.cfg, Usage(0, 0, 0), adding)
        if too_big is not None:
            why = f"group {g.group_id} can never fit: {too_big}; raise the limit or send smaller groups"
            return why, RejectReason.TOO_LARGE
        if not self._limiter.can_insert(1):
            why = (
                f"rate limited: samples_per_insert={self.cfg.samples_per_insert} and the learner is "
                f"{self.cfg.error_buffer} groups behind; retry later (back-pressure)"
            )
            return why, RejectReason.RATE_LIMITED
        if self.cfg.on_full == "evict_oldest":
            while overflow(self.cfg, self._usage(), adding) is not None:
                self._remove(next(iter(self._groups.values())), "evicted_capacity")
            return None
        full = overflow(self.cfg, self._usage(), adding)
        if full is not None:
            why = f"replay full ({full}; on_full=block); retry later, sample faster or raise the capacity"
            return why, RejectReason.FULL
        return None

    def _admit(self, g: Group) -> None:
        g.seq, g.live = self._seq, True
        self._seq += 1
        self._groups[g.group_id] = g
        if self._evicts_stale:
            self._push_stale(g)
        g.chunk.live_groups += 1
        if g.chunk.live_groups == 1:
            self._bytes += g.chunk.nbytes
        self._traces += g.length
        self._tokens += g.tokens
        self._limiter.on_insert(1)
        self._counts["inserted_groups"] += 1
        self._counts["inserted_traces"] += g.length

    def _remove(self, g: Group, why: str, journal: bool = True, event: Event | None = None) -> None:
        del self._groups[g.group_id]
        self._recent[g.group_id] = None
        if len(self._recent) > _RECENT_GROUP_IDS:
            self._recent.popitem(last=False)
        g.live = False
        g.chunk.live_groups -= 1
        if g.chunk.live_groups == 0:
            self._bytes -= g.chunk.nbytes
        if not g.chunk.open:
            self._settle(g.chunk)
        self._traces -= g.length
        self._tokens -= g.tokens
        self._counts[why] += 1
        if journal:
            self._pending_events.append(event or Event(g.group_id, why))

    @property
    def _evicts_stale(self) -> bool:
        return self.cfg.eviction_staleness is not None

    def _push_stale(self, g: Group) -> None:
        heap = self._stale_heap
        heapq.heappush(heap, (g.min_version, g.seq, g.group_id))
        if len(heap) > 2 * len(self._groups) + 1024:  # drop entries of groups that already left
            self._stale_heap = [(x.min_version, x.seq, x.group_id) for x in self._groups.values()]
            heapq.heapify(self._stale_heap)

    def _settle(self, chunk: Chunk) -> None:
        """Release a chunk without live groups; compact one that is at least half dead."""
        chunk.open = False
        if chunk.live_groups == 0:
            chunk.release()
        elif 2 * chunk.live_groups <= len(chunk.groups):
            self._bytes += compact(chunk).nbytes - chunk.nbytes

    # ---- sample ---------------------------------------------------------------------------------
    def available(self, policy_version: int) -> int:
        """Groups a `sample` at `policy_version` could take now (after staleness eviction and the rate limiter)."""
        self._evict_stale(policy_version)
        self._flush_events()
        return self._limiter.max_sample(len(self._groups))

    def sample(self, n_groups: int, policy_version: int, draw_id: str | None = None) -> SampleResult | None:
        if n_groups < 1:
            raise ValueError(f"n_groups={n_groups}; ask for at least one group")
        if n_groups > self._limiter.max_ever_sample():
            raise ValueError(
                f"n_groups={n_groups} can never be sampled with replay.error_buffer="
                f"{self.cfg.error_buffer}; raise error_buffer to at least n_groups / 2"
            )
        self._evict_stale(policy_version)
        if not self._limiter.can_sample(n_groups, len(self._groups)):
            self._flush_events()
            return None
        held = list(self._groups.values())
        priorities = (
            np.fromiter((g.priority for g in held), np.float64, len(held))
            if self.cfg.sampler == "prioritized"
            else None
        )
        positions, weights = select(
            self.cfg.sampler,
            n_groups,
            len(held),
            priorities,
            self._rng,
            self.cfg.priority_exponent,
            self.cfg.importance_exponent,
        )
        picked = [held[i] for i in positions]
        result = self._result([g.rows() for g in picked], [g.min_version for g in picked], weights, policy_version)
        self._after_sample(picked, draw_id, weights)
        self._flush_events()
        return result

    def reclaim(self, draw_id: str, policy_version: int) -> SampleResult | None:
        """The groups of draw `draw_id` if this table was restored after journalling it (the caller's reply
        was lost with the process), else None; each draw is handed back at most once."""
        drawn = self._drawn.pop(draw_id)
        if not drawn:
            return None
        self._counts["reclaimed_groups"] += len(drawn)
        weights = np.array([d.weight for d in drawn], dtype=np.float64)
        return self._result([d.rows for d in drawn], [d.min_version for d in drawn], weights, policy_version)

    def _result(
        self, rows: list[pa.RecordBatch], min_versions: list[int], weights: np.ndarray, policy_version: int
    ) -> SampleResult:
        batch = pa.concat_batches(rows)
        staleness = [policy_version - v for v in min_versions]
        if self.cfg.stale_policy == "downweight" and self.cfg.max_staleness is not None:
            excess = np.maximum(0, np.asarray(staleness) - self.cfg.max_staleness)
            weights = weights * np.power(self.cfg.stale_weight_decay, excess)
        return SampleResult(batch, tuple(float(w) for w in weights), tuple(staleness))

    def _after_sample(self, picked: list[Group], draw_id: str | None, weights: np.ndarray) -> None:
        self._limiter.on_sample(len(picked))
        self._counts["sampled_groups"] += len(picked)
        self._counts["sampled_traces"] += sum(g.length for g in picked)
        limit = self.cfg.max_times_sampled
        for g, w in zip(picked, weights.tolist()):
            g.times_sampled += 1
            if limit is not None and g.times_sampled >= limit:
                self._remove(g, "removed_sampled", event=Event(g.group_id, "removed_sampled", draw_id, w))
            else:
                self._pending_events.append(Event(g.group_id, "sampled", draw_id, w))

    def _evict_stale(self, policy_version: int) -> None:
        if not self._evicts_stale:
            return
        oldest_ok = policy_version - self.cfg.eviction_staleness
        heap = self._stale_heap
        while heap and heap[0][0] < oldest_ok:
            _, seq, gid = heapq.heappop(heap)
            g = self._groups.get(gid)
            if g is not None and g.seq == seq:
                self._remove(g, "evicted_stale")

    def evict_newer(self, policy_version: int) -> int:
        """Evict (journalled as evicted_stale) every group whose traces a policy newer than `policy_version`
        sampled; return how many. A resume from a checkpoint at `policy_version` keeps the groups acknowledged
        after it, but the steps that made versions > `policy_version` are redone into different weights under
        the same numbers: such a group's version names a policy that no longer exists, and its staleness
        against the redone learner would read as negative (fresher than on-policy). Groups from the
        checkpoint's version or older stay: their policies are the resumed learner's own history."""
        newer = [g for g in self._groups.values() if g.min_version > policy_version]
        for g in newer:
            self._remove(g, "evicted_stale")
        self._flush_events()
        return len(newer)

    def update_priorities(self, group_ids: list[str], priorities: list[float]) -> int:
        """Set sampling priorities (e.g. the learner's mean |advantage|); returns how many groups were still held."""
        hits = 0
        for gid, p in zip(group_ids, priorities, strict=True):
            g = self._groups.get(gid)
            if g is not None:
                g.priority = max(float(p), self.cfg.priority_epsilon)
                hits += 1
        return hits

    # ---- stats / persistence ----------------------------------------------------------------------
    def stats(self) -> ReplayStats:
        c = self._counts
        return ReplayStats(
            groups=len(self._groups),
            traces=self._traces,
            tokens=self._tokens,
            inserted_groups=c["inserted_groups"],
            sampled_groups=c["sampled_groups"],
            evicted_stale=c["evicted_stale"],
            evicted_capacity=c["evicted_capacity"],
            rejected=c["rejected"],
            bytes=self._bytes,
            shard_id=self.shard_id,
            removed_sampled=c["removed_sampled"],
            inserted_traces=c["inserted_traces"],
            sampled_traces=c["sampled_traces"],
            quarantined=self._quarantined,
            reclaimed_groups=c["reclaimed_groups"],
        )

    def checkpoint(self) -> str:
        """Snapshot the held groups to `cfg.segment_dir`; returns the snapshot's path."""
        if self._store is None:
            raise RuntimeError("replay.segment_dir is not set; set it to a directory to make the replay durable")
        held = list(self._groups.values())
        state = {g.group_id: (g.times_sampled, g.priority) for g in held}
        limiter = (self._limiter.inserts, self._limiter.samples)
        rows = [pa.concat_batches([g.rows() for g in held])] if held else []
        return self._store.checkpoint(rows, state, self._counts, limiter)

    def close(self) -> None:
        """Close the segment files (a clean shutdown; a crash loses nothing acknowledged either way)."""
        if self._store is not None:
            self._store.close()

    def _admit_all(self, batches: list[pa.RecordBatch]) -> None:
        for batch in batches:
            chunk, groups, _ = split_groups(batch, {}, lambda gid: False, self.cfg.priority_epsilon)
            for g in groups:
                self._admit(g)
            self._settle(chunk)

    def _restore(self, r: Restored) -> None:
        """Rebuild from disk: snapshot groups, then later inserts, then later samples/removals."""
        self._quarantined = r.quarantined
        self._admit_all(r.snapshot_batches)
        for gid, (times_sampled, priority) in r.group_state.items():
            self._groups[gid].times_sampled, self._groups[gid].priority = times_sampled, priority
        self._counts = collections.Counter(r.counts)
        self._limiter.inserts, self._limiter.samples = r.limiter
        self._admit_all(r.batches)
        for gid, kind, draw_id, weight in r.events:
            g = self._groups.get(gid)
            if g is not None and draw_id is not None and kind in ("sampled", "removed_sampled"):
                self._drawn.add(draw_id, Drawn(g.rows(), g.min_version, 1.0 if weight is None else weight))
            if kind in ("sampled", "removed_sampled"):
                self._limiter.on_sample(1)
                self._counts["sampled_groups"] += 1
                self._counts["sampled_traces"] += g.length if g is not None else 0
            if g is not None and kind == "sampled":
                g.times_sampled += 1
            elif g is not None:
                self._remove(g, kind, journal=False)
