"""Durable replay: each shard journals what it acknowledges under `<segment_dir>/shard-<id>/`.

Layout (segment index k = 0, 1, ...; a new index starts at every open, checkpoint and roll-over):
- `traces-<k>.log`    every acknowledged trace (TRACE_SCHEMA) as checksummed records (replay/journal.py),
  written before `insert` returns: flushed, and with `replay.fsync` (the default) fsynced. When the
  segment closes (roll-over, checkpoint, close, or the next open after a crash) it is sealed into
  `traces-<k>.parquet` (with page checksums): the run's dataset, readable with pyarrow, pandas or
  duckdb (`read_dataset(segment_dir)` reads every shard, sealed or not).
- `events-<k>.log`    (group_id, kind, draw_id, weight) for every sample ("sampled") and removal
  (evicted_stale, evicted_capacity, removed_sampled), with the same guarantees; a sample's events carry
  the caller's draw id and each group's sampling weight, so a shard that dies after journalling a draw but
  before its reply arrived can hand the same groups out again once restarted (`ReplayTable.reclaim`).
- `snapshot-<k>.arrow` + `snapshot-<k>.json` (by `checkpoint`): the groups held after segment k, with
  times_sampled, priority and counters. The .arrow file is fsynced first; the json, written last and
  atomically, carries its size and crc32, so a snapshot counts only once it is whole.
- `quarantine/`       bytes a read had to skip, kept for inspection (see Corruption).
Every file creation, rename and removal is followed by an fsync of the directory when `fsync` is on.

Restore = newest snapshot + every traces/events segment after it. `rewind(root, k, tag)` makes snapshot
k the newest and sets aside (renames, never deletes) the events and snapshots after it, so a restore
yields snapshot k's groups plus every trace acknowledged since. Each group is inserted at most once,
so applying all inserts and then all events yields the state the shard had when it died.
`prune(root, k)` deletes what no restore from snapshot k or later needs: older snapshots, events and
set-aside files (and, if asked, older sealed traces, which are otherwise kept as the dataset).

Corruption. A torn tail (a record cut short at the end of a journal: a crash mid-write) was never
acknowledged: it is dropped and counted as torn. A record that fails its checksum anywhere else is
skipped, every record after it is kept, its bytes go to quarantine/, and it is counted
(`Restored.quarantined`) and logged as an error. A sealed Parquet file that fails to read is moved to
quarantine/ whole and counted. A snapshot whose checksum fails raises `ReplayCorrupt`: the groups it
held cannot be recovered from it; resume from an earlier checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
import zlib
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from replay.config import ReplayConfig
from replay.journal import ChecksumFile, JournalWriter, fsync_dir, fsync_file, quarantine, read_journal
from replay.schema import TRACE_SCHEMA, expand_prompts

log = logging.getLogger(__name__)

EVENT_SCHEMA = pa.schema(
    [
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("draw_id", pa.string()),  # the sampling call's id (null for evictions and id-less samples)
        pa.field("weight", pa.float64()),  # the group's sampling weight in that draw
    ]
)
_NAME = re.compile(r"^(traces|events|snapshot)-(\d+)\.(.+)$")
_ACTIVE = ("log", "parquet", "parquet.crc32", "arrow", "json")  # others ("json.rolled-back-<tag>") are set aside


class ReplayCorrupt(RuntimeError):
    """A replay file needed to restore the shard is damaged beyond skipping a record."""


class Event(NamedTuple):
    """One journalled sample or removal of a group."""

    group_id: str
    kind: str  # sampled | removed_sampled | evicted_stale | evicted_capacity
    draw_id: str | None = None
    weight: float | None = None


@dataclasses.dataclass
class Restored:
    """What a table needs to rebuild itself: batches in insertion order and the events after them."""

    snapshot_batches: list[pa.RecordBatch]  # groups held at the snapshot, in insertion order
    batches: list[pa.RecordBatch]  # acknowledged inserts after the snapshot, in order
    group_state: dict[str, tuple[int, float]]  # group_id -> (times_sampled, priority), from the snapshot
    events: list[Event]  # in order
    counts: dict[str, int]
    limiter: tuple[int, int]  # (inserts, samples)
    quarantined: int = 0  # corrupt regions or files skipped while opening and restoring (copied to quarantine/)
    torn_bytes: int = 0  # bytes of unfinished last records dropped (never acknowledged)


@dataclasses.dataclass
class _Damage:
    quarantined: int = 0
    torn_bytes: int = 0


def _events_of(batch: pa.RecordBatch) -> list[Event]:
    """Events of one journal batch; journals written before draw ids existed have only group_id and kind."""
    names = batch.schema.names
    cols = [batch[f].to_pylist() if f in names else [None] * batch.num_rows for f in Event._fields]
    return [Event(*row) for row in zip(*cols)]


def read_journal_checked(path: pathlib.Path, schema: pa.Schema, damage: _Damage) -> list[pa.RecordBatch]:
    """A journal's good batches; skipped regions are quarantined, counted into `damage` and logged."""
    got = read_journal(path, schema)
    if got.torn_tail:
        damage.torn_bytes += got.torn_tail[1]
        log.info(f"{path}: dropped an unfinished last record ({got.torn_tail[1]} bytes, never acknowledged)")
    if got.corrupt:
        copies = quarantine(path, got.corrupt)
        damage.quarantined += len(got.corrupt)
        log.error(
            f"{path}: {len(got.corrupt)} corrupt record region(s) skipped, the records around them kept; "
            f"the bytes are in {copies[0].parent} ({', '.join(c.name for c in copies)})"
        )
    quarantine(path, [got.torn_tail] if got.torn_tail else [])
    return got.batches


