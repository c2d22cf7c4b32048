"""RolloutWorker without a Ray actor or an engine: the origin a call stamps on its traces and the group ids
it fixes; the rule after a broken weight update (on the class Ray wraps)."""

from __future__ import annotations

import pytest

from replay.rejections import RejectReason
from replay.synthetic import group_batch
from rollout.engine import EngineNeedsWeights
from services.rollout_worker import RolloutWorker, origin_group_ids, origin_stamps


def test_origin_group_ids_are_fixed_by_stream_position_so_a_reissued_call_repeats_them():
    first = origin_group_ids((1, 8), 4, seed=0)  # stream 1, prompts 4..7
    assert first == origin_group_ids((1, 8), 4, seed=0) and len(set(first)) == 4
    assert origin_group_ids((1, 12), 4, seed=0)[0] not in first  # the next call: new positions
    assert origin_group_ids((1, 10), 4, seed=0)[:2] == first[2:]  # positions 6, 7 again
    assert not set(first) & set(origin_group_ids((0, 8), 4, seed=0))  # another stream
    assert not set(first) & set(origin_group_ids((1, 8), 4, seed=1))  # another rollout seed
    assert all(len(g) == 32 and int(g, 16) >= 0 for g in first)  # hex like the random ids


def test_stamp_carries_the_call_and_each_prompts_position():
    stamps = origin_stamps(
        ["a", "b", "c"], ["a", "c"], (3, 12), worker_id=5, batch=2, positions={"a": 9, "b": 10, "c": 11}
    )
    assert [o["position"] for o in stamps] == [9, 10, 11]
    assert all(o["kept"] == [9, 11] for o in stamps)  # the groups this insert carries (b was dropped)
    call = {"stream": 3, "drawn": 12, "worker": 5, "batch": 2}
    assert all({k: o[k] for k in call} == call for o in stamps)


def test_a_reissued_calls_groups_already_in_replay_are_rejected_as_duplicates(tmp_path):
    """The first attempt of a call got one group in before its worker died; the re-issue repeats the ids:
    that group is rejected with the duplicate reason (counted apart from real rejections), the other goes in."""
    from replay.config import ReplayConfig
    from replay.table import ReplayTable

    table = ReplayTable(ReplayConfig(segment_dir=str(tmp_path / "replay")))
    a, b = origin_group_ids((0, 8), 2, seed=0)
    assert table.insert(group_batch([a], group_size=2, seed=1)).accepted_groups == 1
    result = table.insert(group_batch([a, b], group_size=2, seed=2))
    assert result.accepted_groups == 1 and [g for g, _ in result.rejected] == [a]
    assert result.reasons == (RejectReason.DUPLICATE,)


class _Engine:
    def __init__(self):
        self.policy_version, self.fail = 3, False

    def load_weights(self, tensors, version):
        for i, _ in enumerate(tensors):
            if self.fail and i == 1:  # the second bucket never arrives
                raise ConnectionError("sender went away")
        self.policy_version = version

    def reload_initial_weights(self):
        self.policy_version = 0


def _worker() -> object:
    worker = object.__new__(RolloutWorker.__ray_metadata__.modified_class)  # the class Ray wraps, no __init__
    worker.worker_id, worker.engine, worker.needs_weights = 7, _Engine(), False
    return worker


def test_after_an_update_broke_midway_the_worker_refuses_rollouts_until_a_complete_one():
    worker = _worker()
    worker.engine.fail = True
    with pytest.raises(ConnectionError):
        worker._load(iter([("a", None), ("b", None)]), 4)
    assert worker.engine.policy_version == 0 and worker.needs_weights  # back on the starting weights
    with pytest.raises(EngineNeedsWeights, match="rollout worker 7"):
        worker.rollout(2)  # generating now would label traces with version 0 after version 3
    worker.engine.fail = False
    worker._load(iter([("a", None), ("b", None)]), 5)
    assert worker.engine.policy_version == 5 and not worker.needs_weights
