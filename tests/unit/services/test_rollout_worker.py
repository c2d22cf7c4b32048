"""The origin a rollout call stamps on its traces and the group ids it fixes (no Ray actor started)."""

from __future__ import annotations

import json

from replay.rejections import RejectReason
from replay.schema import batch_to_traces
from replay.synthetic import group_batch
from services.rollout_worker import _stamp_origin, origin_group_ids


def test_origin_group_ids_are_fixed_by_stream_position_so_a_reissued_call_repeats_them():
    first = origin_group_ids((1, 8), 4, seed=0)  # stream 1, prompts 4..7
    assert first == origin_group_ids((1, 8), 4, seed=0) and len(set(first)) == 4
    assert origin_group_ids((1, 12), 4, seed=0)[0] not in first  # the next call: new positions
    assert origin_group_ids((1, 10), 4, seed=0)[:2] == first[2:]  # positions 6, 7 again
    assert not set(first) & set(origin_group_ids((0, 8), 4, seed=0))  # another stream
    assert not set(first) & set(origin_group_ids((1, 8), 4, seed=1))  # another rollout seed
    assert all(len(g) == 32 and int(g, 16) >= 0 for g in first)  # hex like the random ids


def test_stamp_carries_the_call_and_each_prompts_position():
    traces = batch_to_traces(group_batch(["a", "b"], group_size=2, seed=0))
    stamped = _stamp_origin(traces, (3, 12), worker_id=5, batch=2, positions={"a": 10, "b": 11})
    origins = [json.loads(t.metadata)["origin"] for t in stamped]
    assert [o["position"] for o in origins] == [10, 10, 11, 11]
    assert all(o["kept"] == [10, 11] for o in origins)  # the groups this insert carries
    call = {"stream": 3, "drawn": 12, "worker": 5, "batch": 2}
    assert all({k: o[k] for k in call} == call for o in origins)


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
