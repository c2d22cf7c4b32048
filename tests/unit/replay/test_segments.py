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
    assert after.sampled_traces == before.sampled_traces == 6  # counted from the journal, not only groups
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
    assert not list((tmp_path / "shard-0").glob("traces-*.log"))


def test_a_crashed_open_segment_is_sealed_on_the_next_open(tmp_path):
    table = ReplayTable(_cfg(tmp_path))
    batch = group_batch(_ids("g", 2))
    table.insert(batch)  # no close(): the stream segment is left open, as after kill -9
    assert read_dataset(str(tmp_path)).num_rows == batch.num_rows  # readable even unsealed
    ReplayTable(_cfg(tmp_path))
    assert sorted(p.suffix for p in (tmp_path / "shard-0").glob("traces-*")) == [".crc32", ".parquet"]
    assert read_dataset(str(tmp_path)).to_batches()[0].equals(batch)


def test_torn_tail_is_ignored(tmp_path):
    table = ReplayTable(_cfg(tmp_path))
    table.insert(group_batch(_ids("a", 2)))
    table.insert(group_batch(_ids("b", 2)))
    seg = next((tmp_path / "shard-0").glob("traces-*.log"))
    raw = seg.read_bytes()
    seg.write_bytes(raw[:-100])  # the second insert was cut mid-write (it was never acknowledged)
    again = ReplayTable(_cfg(tmp_path))
    assert _groups(again.sample(2, 0)) == ["a000", "a001"] and len(again) == 0
    assert again.stats().quarantined == 0  # a torn tail is not corruption: it was never acknowledged


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


def _record_starts(path: pathlib.Path) -> list[int]:
    from replay.journal import MAGIC

    raw, out, pos = path.read_bytes(), [], 0
    while (pos := raw.find(MAGIC, pos)) != -1:
        out.append(pos)
        pos += 1
    return out


def test_a_corrupt_middle_record_is_quarantined_counted_and_the_rest_restored(tmp_path, caplog):
    table = ReplayTable(_cfg(tmp_path))
    for prefix in "abc":
        table.insert(group_batch(_ids(prefix, 2), seed=ord(prefix)))
    seg = next((tmp_path / "shard-0").glob("traces-*.log"))
    starts = _record_starts(seg)  # schema, a, b, c
    raw = bytearray(seg.read_bytes())
    raw[starts[2] + 64] ^= 0x04  # a bit of group b's data (bit rot, a bad sector)
    seg.write_bytes(raw)
    again = ReplayTable(_cfg(tmp_path))  # the crashed segment is sealed on open: b is skipped, c is kept
    assert _groups(again.sample(4, 0)) == ["a000", "a001", "c000", "c001"]
    assert again.stats().quarantined == 1
    (bad,) = (tmp_path / "shard-0" / "quarantine").iterdir()
    assert bad.read_bytes() == raw[starts[2] : starts[3]]
    assert "corrupt record" in caplog.text and str(bad.parent) in caplog.text


def test_resume_after_a_corrupt_events_record_keeps_later_removals(tmp_path):
    table = ReplayTable(_cfg(tmp_path, max_times_sampled=1))
    table.insert(group_batch(_ids("g", 4)))
    for _ in range(3):
        table.sample(1, 0)  # three removal records: g000, g001, g002
    events = next((tmp_path / "shard-0").glob("events-*.log"))
    starts = _record_starts(events)
    raw = bytearray(events.read_bytes())
    raw[starts[2] + 30] ^= 0x80  # the record of g001's removal
    events.write_bytes(raw)
    again = ReplayTable(_cfg(tmp_path, max_times_sampled=1))
    # g001's removal is lost (it comes back: sampled twice at worst), g002's is not (no silent truncation)
    assert sorted(again._groups) == ["g001", "g003"] and again.stats().quarantined == 1  # noqa: SLF001


def test_an_unreadable_sealed_segment_is_moved_aside_and_counted(tmp_path):
    table = ReplayTable(_cfg(tmp_path))
    table.insert(group_batch(_ids("a", 2)))
    table.close()
    sealed = next((tmp_path / "shard-0").glob("traces-*.parquet"))
    raw = bytearray(sealed.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    sealed.write_bytes(raw)
    again = ReplayTable(_cfg(tmp_path))
    assert len(again) == 0 and again.stats().quarantined == 1
    assert not sealed.exists() and (tmp_path / "shard-0" / "quarantine" / f"{sealed.name}.bad").exists()


def test_a_snapshot_that_fails_its_checksum_refuses_to_restore(tmp_path):
    import pytest

    from replay.segments import ReplayCorrupt

    table = ReplayTable(_cfg(tmp_path))
    table.insert(group_batch(_ids("a", 3)))
    snap = pathlib.Path(table.checkpoint()).with_suffix(".arrow")
    raw = bytearray(snap.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    snap.write_bytes(raw)
    with pytest.raises(ReplayCorrupt, match="fails its checksum.*earlier checkpoint"):
        ReplayTable(_cfg(tmp_path))


def test_prune_keeps_exactly_what_a_restore_from_the_kept_snapshot_needs(tmp_path):
    from replay.segments import prune, snapshot_index

    table = ReplayTable(_cfg(tmp_path, max_times_sampled=1))
    snaps = []
    for prefix in "abc":
        table.insert(group_batch(_ids(prefix, 3), seed=ord(prefix)))
        table.sample(1, 0)
        snaps.append(table.checkpoint())
    table.insert(group_batch(_ids("d", 1)))
    root = tmp_path / "shard-0"
    before = sorted(ReplayTable(_cfg(tmp_path, max_times_sampled=1))._groups)  # noqa: SLF001
    keep = snapshot_index(snaps[1])
    removed = {p.name for p in prune(root, keep)}
    assert removed and all(int(n.split("-")[1].split(".")[0]) < keep for n in removed)
    assert not any(n.startswith("traces") for n in removed)  # the dataset stays
    assert not (root / pathlib.Path(snaps[0]).name).exists() and pathlib.Path(snaps[1]).exists()
    assert sorted(ReplayTable(_cfg(tmp_path, max_times_sampled=1))._groups) == before  # noqa: SLF001
    dataset_rows = read_dataset(str(tmp_path)).num_rows
    removed = {p.name for p in prune(root, keep, traces=True)}
    assert removed and all(n.startswith("traces") and n.endswith(".parquet") for n in removed)
    assert read_dataset(str(tmp_path)).num_rows < dataset_rows


def test_every_append_and_every_new_name_is_synced(tmp_path, monkeypatch):
    import os

    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    table = ReplayTable(_cfg(tmp_path))  # fsync is the default
    table.insert(group_batch(_ids("a", 1)))
    shard = str(tmp_path / "shard-0")
    log = next(p for p in calls if p.endswith(".log") and "traces" in p)
    assert calls.count(log) >= 2 and shard in calls  # the header and the insert, and the new file's directory
    calls.clear()
    table.sample(1, 0)
    assert any("events" in p for p in calls)
    calls.clear()
    table.checkpoint()  # seal + snapshot: the parquet, the arrow file, the json and the directory
    assert {p.rsplit(".", 1)[-1] for p in calls if p != shard} >= {"tmp", "arrow"} and shard in calls
    calls.clear()
    ReplayTable(_cfg(tmp_path, fsync=False)).insert(group_batch(_ids("b", 1)))
    assert not [p for p in calls if p.endswith(".log")]
