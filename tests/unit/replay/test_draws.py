"""A shard that dies after journalling a draw hands the same groups back once after its restart."""

from __future__ import annotations

import pyarrow as pa

from replay.config import ReplayConfig
from replay.draws import Drawn, RecentDraws
from replay.segments import EVENT_SCHEMA, _events_of
from replay.synthetic import group_batch
from replay.table import ReplayTable


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(n)]


def _groups(result) -> list[str]:
    return list(dict.fromkeys(result.batch["group_id"].to_pylist()))


def test_a_journalled_draw_is_reclaimed_once_after_a_crash_with_its_rows_and_weights(tmp_path):
    cfg = ReplayConfig(segment_dir=str(tmp_path), sampler="prioritized", max_staleness=None, seed=3)
    table = ReplayTable(cfg)
    batch = group_batch(_ids("g", 6), group_size=3, seed=5)
    table.insert(batch)
    drawn = table.sample(2, 7, draw_id="d-1")
    table.sample(1, 7, draw_id="d-2")
    # no close(): the process died after journalling both draws, before either reply left
    again = ReplayTable(cfg)
    assert len(again) == 3 and set(_groups(drawn)).isdisjoint(_groups(again.sample(3, 7)))
    back = again.reclaim("d-1", 7)
    assert _groups(back) == _groups(drawn)
    assert back.batch.equals(drawn.batch)
    assert back.group_weights == drawn.group_weights and back.staleness == drawn.staleness
    assert again.reclaim("d-1", 7) is None  # handed back at most once
    assert again.reclaim("never-drawn", 7) is None
    assert again.stats().reclaimed_groups == 2


def test_a_draw_of_a_live_table_is_not_reclaimable(tmp_path):
    table = ReplayTable(ReplayConfig(segment_dir=str(tmp_path), sampler="fifo", max_staleness=None))
    table.insert(group_batch(_ids("g", 4)))
    table.sample(2, 0, draw_id="d-1")
    assert table.reclaim("d-1", 0) is None  # the caller got its reply: nothing to hand back


def test_a_group_sampled_but_kept_is_reclaimed_and_still_held(tmp_path):
    cfg = ReplayConfig(segment_dir=str(tmp_path), sampler="fifo", max_staleness=None, max_times_sampled=2)
    table = ReplayTable(cfg)
    table.insert(group_batch(_ids("g", 3)))
    table.sample(1, 0, draw_id="d-1")
    again = ReplayTable(cfg)
    assert _groups(again.reclaim("d-1", 0)) == ["g000"]
    assert len(again) == 3 and again.stats().sampled_groups == 1  # one more sample removes it


def test_downweighting_applies_to_a_reclaimed_draw_at_the_callers_version(tmp_path):
    cfg = ReplayConfig(
        segment_dir=str(tmp_path),
        sampler="fifo",
        max_staleness=1,
        stale_policy="downweight",
        stale_weight_decay=0.5,
        hard_max_staleness=10,
    )
    table = ReplayTable(cfg)
    table.insert(group_batch(_ids("g", 2), policy_version=0))
    table.sample(1, 3, draw_id="d-1")
    back = ReplayTable(cfg).reclaim("d-1", 3)
    assert back.staleness == (3,) and back.group_weights == (0.5**2,)


def test_recent_draws_keeps_only_the_newest():
    draws = RecentDraws(capacity=2)
    rows = group_batch(["g"])
    for d in ("a", "b", "c"):
        draws.add(d, Drawn(rows, 0, 1.0))
    assert len(draws) == 2 and draws.pop("a") == [] and len(draws.pop("c")) == 1


def test_journals_written_before_draw_ids_read_with_empty_ids():
    old = pa.RecordBatch.from_pydict({"group_id": ["g1", "g2"], "kind": ["sampled", "evicted_stale"]})
    assert [tuple(e) for e in _events_of(old)] == [("g1", "sampled", None, None), ("g2", "evicted_stale", None, None)]
    new = pa.RecordBatch.from_pydict(
        {"group_id": ["g1"], "kind": ["removed_sampled"], "draw_id": ["d"], "weight": [0.5]}, schema=EVENT_SCHEMA
    )
    assert [tuple(e) for e in _events_of(new)] == [("g1", "removed_sampled", "d", 0.5)]