def _legacy_stream(path: pathlib.Path) -> list[pa.RecordBatch]:
    """An Arrow IPC stream segment of an older Flywheel (no checksums: read up to the first bad message)."""
    out = []
    try:
        with pa.ipc.open_stream(pa.memory_map(str(path))) as reader:
            out.extend(reader)
    except (pa.ArrowInvalid, OSError, EOFError):
        pass
    return out


def read_traces(path: pathlib.Path, damage: _Damage | None = None) -> list[pa.RecordBatch]:
    """A traces segment, sealed (.parquet) or still open (.log); a damaged Parquet file is quarantined."""
    damage = damage if damage is not None else _Damage()
    if path.suffix == ".log":
        return read_journal_checked(path, TRACE_SCHEMA, damage)
    if path.suffix == ".arrow":
        return _legacy_stream(path)
    try:
        return read_sealed(path)
    except (pa.ArrowInvalid, OSError, ValueError) as e:
        target = path.parent / "quarantine" / f"{path.name}.bad"
        target.parent.mkdir(exist_ok=True)
        os.replace(path, target)
        _crc_path(path).unlink(missing_ok=True)
        damage.quarantined += 1
        log.error(f"{path}: unreadable sealed segment ({e}); moved to {target}, its traces are not restored")
        return []


def _crc_path(parquet: pathlib.Path) -> pathlib.Path:
    return parquet.with_name(parquet.name + ".crc32")


def read_sealed(path: pathlib.Path) -> list[pa.RecordBatch]:
    """A sealed segment, checked against the whole-file crc32 written with it: Parquet's own page
    checksums leave page headers and the footer unchecked, where a flipped bit can change data silently."""
    buf = pa.memory_map(str(path)).read_buffer()
    if _crc_path(path).exists():
        want = json.loads(_crc_path(path).read_text())
        got = {"crc32": zlib.crc32(memoryview(buf)), "bytes": buf.size}
        if got != want:
            raise ValueError(f"checksum mismatch: file has {got}, written {want}")
    table = pq.read_table(pa.BufferReader(buf), schema=TRACE_SCHEMA, page_checksum_verification=True)
    return table.to_batches()


def seal(log_path: pathlib.Path, fsync: bool = True, damage: _Damage | None = None) -> pathlib.Path:
    """Rewrite a closed traces journal as Parquet, atomically and durably, then delete the journal."""
    batches = read_traces(log_path, damage)
    out = log_path.with_suffix(".parquet")
    if batches:
        tmp = log_path.with_suffix(".parquet.tmp")
        with ChecksumFile(tmp, fsync) as sink:
            pq.write_table(pa.Table.from_batches(batches, TRACE_SCHEMA), sink, write_page_checksum=True)
        crc = out.with_name(out.name + ".crc32.tmp")
        crc.write_text(json.dumps({"crc32": sink.crc, "bytes": sink.size}))
        if fsync:
            fsync_file(crc)
        os.replace(crc, _crc_path(out))
        os.replace(tmp, out)
    log_path.unlink()
    if fsync:
        fsync_dir(log_path.parent)
    return out


