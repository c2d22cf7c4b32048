"""Append-only journal of Arrow record batches, checksummed per record, with corruption quarantined.

File layout (`*.log`): a sequence of records, each
    MAGIC (4 bytes) | payload length (u32) | crc32(payload) (u32) | crc32(the 12 bytes before) (u32) | payload
The first record's payload is the serialized Arrow schema; every later one an encapsulated IPC
record batch of that schema (`RecordBatch.serialize`). Arrow's IPC stream format has no checksums:
a flipped bit in a buffer reads back as wrong data, and a damaged message length stops the reader,
silently dropping every later batch. Here every record is verified, and a bad region is skipped by
scanning for the next record whose header and payload checksums hold (the approach of LevelDB's and
RocksDB's write-ahead logs).

`read_journal` returns the good batches and classifies what it skipped:
- a torn tail: bytes at the end that stop mid-record (a crash mid-write: never acknowledged);
- corrupt regions: bad bytes followed by a good record, or a complete record whose checksum fails.
`quarantine` copies skipped bytes to `<dir>/quarantine/<file>.<offset>.bad` so nothing is dropped
silently: the caller counts and logs them.

Durability: `JournalWriter.append` flushes every record, and with `fsync=True` calls fsync(2) before
returning; creating a journal fsyncs its directory, so the file itself survives a power loss.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import struct
import zlib

import pyarrow as pa

MAGIC = b"FWJ1"
_HEADER = struct.Struct("<4sIII")  # magic, payload length, payload crc32, crc32 of the first 12 bytes
MAX_RECORD_BYTES = 1 << 31


def fsync_dir(path: pathlib.Path) -> None:
    """Make a directory's entries (a created, renamed or removed file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: pathlib.Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def frame(payload: bytes | pa.Buffer) -> bytes:
    """One record: header + payload."""
    data = memoryview(payload)
    head = struct.pack("<4sII", MAGIC, len(data), zlib.crc32(data))
    return head + struct.pack("<I", zlib.crc32(head)) + bytes(data)


class JournalWriter:
    """Appends batches of one schema to a new journal file; every append is flushed (and fsynced if asked)."""

    def __init__(self, path: pathlib.Path, schema: pa.Schema, fsync: bool):
        self.path, self.schema, self.fsync = path, schema, fsync
        self.file = open(path, "xb")
        self._write(schema.serialize())
        if fsync:
            fsync_dir(path.parent)

    def append(self, batch: pa.RecordBatch) -> None:
        self._write(batch.serialize())

    def _write(self, payload: pa.Buffer) -> None:
        self.file.write(frame(payload))
        self.file.flush()
        if self.fsync:
            os.fsync(self.file.fileno())

    def tell(self) -> int:
        return self.file.tell()

    def close(self) -> None:
        if self.fsync:
            os.fsync(self.file.fileno())
        self.file.close()


@dataclasses.dataclass
class JournalRead:
    schema: pa.Schema | None
    batches: list[pa.RecordBatch]
    corrupt: list[tuple[int, int]]  # (offset, nbytes) of each corrupt region
    torn_tail: tuple[int, int] | None  # (offset, nbytes) of an incomplete last record

    @property
    def skipped(self) -> list[tuple[int, int]]:
        return self.corrupt + ([self.torn_tail] if self.torn_tail else [])


def _record_at(data: memoryview, pos: int) -> tuple[int, memoryview] | str:
    """(end, payload) of a valid record at `pos`, else why not: 'short' (runs past the end) or 'bad'."""
    if len(data) - pos < _HEADER.size:
        return "short"
    magic, n, crc, head_crc = _HEADER.unpack_from(data, pos)
    if magic != MAGIC or zlib.crc32(data[pos : pos + 12]) != head_crc or n > MAX_RECORD_BYTES:
        return "bad"
    end = pos + _HEADER.size + n
    if end > len(data):
        return "short"
    payload = data[pos + _HEADER.size : end]
    return (end, payload) if zlib.crc32(payload) == crc else "bad"


