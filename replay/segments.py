"""Durable replay: each shard appends Arrow IPC stream segments under `<segment_dir>/shard-<id>/`.

Layout (segment index k = 0, 1, ...; a new index starts at every open, checkpoint and roll-over):
- `traces-<k>.arrow`  every acknowledged trace (TRACE_SCHEMA), written and flushed before `insert`
  returns. When the segment is closed (roll-over, checkpoint, close, or the next open after a crash)
  it is sealed into `traces-<k>.parquet`: the run's dataset, readable with pyarrow, pandas, duckdb
  (`read_dataset(segment_dir)` reads every shard, sealed or not).
- `events-<k>.arrow`  (group_id, kind) for every sample ("sampled") and removal (evicted_stale,
  evicted_capacity, removed_sampled), also flushed before the call returns.
- `snapshot-<k>.arrow` + `snapshot-<k>.json` (written by `checkpoint`, json last and atomically): the
  groups held after segment k, with times_sampled, priority and counters.
Restore = newest snapshot + every traces/events segment after it. A torn last message (kill -9
mid-write) is ignored: it was never acknowledged. `rewind(root, k, tag)` makes snapshot k the newest
and sets aside (renames, never deletes) the events and snapshots after it, so a restore yields snapshot
k's groups plus every trace acknowledged since: what a learner resumed from a checkpoint taken with
snapshot k has not consumed yet. Each group is inserted at most once, so applying
all inserts and then all events yields the state the shard had when it died.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re

import pyarrow as pa
import pyarrow.parquet as pq

from replay.config import ReplayConfig
from replay.schema import TRACE_SCHEMA

EVENT_SCHEMA = pa.schema(
    [pa.field("group_id", pa.string(), nullable=False), pa.field("kind", pa.string(), nullable=False)]
)


@dataclasses.dataclass
class Restored:
    """What a table needs to rebuild itself: batches in insertion order and the events after them."""

    snapshot_batches: list[pa.RecordBatch]  # groups held at the snapshot, in insertion order
    batches: list[pa.RecordBatch]  # acknowledged inserts after the snapshot, in order
    group_state: dict[str, tuple[int, float]]  # group_id -> (times_sampled, priority), from the snapshot
    events: list[tuple[str, str]]  # (group_id, kind) in order
    counts: dict[str, int]
    limiter: tuple[int, int]  # (inserts, samples)


class _Appender:
    """One IPC stream file opened for append; every write is flushed (and fsynced if asked)."""

    def __init__(self, path: pathlib.Path, schema: pa.Schema, fsync: bool):
        self.path, self.fsync = path, fsync
        self.file = open(path, "wb")
        self.writer = pa.ipc.new_stream(self.file, schema)

    def write(self, batch: pa.RecordBatch) -> None:
        self.writer.write_batch(batch)
        self.file.flush()
        if self.fsync:
            os.fsync(self.file.fileno())

    def close(self) -> None:
        self.writer.close()
        self.file.close()


def read_stream(path: pathlib.Path) -> list[pa.RecordBatch]:
    """Every complete batch of an IPC stream file; a torn tail (crash mid-write) is dropped."""
    out = []
    try:
        with pa.ipc.open_stream(pa.memory_map(str(path))) as reader:
            for batch in reader:
                out.append(batch)
    except (pa.ArrowInvalid, OSError, EOFError):
        pass
    return out


def read_traces(path: pathlib.Path) -> list[pa.RecordBatch]:
    """A traces segment, sealed (.parquet) or still open (.arrow stream)."""
    if path.suffix == ".parquet":
        return pq.read_table(path, schema=TRACE_SCHEMA).to_batches()
    return read_stream(path)


def seal(stream_path: pathlib.Path) -> pathlib.Path:
    """Rewrite a closed traces stream as Parquet (atomically), then delete the stream."""
    batches = read_stream(stream_path)
    out = stream_path.with_suffix(".parquet")
    if batches:
        tmp = stream_path.with_suffix(".parquet.tmp")
        pq.write_table(pa.Table.from_batches(batches, TRACE_SCHEMA), tmp)
        os.replace(tmp, out)
    stream_path.unlink()
    return out


def read_dataset(segment_dir: str) -> pa.Table:
    """Every acknowledged trace of every shard under `segment_dir`, in segment order per shard."""
    paths = sorted(pathlib.Path(segment_dir).glob("shard-*/traces-*.*"))
    batches = [b for p in paths if p.suffix in (".arrow", ".parquet") for b in read_traces(p)]
    return pa.Table.from_batches(batches, TRACE_SCHEMA)


def rewind(root: pathlib.Path, snapshot_index: int, tag: str) -> list[pathlib.Path]:
    """Set aside events-<j>.* and snapshot-<j>.* for j > snapshot_index under one shard's `root`
    (renamed to `<name>.rolled-back-<tag>`); traces are kept. Returns the renamed paths."""
    if not (root / f"snapshot-{snapshot_index:06d}.json").exists():
        raise FileNotFoundError(
            f"{root}: snapshot {snapshot_index} is missing; the replay directory does not "
            "belong to this checkpoint (replay.segment_dir changed or was cleaned)"
        )
    moved = []
    for prefix in ("events", "snapshot"):
        for p in sorted(root.glob(f"{prefix}-*.*")):
            m = re.match(rf"{prefix}-(\d+)\.\w+$", p.name)
            if m and int(m.group(1)) > snapshot_index:
                target = p.with_name(f"{p.name}.rolled-back-{tag}")
                os.replace(p, target)
                moved.append(target)
    return moved


def _indices(root: pathlib.Path, prefix: str) -> list[int]:
    pat = re.compile(rf"{prefix}-(\d+)\.\w+$")
    return sorted({int(m.group(1)) for p in root.iterdir() if (m := pat.match(p.name))})


class SegmentStore:
    def __init__(self, cfg: ReplayConfig, shard_id: int):
        self.cfg = cfg
        self.root = pathlib.Path(cfg.segment_dir) / f"shard-{shard_id}"
        self.root.mkdir(parents=True, exist_ok=True)
        existing = _indices(self.root, "traces") + _indices(self.root, "events") + _indices(self.root, "snapshot")
        self.index = max(existing, default=-1) + 1
        for stale in self.root.glob("traces-*.arrow"):  # left open by a crash: complete batches only
            seal(stale)
        self._traces: _Appender | None = None
        self._events: _Appender | None = None

    def _name(self, prefix: str, k: int, ext: str = "arrow") -> pathlib.Path:
        return self.root / f"{prefix}-{k:06d}.{ext}"

    def _open(self) -> None:
        if self._traces is None:
            self._traces = _Appender(self._name("traces", self.index), TRACE_SCHEMA, self.cfg.fsync)
            self._events = _Appender(self._name("events", self.index), EVENT_SCHEMA, self.cfg.fsync)

    def _roll(self) -> None:
        if self._traces is not None:
            self._traces.close()
            self._events.close()
            seal(self._traces.path)
            self._traces = self._events = None
            self.index += 1

    def append_traces(self, batch: pa.RecordBatch) -> None:
        self._open()
        self._traces.write(batch)
        if self._traces.file.tell() >= self.cfg.segment_bytes:
            self._roll()

    def append_events(self, group_ids: list[str], kind: str) -> None:
        if group_ids:
            self._open()
            self._events.write(
                pa.RecordBatch.from_pydict(
                    {"group_id": group_ids, "kind": [kind] * len(group_ids)}, schema=EVENT_SCHEMA
                )
            )

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
        with pa.OSFile(str(self._name("snapshot", k)), "wb") as f, pa.ipc.new_file(f, TRACE_SCHEMA) as w:
            for b in held_batches:
                w.write_batch(b)
        meta = {"groups": group_state, "counts": dict(counts), "limiter": list(limiter)}
        path = self._name("snapshot", k, "json")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, path)
        return str(path)

    def restore(self) -> Restored | None:
        """Read the newest snapshot and every later segment; None if the directory holds nothing."""
        snaps = [k for k in _indices(self.root, "snapshot") if self._name("snapshot", k, "json").exists()]
        base = max(snaps, default=-1)
        restored = Restored([], [], {}, [], {}, (0, 0))
        if base >= 0:
            meta = json.loads(self._name("snapshot", base, "json").read_text())
            restored.snapshot_batches = pa.ipc.open_file(str(self._name("snapshot", base))).read_all().to_batches()
            restored.group_state = {g: tuple(v) for g, v in meta["groups"].items()}
            restored.counts, restored.limiter = meta["counts"], tuple(meta["limiter"])
        for k in (k for k in _indices(self.root, "traces") if k > base):
            restored.batches += read_traces(self._name("traces", k, "parquet"))
        for k in (k for k in _indices(self.root, "events") if k > base):
            for b in read_stream(self._name("events", k)):
                restored.events += list(zip(b["group_id"].to_pylist(), b["kind"].to_pylist()))
        empty = not restored.batches and not restored.events and base < 0
        return None if empty else restored

    def close(self) -> None:
        self._roll()