def read_dataset(segment_dir: str) -> pa.Table:
    """Every acknowledged trace of every shard under `segment_dir`, in segment order per shard, each with its
    prompt (replay holds a group's prompt once; a group is never split over batches)."""
    paths = sorted(p for p in pathlib.Path(segment_dir).glob("shard-*/traces-*.*") if _active(p))
    return pa.Table.from_batches([b for p in paths for b in _expanded(_read_quietly(p))], TRACE_SCHEMA)


def _expanded(batches: list[pa.RecordBatch]) -> list[pa.RecordBatch]:
    """One file's traces, each with its prompt (a Parquet row group may cut a group: expand the whole file)."""
    if not batches:
        return []
    whole = pa.Table.from_batches(batches, TRACE_SCHEMA).combine_chunks().to_batches()
    return [expand_prompts(b) for b in whole]


def _read_quietly(path: pathlib.Path) -> list[pa.RecordBatch]:
    """For readers outside the shard: skip damage without moving files the shard owns."""
    if path.suffix == ".log":
        return read_journal(path, TRACE_SCHEMA).batches
    return _legacy_stream(path) if path.suffix == ".arrow" else read_sealed(path)


def _parse(path: pathlib.Path) -> tuple[str, int, bool] | None:
    """(prefix, index, active) of a segment file name; None for anything else."""
    m = _NAME.match(path.name)
    return (m.group(1), int(m.group(2)), m.group(3) in _ACTIVE) if m else None


def _active(path: pathlib.Path) -> bool:
    parsed = _parse(path)
    return parsed is not None and parsed[2] and path.suffix in (".log", ".parquet", ".arrow")


def rewind(root: pathlib.Path, snapshot_index: int, tag: str) -> list[pathlib.Path]:
    """Set aside events-<j>.* and snapshot-<j>.* for j > snapshot_index under one shard's `root`
    (renamed to `<name>.rolled-back-<tag>`); traces are kept. Returns the renamed paths."""
    if not (root / f"snapshot-{snapshot_index:06d}.json").exists():
        raise FileNotFoundError(
            f"{root}: snapshot {snapshot_index} is missing; the replay directory does not "
            "belong to this checkpoint (replay.segment_dir changed or was cleaned)"
        )
    moved = []
    for p in sorted(root.iterdir()):
        parsed = _parse(p)
        if parsed and parsed[0] in ("events", "snapshot") and parsed[2] and parsed[1] > snapshot_index:
            target = p.with_name(f"{p.name}.rolled-back-{tag}")
            os.replace(p, target)
            moved.append(target)
    fsync_dir(root)
    return moved


def prune(root: pathlib.Path, keep_from: int, traces: bool = False) -> list[pathlib.Path]:
    """Delete what no restore from snapshot `keep_from` or later needs: snapshots, events and set-aside
    files with a lower index, and with `traces` also older sealed traces (else kept as the dataset)."""
    removed = []
    for p in sorted(root.iterdir()):
        parsed = _parse(p)
        if parsed is None or parsed[1] >= keep_from:
            continue
        prefix, _, active = parsed
        if prefix != "traces" or not active or (traces and p.suffix == ".parquet"):
            p.unlink()
            removed.append(p)
    if removed:
        fsync_dir(root)
    return removed


def snapshot_index(snapshot_json: str | pathlib.Path) -> int:
    """k of a `.../snapshot-<k>.json` path."""
    return int(pathlib.Path(snapshot_json).stem.split("-")[1])


def _indices(root: pathlib.Path) -> list[int]:
    """Every index in use, set-aside files included, so a new segment never reuses a name."""
    return sorted({parsed[1] for p in root.iterdir() if (parsed := _parse(p))})


