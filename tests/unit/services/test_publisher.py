"""`Publisher` without Ray: fake rank handles whose `publish.remote` returns a ref that `get` resolves."""

from __future__ import annotations

import json

from services.learner_rank import SendOutcome
from services.publisher import Publisher
from services.report import MetricsLog


class _Ref:
    def __init__(self, value):
        self.value = value


class _Rank:
    """A learner rank: records its publishes; rank 0 reports how the previous broadcast ended."""

    def __init__(self, rank: int):
        self.rank, self.sent, self.outcome = rank, [], None
        self.publish = self  # `rank.publish.remote(version, group)`

    def remote(self, version, group):
        self.sent.append((version, group))
        return _Ref(self.outcome if self.rank == 0 else None)


class _Pool:
    def __init__(self):
        self.begun, self.must_wait, self.group = [], False, None

    def begin_broadcast(self, version):
        self.begun.append(version)
        return self.group

    def publish_must_wait(self):
        return self.must_wait


def _publisher(tmp_path, every=2):
    ranks, pool, faults = [_Rank(0), _Rank(1)], _Pool(), []
    log = MetricsLog(tmp_path / "metrics.jsonl")
    pub = Publisher(ranks, pool, log, every, fault=faults.append, get=lambda ref: ref.value)
    return pub, ranks, pool, faults, log


def _records(log) -> list[dict]:
    log.close()
    return [json.loads(x) for x in log.path.read_text().splitlines()]


def test_a_publish_is_due_every_sync_every_steps_and_versions_count_up(tmp_path):
    pub, ranks, pool, faults, _ = _publisher(tmp_path, every=2)
    assert [pub.on_step(n) for n in (1, 2)] == [False, True] and pub.due and pub.may_publish()
    assert pub.unpublished(2)  # due: the learner's weights are not version 0's
    assert pub.publish() == 1 and not pub.due and not pub.unpublished(2)
    pub.on_step(4)
    assert pub.publish() == 2 and pub.version == 2
    assert pool.begun == [1, 2] and [v for v, _ in ranks[1].sent] == [1, 2]  # every rank joins every publish
    assert sorted(pub.s.publish_t) == [0, 1, 2] and pub.s.publish_t[1] <= pub.s.publish_t[2]
    assert pub.published_at(0) == 0.0 and faults == ["broadcast", "broadcast"]  # no regroup, no "join" point
    assert pub.unpublished(5) and not pub.unpublished(6)  # a step past the last publish, then a boundary


def test_a_due_publish_waits_while_the_weight_group_is_re_formed(tmp_path):
    pub, _, pool, _, _ = _publisher(tmp_path, every=1)
    pub.on_step(1)
    pool.must_wait = True
    assert pub.due and not pub.may_publish()
    pool.must_wait = False
    assert pub.may_publish()


def test_a_broadcast_over_a_re_formed_group_passes_the_group_and_fires_the_join_hook(tmp_path):
    pub, ranks, pool, faults, _ = _publisher(tmp_path)
    pool.group = "group-2"
    pub.broadcast(0)  # resume: re-send the version the learner holds, without a new version
    assert pub.version == 0 and ranks[0].sent == [(0, "group-2")] and faults == ["broadcast", "join"]


def test_finished_broadcasts_are_collected_and_a_dropped_one_is_logged(tmp_path):
    pub, ranks, _, _, log = _publisher(tmp_path, every=1)
    pub.on_step(1)
    pub.publish()
    ranks[0].outcome = SendOutcome(1, "WeightSyncTimeout: worker 3 did not receive")  # version 1's fate, reported
    pub.on_step(2)
    pub.publish()
    refs = pub.refs()
    first, second = refs[:2], refs[2:]
    pub.process(set(first))
    assert pub.busy and len(pub.refs()) == 2
    pub.process(set(second) | {object()})  # refs of other components are ignored
    assert not pub.busy
    failed = [r for r in _records(log) if r["kind"] == "broadcast_failed"]
    assert failed == [
        {"kind": "broadcast_failed", "t": failed[0]["t"], "policy_version": 1, "error": ranks[0].outcome.error}
    ]
