"""`ReplayClient`: one handle on K `ReplayShard` actors; `create_replay` starts them.

Contract: the client is a plain picklable object (actor handles; its caches are rebuilt after
unpickling), so rollout workers and the learner can each hold one. `insert` routes each whole group
to `shard_of(group_id)` and waits for every shard; the part for a shard that is down is re-sent
until it answers or `insert_retry_s` passes (Ray restarts a dead shard, which recovers from its
segments; a group it had already persisted comes back as a duplicate rejection, so a retry never
inserts twice), then only that shard's groups are rejected, with the error as the reason.
A single-shard `sample` while the shard is down returns None (no data now), like a multi-shard one.

`sample` keeps a per-shard count of groups each shard can give, refreshed by availability probes
that run in the background and by the count every draw returns. A sample is one RPC to one shard,
chosen with probability proportional to its count, when every shard could serve it alone (as a
Reverb client samples one server per request); otherwise the groups are split over shards by a
multivariate hypergeometric draw (`replay.sharding.allocate`). Either way each shard is drawn in
proportion to its size. A shard whose probe is older than `probe_timeout_s` is left out until it
answers, so a slow shard does not stall the learner. `sample` returns None when the shards together
cannot give `n_groups` within `timeout_s`. Only if a shard fails or is drained by another consumer
in the middle of a split draw can a result hold fewer groups (check `len(result.group_weights)`).

Every draw carries an id. A shard that dies between journalling a draw and replying took those groups
out of replay without handing them over; the client then waits (up to `reclaim_timeout_s`) for the
restarted shard and asks for that draw back (`ReplayShard.reclaim_split`), so the learner still gets
them. A draw the shard had not journalled left its groups in replay. Only a shard that stays down past
the timeout can lose a draw (if it had journalled it); `unrecovered_draws` counts those (the run summary reports it).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
import uuid

import numpy as np
import pyarrow as pa
import ray
from ray.actor import ActorHandle

from replay.config import ReplayConfig
from replay.parts import SampleMeta, merge_metas
from replay.rejections import RejectReason
from replay.sharding import allocate, merge_inserts, merge_samples, shard_of, split_by_shard
from replay.table import InsertResult, ReplayStats, SampleResult
from services import metrics
from services.replay_shard import MAX_CONCURRENCY, ReplayShard

_RETRY_SLEEP_S = 0.01
_PROBE_GRACE_S = 0.05
_PROBE_INTERVAL_S = 0.2
_DOWN_RETRY_SLEEP_S = 0.5  # re-probe a shard at most this often while its count is current
# A dead or restarting shard is tolerated (its part fails); an error raised by the shard's code is a
# caller mistake (bad n_groups, a batch without group_id) and propagates.
_SHARD_DOWN = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RoutedSample:
    """One step's sample as the driver holds it: ids and sizes, and for each rank the refs of its parts.

    `parts[k]` are `RankPart` refs (one per shard that gave rank k groups) living in the shards' object
    stores; `LearnerRank.train_step.remote(parts[k])` has Ray resolve them in the rank's process."""

    meta: SampleMeta
    parts: list[list[ray.ObjectRef]]


def _gather(refs: list) -> list:
    """ray.get each ref after ray.wait; a ref whose shard is down yields the exception instead."""
    ray.wait(refs, num_returns=len(refs), fetch_local=True)
    out = []
    for ref in refs:
        try:
            out.append(ray.get(ref))
        except _SHARD_DOWN as e:
            out.append(e)
    return out


