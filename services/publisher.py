"""`Publisher`: the loop's publish component — policy versions, when each was published, broadcasts in flight.

State (explicit, nothing else): `s` (`PublishState`, carried by checkpoints: the current `policy_version`
and the RL-clock time each version was published), `due` (a publish is owed: the learner finished
`weight_sync.sync_every_steps` steps since the last one) and `inflight` (each learner rank's `publish`
ref -> the version it sends).

Invariants:
- versions are published in order 1, 2, ...: `publish` bumps the version, stamps its time and broadcasts
  it; `broadcast` alone re-sends the version the learner holds (resume, a re-formed weight group);
- a due publish waits while the worker pool forms a new weight group (`pool.publish_must_wait`), so
  learner rank 0 never blocks on a joiner; training goes on meanwhile;
- a broadcast that a worker dropped (a member died or timed out) is logged as `broadcast_failed` (the pool
  re-forms the group; the worker gets the next version); a learner rank that died raises, since nothing
  can stand in for it.
Which weights a version is — for Schedule-Free, the averaged x swapped in only while the buckets are
packed — is the learner rank's business (learner/step.py `weight_buckets`); this side only counts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass
class PublishState:
    """What a checkpoint carries of the publisher (loop.json `loop_state`, flat with the loop's counters)."""

    version: int = 0  # the learner's current policy_version: 0 for the starting weights, +1 per publish
    publish_t: dict = dataclasses.field(default_factory=lambda: {0: 0.0})  # version -> RL clock at its publish


class Publisher:
    def __init__(self, ranks: list, pool, log, sync_every_steps: int, fault: Callable[[str], None], get=None):
        """`ranks`: learner rank handles (`publish.remote(version, group)`); `pool`: the worker pool
        (`begin_broadcast`, `publish_must_wait`); `log`: the run's MetricsLog (RL clock and records);
        `fault`: the test hook, called with "broadcast" / "join" after a broadcast is queued."""
        if get is None:
            import ray

            get = ray.get
        self.ranks, self.pool, self.log, self.every, self._fault, self._get = (
            ranks,
            pool,
            log,
            sync_every_steps,
            fault,
            get,
        )
        self.s = PublishState()
        self.due = False
        self.inflight: dict = {}  # rank's publish ref -> policy_version it sends

    @property
    def version(self) -> int:
        return self.s.version

    @property
    def busy(self) -> bool:
        return bool(self.inflight)

    def refs(self) -> list:
        return list(self.inflight)

    def on_step(self, learner_step: int) -> bool:
        """A learner step finished: a publish is due every `sync_every_steps` of them (True when it just became due)."""
        if learner_step % self.every == 0:
            self.due = True
            return True
        return False

    def unpublished(self, learner_step: int) -> bool:
        """The learner took steps since the last publish (its weights are not `version`'s)."""
        return self.due or learner_step % self.every != 0

    def may_publish(self) -> bool:
        return self.due and not self.pool.publish_must_wait()

    def publish(self) -> int:
        """Publish the learner's weights as the next version; returns it."""
        self.due = False
        self.s.version += 1
        self.s.publish_t[self.s.version] = self.log.now()
        self.broadcast(self.s.version)
        return self.s.version

    def broadcast(self, version: int) -> None:
        """Send the learner's weights as `version` to every worker (over a re-formed group if members changed)."""
        group = self.pool.begin_broadcast(version)
        for rank in self.ranks:
            self.inflight[rank.publish.remote(version, group)] = version
        self._fault("broadcast")
        if group is not None:
            self._fault("join")

    def published_at(self, version: int) -> float:
        return self.s.publish_t[version]

    def process(self, ready: set) -> None:
        """Handle every finished publish among `ready` refs (a dead learner rank raises)."""
        for ref in [r for r in self.inflight if r in ready]:
            del self.inflight[ref]
            outcome = self._get(ref)  # services.learner_rank.SendOutcome from rank 0, None from the others
            if outcome is not None and outcome.error is not None:
                self.log.write("broadcast_failed", policy_version=outcome.policy_version, error=outcome.error)
