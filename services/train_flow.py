"""`TrainFlow`: the loop's train component — sample straight to the ranks, one step in flight, next one prefetched.

State (explicit, nothing else): `inflight` (the step the ranks run now) and `prefetched` (the next step's
sample, already cut into per-rank parts in the shards' object stores).

Invariants:
- payloads never pass through this process: replay returns a `SampleMeta` (ids, counts, staleness,
  weights) and per-rank part refs that go to `rank.train_step.remote(*refs)`; Ray resolves them in the
  rank's process (replay/parts.py). `driver_bytes` counts what this side did `get` per step.
- the next sample is drawn while the current step trains, for the policy_version the learner will
  hold when it trains (the caller predicts it). If the learner ends up on a newer version than
  predicted, the prefetched sample is re-checked against `max_staleness` and dropped if it broke it,
  so the bound holds at train time. With `max_staleness: 0` (synchronous) nothing is prefetched: the
  next step's groups do not exist before this step's weights are published.
- a finished step's per-group priorities (mean |advantage|) go back to replay when the sampler is
  prioritized (fire and forget).
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
from collections.abc import Callable

from replay.parts import SampleMeta

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StepDone:
    """A finished learner step as the loop sees it."""

    meta: SampleMeta
    results: list  # one services.learner_rank.RankStepResult per rank
    policy_version: int  # the version the learner held while it trained
    driver_bytes: int  # bytes this process fetched for the step (the sample's meta and the ranks' results)


@dataclasses.dataclass
class _InFlight:
    meta: SampleMeta
    refs: list
    policy_version: int
    meta_bytes: int


@dataclasses.dataclass
class _Prefetched:
    routed: object  # services.replay_client.RoutedSample
    sampled_for: int
    meta_bytes: int


class TrainFlow:
    def __init__(
        self,
        replay,
        ranks: list,
        groups_per_step: int,
        max_staleness: int | None,
        prefetch: bool,
        feed_priorities: bool,
        get: Callable = None,
    ):
        if get is None:
            import ray

            get = ray.get
        self.replay, self.ranks, self.groups_per_step = replay, list(ranks), groups_per_step
        self.max_staleness, self.prefetch_on, self.feed_priorities = max_staleness, prefetch, feed_priorities
        self._get = get
        self.inflight: _InFlight | None = None
        self.prefetched: _Prefetched | None = None
        self.dropped_prefetches = 0  # prefetched samples dropped for breaking max_staleness (their groups are lost)

    def refs(self) -> list:
        return list(self.inflight.refs) if self.inflight is not None else []

    @property
    def busy(self) -> bool:
        return self.inflight is not None

    def _sample(self, policy_version: int):
        return self.replay.sample_to_ranks(self.groups_per_step, policy_version, len(self.ranks), timeout_s=0.0)

    def start(self, policy_version: int) -> SampleMeta | None:
        """Dispatch a step at `policy_version` (prefetched sample if still valid, else a fresh one); its meta."""
        if self.inflight is not None:
            return None
        routed, meta_bytes = self._take_prefetched(policy_version)
        if routed is None:
            routed = self._sample(policy_version)
            if routed is None:
                return None
            meta_bytes = _size(routed.meta)
        parts = _every_rank_fed(routed.parts)
        refs = [rank.train_step.remote(*p) for rank, p in zip(self.ranks, parts)]
        self.inflight = _InFlight(routed.meta, refs, policy_version, meta_bytes)
        return routed.meta

    def _take_prefetched(self, policy_version: int):
        pre, self.prefetched = self.prefetched, None
        if pre is None:
            return None, 0
        extra = max(0, policy_version - pre.sampled_for)  # versions published beyond the prediction
        if extra and self.max_staleness is not None and max(pre.routed.meta.staleness) + extra > self.max_staleness:
            self.dropped_prefetches += 1
            log.warning(
                f"dropped a prefetched sample of {pre.routed.meta.num_groups} groups: the learner reached version "
                f"{policy_version}, not {pre.sampled_for}, and it would break max_staleness={self.max_staleness}"
            )
            return None, 0
        if extra:
            meta = dataclasses.replace(pre.routed.meta, staleness=tuple(s + extra for s in pre.routed.meta.staleness))
            return dataclasses.replace(pre.routed, meta=meta), pre.meta_bytes
        return pre.routed, pre.meta_bytes

    def prefetch(self, policy_version_at_train: int) -> None:
        """Draw the next step's sample now, while the current one trains (no-op when off or already held)."""
        if not self.prefetch_on or self.prefetched is not None or self.inflight is None:
            return
        routed = self._sample(policy_version_at_train)
        if routed is not None:
            self.prefetched = _Prefetched(routed, policy_version_at_train, _size(routed.meta))

    def finish(self) -> StepDone:
        """Collect the finished step (its refs are ready) and feed its priorities back to replay."""
        step, self.inflight = self.inflight, None
        results = self._get(step.refs)
        if self.feed_priorities:
            gids = [g for r in results for g in r.group_ids]
            self.replay.update_priorities_async(gids, [p for r in results for p in r.priorities])
        return StepDone(step.meta, results, step.policy_version, step.meta_bytes + _size(results))

    def prefetched_groups(self) -> int:
        return self.prefetched.routed.meta.num_groups if self.prefetched is not None else 0


def _size(obj) -> int:
    """Bytes of `obj` as pickled (what Ray ships for a plain Python object)."""
    return len(pickle.dumps(obj, protocol=5))


def _every_rank_fed(parts: list[list]) -> list[list]:
    """Per-rank part refs; a rank a short draw left without groups trains on the fullest rank's parts too.

    Only a shard that dies or is drained mid-draw makes a draw short; ranks must still step together."""
    if all(parts):
        return parts
    fullest = max(parts, key=len)
    log.warning("a short replay draw left a learner rank without groups; it repeats another rank's groups this step")
    return [p if p else fullest for p in parts]