def _next_record(data: memoryview, start: int) -> int | None:
    """Offset of the next valid record after `start` (a resync after a bad region), or None."""
    raw = data.obj if isinstance(data.obj, bytes) else bytes(data)
    pos = raw.find(MAGIC, start + 1)
    while pos != -1:
        if not isinstance(_record_at(data, pos), str):
            return pos
        pos = raw.find(MAGIC, pos + 1)
    return None


def read_journal(path: pathlib.Path, schema: pa.Schema | None = None) -> JournalRead:
    """Every valid batch of a journal, in order, and the regions it had to skip (see module docstring).
    `schema` decodes batches if the file's own schema record was lost."""
    data = memoryview(path.read_bytes())
    out = JournalRead(schema, [], [], None)
    pos = 0
    while pos < len(data):
        rec = _record_at(data, pos)
        if isinstance(rec, str):
            resume = _next_record(data, pos)
            if resume is None:
                region = (pos, len(data) - pos)
                if rec == "short" and _cut_short(data, pos):
                    out.torn_tail = region
                else:
                    out.corrupt.append(region)
                break
            out.corrupt.append((pos, resume - pos))
            pos = resume
            continue
        end, payload = rec
        if not _decode(out, payload):
            out.corrupt.append((pos, end - pos))
        pos = end
    return out


def _cut_short(data: memoryview, pos: int) -> bool:
    """A record that stops at the end of the file with an intact header (or a header cut short) is a
    write that did not finish; anything else at the tail is damage."""
    if len(data) - pos < _HEADER.size:
        return True
    magic, _, _, head_crc = _HEADER.unpack_from(data, pos)
    return magic == MAGIC and zlib.crc32(data[pos : pos + 12]) == head_crc


def _decode(out: JournalRead, payload: memoryview) -> bool:
    """Add a checksummed record to `out` (the schema, or a batch); False if it does not decode."""
    try:
        msg = pa.ipc.read_message(pa.py_buffer(payload))
        if msg.type == "schema":
            out.schema = pa.ipc.read_schema(msg)
        elif out.schema is None:
            return False
        else:
            out.batches.append(pa.ipc.read_record_batch(msg, out.schema))
    except (pa.ArrowInvalid, OSError):
        return False
    return True


def quarantine(path: pathlib.Path, regions: list[tuple[int, int]]) -> list[pathlib.Path]:
    """Copy each skipped region of `path` to `<dir>/quarantine/<name>.<offset>.bad`; returns the copies."""
    if not regions:
        return []
    qdir = path.parent / "quarantine"
    qdir.mkdir(exist_ok=True)
    out = []
    with open(path, "rb") as f:
        for offset, nbytes in regions:
            f.seek(offset)
            target = qdir / f"{path.name}.{offset}.bad"
            target.write_bytes(f.read(nbytes))
            out.append(target)
    fsync_dir(qdir)
    return out


class ChecksumFile:
    """A write-only file (a sink for pyarrow writers) that keeps the crc32 and size of what went through it;
    on leaving the `with` block it is flushed, fsynced if asked, and closed."""

    def __init__(self, path: pathlib.Path, fsync: bool):
        self.file, self.fsync = open(path, "wb"), fsync
        self.crc, self.size, self.closed = 0, 0, False

    def write(self, data) -> int:
        view = memoryview(data)
        self.crc = zlib.crc32(view, self.crc)
        self.size += view.nbytes
        return self.file.write(view)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:  # pyarrow closes its sink; the file stays open until __exit__ syncs it
        self.closed = True

    def __enter__(self) -> ChecksumFile:
        return self

    def __exit__(self, *exc) -> None:
        self.file.flush()
        if self.fsync and exc[0] is None:
            os.fsync(self.file.fileno())
        self.file.close()
