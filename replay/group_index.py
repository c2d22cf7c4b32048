"""How a table holds groups: one compacted Arrow `Chunk` per insert, each `Group` a row range of it.

Contract: `split_groups(batch, bad_rows, seen)` sorts a validated TRACE_SCHEMA batch by group_id
(stable, so traces keep their order within a group), drops every group that has an invalid row or a
group_id for which `seen` is true, and returns one chunk holding exactly the kept rows (one copy, so
the chunk never pins the caller's or Ray's buffers), the kept `Group`s in order of first
appearance of their group_id in the batch, and `(group_id, reason)` for every dropped group.
A chunk's memory is released when its last live group leaves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from replay.rejections import RejectReason


@dataclasses.dataclass(eq=False)
class Chunk:
    batch: pa.RecordBatch | None
    nbytes: int
    groups: list[Group] = dataclasses.field(default_factory=list)  # every group cut from this chunk
    live_groups: int = 0
    open: bool = True  # its insert is still admitting groups: do not release or compact it yet

    def release(self) -> None:
        self.batch = None
        self.groups = []


@dataclasses.dataclass(eq=False, slots=True)
class Group:
    group_id: str
    chunk: Chunk
    offset: int  # first row in chunk.batch
    length: int  # traces
    tokens: int  # prompt + completion tokens over the group's traces
    min_version: int  # oldest policy_version of any trace: staleness is measured from it
    priority: float
    seq: int = -1  # insertion order within the table
    times_sampled: int = 0
    live: bool = False  # held by a table

    def rows(self) -> pa.RecordBatch:
        return self.chunk.batch.slice(self.offset, self.length)


def compact(chunk: Chunk) -> Chunk:
    """Copy the live groups of `chunk` into a new chunk and re-point them; the old chunk is released.

    A table calls this when half of a chunk's groups have left, so dead rows never hold more than
    about as many bytes as live ones (each row is copied O(log group count) times at most).
    """
    live = [g for g in chunk.groups if g.live]
    batch = pa.concat_batches([g.rows() for g in live])
    new = Chunk(batch, batch.get_total_buffer_size(), live, live_groups=len(live), open=False)
    offset = 0
    for g in live:
        g.chunk, g.offset = new, offset
        offset += g.length
    chunk.release()
    return new


def _list_len(col: pa.Array) -> np.ndarray:
    return pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def _group_starts(sorted_gids: pa.Array) -> np.ndarray:
    if len(sorted_gids) == 0:
        return np.zeros(0, dtype=np.int64)
    changed = pc.not_equal(sorted_gids[1:], sorted_gids[:-1]).to_numpy(zero_copy_only=False)
    return np.concatenate([[0], np.flatnonzero(changed) + 1])


def _reason(
    gid: str, rows: np.ndarray, bad_rows: dict[int, str], seen: Callable[[str], bool]
) -> tuple[str, RejectReason] | None:
    for r in rows:
        if int(r) in bad_rows:
            return bad_rows[int(r)], RejectReason.INVALID_TRACE
    if seen(gid):
        why = (
            f"group {gid}: group_id is already held or was inserted recently; a group must arrive whole "
            "in one insert under a fresh group_id"
        )
        return why, RejectReason.DUPLICATE
    return None


def _per_group(chunk: pa.RecordBatch, starts: np.ndarray, eps: float) -> tuple[np.ndarray, ...]:
    """tokens, min policy_version, priority (reward std + eps) per group of a grouped chunk."""
    sizes = np.diff(np.append(starts, chunk.num_rows))
    tokens = np.add.reduceat(_list_len(chunk["prompt_ids"]) + _list_len(chunk["completion_ids"]), starts)
    min_version = np.minimum.reduceat(chunk["policy_version"].to_numpy(zero_copy_only=False), starts)
    r = chunk["reward"].to_numpy(zero_copy_only=False).astype(np.float64)
    mean = np.add.reduceat(r, starts) / sizes
    var = np.maximum(np.add.reduceat(r * r, starts) / sizes - mean * mean, 0.0)
    # GRPO: a group whose rewards all agree has zero advantage, so by default it gets the least priority.
    return sizes, tokens, min_version, np.sqrt(var) + eps


def split_groups(
    batch: pa.RecordBatch, bad_rows: dict[int, str], seen: Callable[[str], bool], priority_eps: float = 1e-3
) -> tuple[Chunk, list[Group], list[tuple[str, str, RejectReason]]]:
    order = pc.sort_indices(batch["group_id"]).to_numpy()
    starts = _group_starts(batch["group_id"].take(order))
    bounds = np.append(starts, batch.num_rows)
    gids = batch["group_id"].take(order[starts]).to_pylist()
    first_row = order[starts]  # groups reported in order of first appearance
    keep = np.ones(batch.num_rows, dtype=bool)
    rejected = []
    for i, gid in enumerate(gids):
        why = _reason(gid, order[bounds[i] : bounds[i + 1]], bad_rows, seen)
        if why is not None:
            keep[bounds[i] : bounds[i + 1]] = False
            rejected.append((int(first_row[i]), gid, *why))
    # Always copy: an incoming batch may be a zero-copy view of Ray's object store, which must not stay pinned.
    data = batch.take(pa.array(order[keep]))
    chunk = Chunk(data, data.get_total_buffer_size())
    kept = [i for i in range(len(gids)) if keep[bounds[i]]]
    new_starts = np.cumsum([0] + [bounds[i + 1] - bounds[i] for i in kept])[:-1].astype(np.int64)
    groups = _make_groups(chunk, [gids[i] for i in kept], new_starts, priority_eps)
    chunk.groups = list(groups)
    return chunk, _by_first_row(groups, first_row[kept]), [(g, w, r) for _, g, w, r in sorted(rejected)]


def _by_first_row(groups: list[Group], first_rows: np.ndarray) -> list[Group]:
    return [groups[i] for i in np.argsort(first_rows, kind="stable")]


def _make_groups(chunk: Chunk, gids: list[str], starts: np.ndarray, eps: float) -> list[Group]:
    if not gids:
        return []
    sizes, tokens, min_version, priority = _per_group(chunk.batch, starts, eps)
    return [
        Group(gid, chunk, int(s), int(n), int(t), int(v), float(p))
        for gid, s, n, t, v, p in zip(gids, starts, sizes, tokens, min_version, priority)
    ]