class ReplayClient:
    def __init__(
        self,
        shards: list[ActorHandle],
        probe_timeout_s: float = 1.0,
        seed: int = 0,
        insert_retry_s: float = 0.0,
        reclaim_timeout_s: float = 60.0,
    ):
        if not shards:
            raise ValueError("ReplayClient needs at least one ReplayShard handle; use create_replay(cfg)")
        self.shards = list(shards)
        self.probe_timeout_s = probe_timeout_s
        self.seed = seed
        self.insert_retry_s = insert_retry_s
        self.reclaim_timeout_s = reclaim_timeout_s
        self._reset_caches()

    def _reset_caches(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._known: dict[int, tuple[int, int]] = {}  # shard -> (groups it can give, at policy_version)
        self._probes: dict[int, tuple[ray.ObjectRef, float, int]] = {}  # shard -> (ref, sent_at, policy_version)
        self._known_at: dict[int, float] = {}  # shard -> when its count was last reported
        self._lock = threading.Lock()
        self._draw_ids = (f"{uuid.uuid4().hex[:12]}-{i}" for i in itertools.count())
        self.reclaimed_groups = 0  # groups of draws whose shard died before replying, handed back after restart
        self.unrecovered_draws = (
            0  # failed draws whose shard stayed down past reclaim_timeout_s (groups it journalled are lost)
        )

    def __getstate__(self) -> dict:
        return {
            "shards": self.shards,
            "probe_timeout_s": self.probe_timeout_s,
            "seed": self.seed,
            "insert_retry_s": self.insert_retry_s,
            "reclaim_timeout_s": self.reclaim_timeout_s,
        }

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_caches()

    # ---- insert ---------------------------------------------------------------------------------
    def insert(self, batch: pa.RecordBatch) -> InsertResult:
        parts = split_by_shard(batch, len(self.shards))
        todo = [(k, part) for k, part in enumerate(parts) if part is not None]
        done: list[InsertResult] = []
        deadline = time.monotonic() + self.insert_retry_s
        while True:
            results = _gather([self.shards[k].insert.remote(part) for k, part in todo])
            done += [r for r in results if isinstance(r, InsertResult)]
            failed = [(k, part, r) for (k, part), r in zip(todo, results) if not isinstance(r, InsertResult)]
            for k, part, _ in failed:
                metrics.record_shard_down(k, part.num_rows)
            if not failed or time.monotonic() >= deadline:
                return merge_inserts(done + [_shard_failed(k, part, r) for k, part, r in failed])
            todo = [(k, part) for k, part, _ in failed]
            time.sleep(min(_DOWN_RETRY_SLEEP_S, max(0.0, deadline - time.monotonic())))

    # ---- sample ---------------------------------------------------------------------------------
    def sample(self, n_groups: int, policy_version: int, timeout_s: float = 0.0) -> SampleResult | None:
        if n_groups < 1:
            raise ValueError(f"n_groups={n_groups}; ask for at least one group")
        if len(self.shards) == 1:
            draw_id = next(self._draw_ids)
            got = _gather([self.shards[0].sample.remote(n_groups, policy_version, timeout_s, draw_id)])[0]
            if not isinstance(got, Exception):
                return got
            back = self._reclaim(0, draw_id, lambda s: [s.reclaim.remote(draw_id, policy_version)])
            result = back[0][0] if back else None
            self._count_reclaimed(0, draw_id, len(result.group_weights) if result is not None else 0)
            return result
        deadline = time.monotonic() + timeout_s
        while True:
            # wait for probe answers at most one round trip's grace past the caller's deadline
            probe_wait_s = min(self.probe_timeout_s, max(0.0, deadline - time.monotonic()) + _PROBE_GRACE_S)
            result = self._sample_once(n_groups, policy_version, probe_wait_s)
            if result is not None or time.monotonic() >= deadline:
                return result
            time.sleep(min(_RETRY_SLEEP_S, max(0.0, deadline - time.monotonic())))

    def _sample_once(self, n_groups: int, policy_version: int, probe_wait_s: float) -> SampleResult | None:
        self._refresh(n_groups, policy_version, probe_wait_s)
        parts: list[SampleResult] = []
        need = n_groups
        for _ in range(3):  # a shard that comes back short updates its count; re-plan the shortfall
            plan = self._plan(need, split_ok=need < n_groups or self._fresh(policy_version))
            if plan is None:
                break
            got = self._draw(plan, policy_version)
            parts += got
            need -= sum(len(r.group_weights) for r in got)
            if need == 0:
                break
        return merge_samples(parts) if parts else None

    def _fresh(self, policy_version: int) -> bool:
        return all(v >= policy_version for _, v in list(self._known.values()))  # list(): other threads mutate it

    def _refresh(self, need: int, policy_version: int, wait_s: float) -> None:
        """Probe every shard without a probe in flight; harvest answers; wait (<= wait_s) only if short."""
        deadline = time.monotonic() + wait_s
        for attempt in itertools.count():
            self._send_probes(policy_version, force=attempt > 0)
            self._harvest()
            short = sum(a for a, _ in list(self._known.values())) < need or not self._fresh(policy_version)
            pending = [ref for ref, _, _ in list(self._probes.values())]
            remaining = deadline - time.monotonic()
            if not short or remaining <= 0 or (attempt > 0 and not pending):
                break
            if pending:
                ray.wait(pending, num_returns=1, timeout=remaining)
        self._drop_slow()

    def _send_probes(self, policy_version: int, force: bool) -> None:
        with self._lock:
            now = time.monotonic()
            for k, shard in enumerate(self.shards):
                recent = (
                    now - self._known_at.get(k, -1e9) < _PROBE_INTERVAL_S
                    and self._known.get(k, (0, -1))[1] >= policy_version
                )
                if k not in self._probes and (force or not recent):  # a count from moments ago is good enough
                    self._probes[k] = (shard.available.remote(policy_version), now, policy_version)

    def _harvest(self) -> None:
        with self._lock:
            items = list(self._probes.items())
            ready = (
                set(ray.wait([r for _, (r, _, _) in items], num_returns=len(items), timeout=0)[0]) if items else set()
            )
            for k, (ref, _, version) in items:
                if ref in ready:
                    del self._probes[k]
                    try:
                        self._known[k] = (ray.get(ref), version)
                        self._known_at[k] = time.monotonic()
                    except _SHARD_DOWN:
                        self._known.pop(k, None)

    def _drop_slow(self) -> None:
        with self._lock:
            now = time.monotonic()
            for k, (_, sent_at, _) in self._probes.items():
                if now - sent_at > self.probe_timeout_s:
                    self._known.pop(k, None)

    def _plan(self, n: int, split_ok: bool) -> dict[int, int] | None:
        with self._lock:
            keys = [k for k, (a, _) in self._known.items() if a > 0]
            avail = np.array([self._known[k][0] for k in keys], dtype=np.int64)
            if avail.sum() < n:
                return None
            if np.all(avail >= n):  # one RPC: pick one shard in proportion to its size
                return {keys[int(self._rng.choice(len(keys), p=avail / avail.sum()))]: n}
            if not split_ok:  # a split on counts from an older policy_version could come back partial
                return None
            return {k: int(c) for k, c in zip(keys, allocate(n, list(avail), self._rng)) if c > 0}

    def _draw(self, plan: dict[int, int], policy_version: int) -> list[SampleResult]:
        calls = [(k, c, next(self._draw_ids)) for k, c in plan.items()]
        results = _gather([self.shards[k].draw.remote(c, policy_version, d) for k, c, d in calls])
        for i, ((k, _, d), r) in enumerate(zip(calls, results)):
            if isinstance(r, Exception) and (
                got := self._reclaim(k, d, lambda s, d=d: [s.reclaim.remote(d, policy_version)])
            ):
                results[i] = got[0]
                self._count_reclaimed(k, d, len(got[0][0].group_weights) if got[0][0] is not None else 0)
        out = []
        with self._lock:
            for (k, _, _), r in zip(calls, results):
                if isinstance(r, Exception):
                    self._known.pop(k, None)
                    continue
                result, left = r
                self._known[k] = (left, policy_version)
                self._known_at[k] = time.monotonic()
                self._probes.pop(k, None)  # a probe sent before this draw would report the pre-draw count
                if result is not None:
                    out.append(result)
        return out

    # ---- sample straight to the learner ranks -------------------------------------------------------
    def sample_to_ranks(
        self, n_groups: int, policy_version: int, ranks: int, timeout_s: float = 0.0
    ) -> RoutedSample | None:
        """Like `sample`, but the groups stay in the shards' object stores, cut into `ranks` token-balanced
        parts; only each draw's `SampleMeta` comes back here. None when the shards cannot give `n_groups`."""
        if n_groups < ranks:
            raise ValueError(f"n_groups={n_groups} < {ranks} learner ranks; every rank needs a group per step")
        if len(self.shards) == 1:
            routed = self._draw_routed({0: n_groups}, policy_version, ranks, timeout_s)
            return routed if routed is not None and routed.meta.num_groups == n_groups else None
        deadline = time.monotonic() + timeout_s
        while True:
            probe_wait_s = min(self.probe_timeout_s, max(0.0, deadline - time.monotonic()) + _PROBE_GRACE_S)
            self._refresh(n_groups, policy_version, probe_wait_s)
            plan = self._plan(n_groups, split_ok=self._fresh(policy_version))
            routed = self._draw_routed(plan, policy_version, ranks, 0.0) if plan is not None else None
            # a short draw (a shard drained or died meanwhile) still trains: its groups are out of replay now
            if routed is not None or time.monotonic() >= deadline:
                return routed
            time.sleep(min(_RETRY_SLEEP_S, max(0.0, deadline - time.monotonic())))

    def _draw_routed(self, plan: dict[int, int], policy_version: int, ranks: int, timeout_s: float):
        calls, first = [], 0
        for k, count in plan.items():
            draw_id = next(self._draw_ids)
            refs = (
                self.shards[k]
                .draw_split.options(num_returns=1 + ranks)
                .remote(count, policy_version, ranks, timeout_s, first % ranks, draw_id)
            )
            calls.append((k, refs[0], refs[1:], draw_id, first % ranks))
            first += count
        metas = _gather([meta for _, meta, *_ in calls])
        for i, ((k, _, _, draw_id, part0), meta) in enumerate(zip(calls, metas)):
            if isinstance(meta, Exception):
                split = lambda s, d=draw_id, p=part0: s.reclaim_split.options(num_returns=1 + ranks).remote(  # noqa: E731
                    d, policy_version, ranks, p
                )
                if got := self._reclaim(k, draw_id, split):
                    calls[i], metas[i] = (k, None, got[1], draw_id, part0), got[0]
                    self._count_reclaimed(k, draw_id, got[0].num_groups)
        kept, parts = [], [[] for _ in range(ranks)]
        with self._lock:
            for (k, _, part_refs, *_), meta in zip(calls, metas):
                if isinstance(meta, Exception):
                    self._known.pop(k, None)
                    continue
                self._known[k] = (meta.groups_left, policy_version)
                self._known_at[k] = time.monotonic()
                self._probes.pop(k, None)
                if meta.num_groups:
                    kept.append(meta)
                    for r in range(ranks):
                        if meta.group_ids[r]:
                            parts[r].append(part_refs[r])
        if not kept:
            return None
        return RoutedSample(merge_metas(kept), parts)

    def _reclaim(self, k: int, draw_id: str, send) -> tuple[object, list] | None:
        """After shard `k` failed draw `draw_id`: wait for its restart and ask for the draw back. `send(shard)`
        sends the reclaim and returns its refs; the result is (the first ref's value, the other refs), or None
        if the shard stays down past `reclaim_timeout_s` (the draw is then counted as unrecovered)."""
        deadline = time.monotonic() + self.reclaim_timeout_s
        while True:
            refs = send(self.shards[k])
            answer = _gather(refs[:1])[0]
            if not isinstance(answer, Exception):
                return answer, refs[1:]
            if time.monotonic() >= deadline:
                self.unrecovered_draws += 1
                log.error(
                    f"replay shard {k} died during draw {draw_id} and stayed down for {self.reclaim_timeout_s:.0f} s: "
                    "the groups it had journalled as drawn are lost (raise replay.reclaim_timeout_s)"
                )
                return None
            time.sleep(_DOWN_RETRY_SLEEP_S)

    def _count_reclaimed(self, k: int, draw_id: str, groups: int) -> None:
        if groups:
            self.reclaimed_groups += groups
            log.warning(f"replay shard {k} died before replying to draw {draw_id}; its {groups} group(s) reclaimed")

    def groups_known(self) -> int:
        """Groups the shards could give, by their last reports (draws and probes; no RPC)."""
        with self._lock:
            return sum(a for a, _ in self._known.values())

    # ---- the rest -------------------------------------------------------------------------------
    def stats(self) -> list[ReplayStats]:
        """One entry per live shard (a shard that is down or restarting is left out)."""
        return [r for r in _gather([s.stats.remote() for s in self.shards]) if isinstance(r, ReplayStats)]

    def checkpoint(self) -> list[str]:
        return _gather([s.checkpoint.remote() for s in self.shards])

    def evict_newer(self, policy_version: int) -> int:
        """Resume: on every shard, evict the groups sampled by policies newer than `policy_version`; how many."""
        return sum(ray.get([s.evict_newer.remote(policy_version) for s in self.shards]))

    def update_priorities_async(self, group_ids: list[str], priorities: list[float]) -> None:
        """Send each group's priority to its shard (`shard_of`) without waiting; a group already gone is ignored."""
        by_shard: dict[int, tuple[list, list]] = {}
        for gid, p in zip(group_ids, priorities, strict=True):
            ids, ps = by_shard.setdefault(shard_of(gid, len(self.shards)), ([], []))
            ids.append(gid)
            ps.append(float(p))
        for k, (ids, ps) in by_shard.items():
            self.shards[k].update_priorities.remote(ids, ps)

    def update_priorities(self, group_ids: list[str], priorities: list[float]) -> int:
        hits = _gather([s.update_priorities.remote(group_ids, priorities) for s in self.shards])
        return sum(h for h in hits if isinstance(h, int))


def _shard_failed(k: int, part: pa.RecordBatch, error: Exception) -> InsertResult:
    first_line = str(error).splitlines()[0] if str(error) else ""
    why = f"replay shard {k} is down ({type(error).__name__}: {first_line}); retry the insert"
    gids = sorted(set(part["group_id"].to_pylist()))
    return InsertResult(0, 0, tuple((g, why) for g in gids), (RejectReason.SHARD_DOWN,) * len(gids))


def create_replay(cfg: ReplayConfig, max_restarts: int = -1) -> ReplayClient:
    """Start `cfg.num_shards` shard actors (num_cpus=0: they share cores with rollout and learner).

    Ray restarts a dead shard (`max_restarts`, -1 = always); with `cfg.segment_dir` it comes back
    with every acknowledged trace.
    """
    shards = [
        ReplayShard.options(max_restarts=max_restarts, max_concurrency=MAX_CONCURRENCY).remote(cfg, k)
        for k in range(cfg.num_shards)
    ]
    return ReplayClient(
        shards, seed=cfg.seed, insert_retry_s=cfg.insert_retry_s, reclaim_timeout_s=cfg.reclaim_timeout_s
    )
