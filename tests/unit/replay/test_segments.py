"""Durability: a table on the same segment_dir comes back with every acknowledged trace and removal."""

from __future__ import annotations

import pathlib

import pyarrow.parquet as pq

from replay.config import ReplayConfig
from replay.schema import TRACE_SCHEMA
from replay.segments import read_dataset
from replay.synthetic import group_batch
from replay.table import ReplayTable


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(n)]


def _groups(result) -> list[str]:
    return list(dict.fromkeys(result.batch["group_id"].to_pylist()))


def _cfg(tmp_path, **kw) -> ReplayConfig:
    return ReplayConfig(segment_dir=str(tmp_path), sampler="fifo", **kw)


def test_reopen_restores_groups_order_samples_and_counts(tmp_path):
    table = ReplayTable(_cfg(tmp_path, max_times_sampled=2, capacity_groups=8))
    table.insert(group_batch(_ids("a", 6), group_size=2))
    table.insert(group_batch(_ids("b", 4), group_size=2))  # evicts a000, a001
    table.sample(2, 0)  # a002, a003 sampled once
    table.sample(1, 0)  # a002 removed (2nd sample)
    before = table.stats()
    # no close(): as after a crash
    again = ReplayTable(_cfg(tmp_path, max_times_sampled=2, capacity_groups=8), shard_id=0)
    after = again.stats()
    assert (after.groups, after.traces, after.tokens, after.bytes > 0) == (
        before.groups,
        before.traces,
        before.tokens,
        True,
    )
    assert (after.evicted_capacity, after.removed_sampled, after.sampled_groups) == (2, 1, 3)
    assert _groups(again.sample(2, 0)) == ["a003", "a004"]  # a003 leaves: it was sampled once before
    assert _groups(again.sample(6, 0)) == ["a004", "a005", "b000", "b001", "b002", "b003"]


def test_restored_data_equals_inserted_data(tmp_path):
    batch = group_batch(_ids("g", 5), group_size=3, seed=7)
    ReplayTable(_cfg(tmp_path)).insert(batch)
    assert ReplayTable(_cfg(tmp_path)).sample(5, 0).batch.equals(batch)


def test_checkpoint_then_more_work_then_restore(tmp_path):
    table = ReplayTable(_cfg(tmp_path, max_times_sampled=None))
    table.insert(group_batch(_ids("a", 4)))
    table.sample(1, 0)
    path = table.checkpoint()
    assert pathlib.Path(path).exists()
    table.update_priorities(["a001"], [5.0])  # after the checkpoint: not durable, by design
    table.insert(group_batch(_ids("b", 2)))
    again = ReplayTable(_cfg(tmp_path, max_times_sampled=None))
    s = again.stats()
    assert (s.groups, s.inserted_groups, s.sampled_groups) == (6, 6, 1)
    assert again._groups["a000"].times_sampled == 1  # noqa: SLF001 - restored remover state
    assert _groups(again.sample(6, 0)) == _ids("a", 4) + _ids("b", 2)


def test_segments_are_the_runs_dataset_and_skip_rejected_groups(tmp_path):
    table = ReplayTable(_cfg(tmp_path, capacity_groups=2, on_full="block"))
    table.insert(group_batch(_ids("g", 3), group_size=2))  # g002 rejected: full
    table.sample(2, 0)  # consumed groups stay in the dataset
    table.close()
    data = read_dataset(str(tmp_path))
    assert data.schema.equals(TRACE_SCHEMA)
    assert sorted(set(data["group_id"].to_pylist())) == ["g000", "g001"] and data.num_rows == 4
    sealed = list((tmp_path / "shard-0").glob("traces-*.parquet"))
    assert len(sealed) == 1 and pq.read_table(sealed[0]).num_rows == 4  # any Parquet reader works
    assert not list((tmp_path / "shard-0").glob("traces-*.arrow"))


def test_a_crashed_open_segment_is_sealed_on_the_next_open(tmp_path):
    table = ReplayTable(_cfg(tmp_path))
    batch = group_batch(_ids("g", 2))
    table.insert(batch)  # no close(): the stream segment is left open, as after kill -9
    assert read_dataset(str(tmp_path)).num_rows == batch.num_rows  # readable even unsealed
    ReplayTable(_cfg(tmp_path))
    assert [p.suffix for p in (tmp_path / "shard-0").glob("traces-*")] == [".parquet"]
    assert read_dataset(str(tmp_path)).to_batches()[0].equals(batch)


def test_torn_tail_is_ignored(tmp_path):
    table = ReplayTable(_cfg(tmp_path))
    table.insert(group_batch(_ids("a", 2)))
    table.insert(group_batch(_ids("b", 2)))
    seg = next((tmp_path / "shard-0").glob("traces-*.arrow"))
    raw = seg.read_bytes()
    seg.write_bytes(raw[:-100])  # the second insert was cut mid-write (it was never acknowledged)
    again = ReplayTable(_cfg(tmp_path))
    assert _groups(again.sample(2, 0)) == ["a000", "a001"] and len(again) == 0


def test_segments_roll_over_at_segment_bytes(tmp_path):
    table = ReplayTable(_cfg(tmp_path, segment_bytes=1 << 16, max_times_sampled=None))
    for i in range(20):
        table.insert(group_batch([f"g{i:03d}"], group_size=8, completion_tokens=200))
    assert len(list((tmp_path / "shard-0").glob("traces-*.parquet"))) > 1
    assert len(ReplayTable(_cfg(tmp_path, max_times_sampled=None))) == 20


def test_rewind_to_a_snapshot_returns_its_groups_plus_later_inserts(tmp_path):
    from replay.segments import rewind

    table = ReplayTable(_cfg(tmp_path, max_times_sampled=1))
    table.insert(group_batch(_ids("a", 3), group_size=2))
    snap = pathlib.Path(table.checkpoint())  # a learner checkpoint is taken here
    table.sample(2, 0)  # consumed by learner steps that the crash will discard
    table.insert(group_batch(_ids("b", 2), group_size=2, seed=1))  # acknowledged after the checkpoint
    table.checkpoint()  # a later replay snapshot whose learner checkpoint never completed
    table.sample(1, 0)
    # without rewind the restored table reflects the samples of the lost steps
    assert len(ReplayTable(_cfg(tmp_path, max_times_sampled=1))) == 2
    moved = rewind(snap.parent, int(snap.stem.split("-")[1]), tag="t1")
    assert moved and all(".rolled-back-t1" in p.name for p in moved)
    again = ReplayTable(_cfg(tmp_path, max_times_sampled=1))
    assert _groups(again.sample(5, 0)) == ["a000", "a001", "a002", "b000", "b001"]
    assert read_dataset(str(tmp_path)).num_rows == 10  # traces are never set aside


def test_rewind_to_a_missing_snapshot_says_the_directory_does_not_match(tmp_path):
    import pytest

    from replay.segments import rewind

    ReplayTable(_cfg(tmp_path)).insert(group_batch(_ids("a", 1)))
    with pytest.raises(FileNotFoundError, match="snapshot 7 is missing"):
        rewind(tmp_path / "shard-0", 7, tag="t")
