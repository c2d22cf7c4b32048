"""The checksummed journal: every damaged byte is detected, and damage never hides the records around it."""

from __future__ import annotations

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from replay.journal import JournalWriter, quarantine, read_journal

SCHEMA = pa.schema([pa.field("x", pa.int64(), nullable=False), pa.field("s", pa.string(), nullable=False)])


def _batch(i: int) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict({"x": [i] * 3, "s": [f"row-{i}"] * 3}, schema=SCHEMA)


def _journal(path, n: int) -> list[int]:
    """Write n batches; return each record's start offset (schema record first)."""
    w = JournalWriter(path, SCHEMA, fsync=False)
    starts = [0]
    for i in range(n):
        starts.append(w.tell())
        w.append(_batch(i))
    w.close()
    return starts


def _xs(read) -> list[int]:
    return [b["x"][0].as_py() for b in read.batches]


def test_round_trip_and_schema_from_the_file(tmp_path):
    _journal(tmp_path / "j.log", 4)
    got = read_journal(tmp_path / "j.log")
    assert got.schema.equals(SCHEMA) and _xs(got) == [0, 1, 2, 3] and got.skipped == []
    assert all(b.equals(_batch(i)) for i, b in enumerate(got.batches))


def test_a_corrupt_middle_record_is_skipped_and_the_rest_kept(tmp_path):
    path = tmp_path / "j.log"
    starts = _journal(path, 5)
    raw = bytearray(path.read_bytes())
    raw[starts[3] + 40] ^= 0x01  # one bit inside record 2's payload
    path.write_bytes(raw)
    got = read_journal(path)
    assert _xs(got) == [0, 1, 3, 4]
    assert got.corrupt == [(starts[3], starts[4] - starts[3])] and got.torn_tail is None
    (copy,) = quarantine(path, got.corrupt)
    assert copy.read_bytes() == raw[starts[3] : starts[4]] and copy.parent.name == "quarantine"


def test_a_damaged_length_does_not_hide_later_records(tmp_path):
    path = tmp_path / "j.log"
    starts = _journal(path, 4)
    raw = bytearray(path.read_bytes())
    raw[starts[2] + 5] ^= 0xFF  # record 1's length field (an Arrow stream reader would stop here)
    path.write_bytes(raw)
    assert _xs(read_journal(path)) == [0, 2, 3]


def test_torn_tail_versus_damaged_tail(tmp_path):
    path = tmp_path / "j.log"
    starts = _journal(path, 3)
    raw = path.read_bytes()
    path.write_bytes(raw[:-7])  # the last append stopped part way: never acknowledged
    got = read_journal(path)
    assert _xs(got) == [0, 1] and got.torn_tail == (starts[3], len(raw) - 7 - starts[3]) and got.corrupt == []
    flipped = bytearray(raw)
    flipped[-3] ^= 0x10  # the last record is whole but wrong: damage, not a torn write
    path.write_bytes(flipped)
    got = read_journal(path)
    assert _xs(got) == [0, 1] and got.torn_tail is None and got.corrupt == [(starts[3], len(raw) - starts[3])]


@settings(max_examples=150, deadline=None)
@given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_any_single_bit_flip_costs_at_most_its_own_record(tmp_path_factory, position, bit):
    path = tmp_path_factory.mktemp("j") / "j.log"
    starts = _journal(path, 6)
    raw = bytearray(path.read_bytes())
    position %= len(raw)
    raw[position] ^= 1 << bit
    path.write_bytes(raw)
    got = read_journal(path, SCHEMA)
    hit = max(i for i, s in enumerate(starts) if s <= position) - 1  # -1: the schema record
    expected = [i for i in range(6) if i != hit]
    assert _xs(got) == expected  # nothing wrong is returned, nothing but the damaged record is lost
    assert got.skipped  # and the damage is reported
    assert all(b.equals(_batch(i)) for i, b in zip(expected, got.batches))