class SegmentStore:
    def __init__(self, cfg: ReplayConfig, shard_id: int):
        self.cfg = cfg
        self.root = pathlib.Path(cfg.segment_dir) / f"shard-{shard_id}"
        self.root.mkdir(parents=True, exist_ok=True)
        self.index = max(_indices(self.root), default=-1) + 1
        self.damage = _Damage()
        for stale in sorted([*self.root.glob("traces-*.log"), *self.root.glob("traces-*.arrow")]):
            seal(stale, cfg.fsync, self.damage)  # left open by a crash: its good records only
        self._traces: JournalWriter | None = None
        self._events: JournalWriter | None = None

    def _name(self, prefix: str, k: int, ext: str = "log") -> pathlib.Path:
        return self.root / f"{prefix}-{k:06d}.{ext}"

    def _open(self) -> None:
        if self._traces is None:
            self._traces = JournalWriter(self._name("traces", self.index), TRACE_SCHEMA, self.cfg.fsync)
            self._events = JournalWriter(self._name("events", self.index), EVENT_SCHEMA, self.cfg.fsync)

    def _roll(self) -> None:
        if self._traces is not None:
            self._traces.close()
            self._events.close()
            seal(self._traces.path, self.cfg.fsync)
            self._traces = self._events = None
            self.index += 1

    def append_traces(self, batch: pa.RecordBatch) -> None:
        self._open()
        self._traces.append(batch)
        if self._traces.tell() >= self.cfg.segment_bytes:
            self._roll()

    def append_events(self, events: list[Event]) -> None:
        if events:
            self._open()
            columns = dict(zip(Event._fields, map(list, zip(*events))))
            self._events.append(pa.RecordBatch.from_pydict(columns, schema=EVENT_SCHEMA))

    def checkpoint(
        self,
        held_batches: list[pa.RecordBatch],
        group_state: dict[str, tuple[int, float]],
        counts: dict[str, int],
        limiter: tuple[int, int],
    ) -> str:
        """Snapshot the held groups; returns the snapshot's json path. Later segments start after it."""
        self._roll()
        k = self.index
        self.index += 1
        with ChecksumFile(self._name("snapshot", k, "arrow"), fsync=True) as sink:
            with pa.ipc.new_file(sink, TRACE_SCHEMA) as w:
                for b in held_batches:
                    w.write_batch(b)
        meta = {"groups": group_state, "counts": dict(counts), "limiter": list(limiter)}
        meta["arrow_crc32"], meta["arrow_bytes"] = sink.crc, sink.size
        path = self._name("snapshot", k, "json")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta))
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(self.root)
        return str(path)

    def _read_snapshot(self, k: int) -> tuple[dict, list[pa.RecordBatch]]:
        meta = json.loads(self._name("snapshot", k, "json").read_text())
        path = self._name("snapshot", k, "arrow")
        buf = pa.memory_map(str(path)).read_buffer()
        got = (buf.size, zlib.crc32(memoryview(buf)))
        if "arrow_crc32" in meta and got != (meta["arrow_bytes"], meta["arrow_crc32"]):
            raise ReplayCorrupt(
                f"{path} fails its checksum (size {buf.size}, expected {meta['arrow_bytes']}): the groups replay "
                "held at that checkpoint cannot be restored; resume from an earlier checkpoint "
                "(point checkpoints/latest at it) or start a new run"
            )
        return meta, pa.ipc.open_file(pa.BufferReader(buf)).read_all().to_batches()

    def restore(self) -> Restored | None:
        """Read the newest snapshot and every later segment; None if the directory holds nothing."""
        snaps = [k for k in _indices(self.root) if self._name("snapshot", k, "json").exists()]
        base = max(snaps, default=-1)
        restored = Restored([], [], {}, [], {}, (0, 0))
        if base >= 0:
            meta, restored.snapshot_batches = self._read_snapshot(base)
            restored.group_state = {g: tuple(v) for g, v in meta["groups"].items()}
            restored.counts, restored.limiter = meta["counts"], tuple(meta["limiter"])
        damage = self.damage
        for k in (k for k in _indices(self.root) if k > base):
            if (sealed := self._name("traces", k, "parquet")).exists():
                restored.batches += read_traces(sealed, damage)
            if (events := self._name("events", k)).exists():
                for b in read_journal_checked(events, EVENT_SCHEMA, damage):
                    restored.events += _events_of(b)
        restored.quarantined, restored.torn_bytes = damage.quarantined, damage.torn_bytes
        empty = not restored.batches and not restored.events and base < 0
        return None if empty and not damage.quarantined else restored

    def close(self) -> None:
        self._roll()
