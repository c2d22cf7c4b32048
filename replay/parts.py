"""One sample cut into per-rank parts where the data lives, so the coordinator only sees ids and sizes.

Contract (pure Python + pyarrow, no ray):
- `split_for_ranks(result, ranks)` turns a `SampleResult` into a `SampleMeta` (small: ids, counts,
  staleness, weights — what a driver needs to log and to feed priorities back) and `ranks` `RankPart`s
  (Arrow traces of whole groups, `TRACE_SCHEMA`, plus one replay weight per group).
- Every sampled group goes to exactly one part, whole; groups are assigned longest-processing-time
  first (largest token count to the currently lightest part), so parts differ by at most one group's
  tokens (Graham's LPT bound: within 4/3 of the optimal makespan). With at least as many groups as
  parts, every part gets one.
- `RankPart.group_weights[j]` belongs to the j-th group in order of first appearance in `traces`.
  The weights are replay's: prioritized-replay importance weights times the staleness down-weight
  factor, in (0, 1] (replay/samplers.py, replay/table.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from replay.table import SampleResult


@dataclasses.dataclass(frozen=True)
class RankPart:
    """What one learner rank trains on from one shard's draw."""

    traces: pa.Table  # TRACE_SCHEMA, whole groups, each group's rows contiguous
    group_weights: tuple[float, ...]  # one per group, in order of first appearance in `traces`

    @property
    def num_groups(self) -> int:
        return len(self.group_weights)


@dataclasses.dataclass(frozen=True)
class SampleMeta:
    """The control-plane view of one draw: no token ids, only what the coordinator logs and routes."""

    group_ids: tuple[tuple[str, ...], ...]  # per rank, the groups its part holds
    traces: tuple[int, ...]  # per rank
    tokens: tuple[int, ...]  # per rank, prompt + completion tokens
    staleness: tuple[int, ...]  # per group (all ranks, rank order)
    group_weights: tuple[float, ...]  # per group (same order as `staleness`)
    policy_versions: tuple[int, ...]  # distinct trace policy_versions in the draw, sorted
    groups_left: int = 0  # groups the shard could still give right after this draw (the client's plan)

    @property
    def num_groups(self) -> int:
        return len(self.staleness)


def empty_meta(ranks: int, groups_left: int = 0) -> SampleMeta:
    """A draw that found nothing (every rank's part is None)."""
    return SampleMeta(((),) * ranks, (0,) * ranks, (0,) * ranks, (), (), (), groups_left)


def token_balanced_assignment(tokens: np.ndarray, parts: int, first_part: int = 0) -> np.ndarray:
    """Part index for each group `[G]` given its token count `[G]`: LPT greedy.

    Ties go to the lowest part counting from `first_part`: shards drawing for the same step start at
    different parts (the client passes how many groups earlier shards drew), so small draws spread out.
    """
    loads = np.zeros(parts, dtype=np.int64)
    order = (np.arange(parts) + first_part) % parts
    out = np.empty(len(tokens), dtype=np.int64)
    for g in np.argsort(-np.asarray(tokens, dtype=np.int64), kind="stable"):
        k = int(order[np.argmin(loads[order])])
        out[g] = k
        loads[k] += int(tokens[g])
    return out


def _group_spans(batch: pa.RecordBatch | pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(start row, row count) of each group; replay returns each group's rows contiguously."""
    gid = batch.column("group_id")
    codes = pc.index_in(gid, value_set=pc.unique(gid)).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    if len(starts) != len(np.unique(codes)):
        raise ValueError("a sampled batch must hold each group's traces contiguously (replay/table.py returns them so)")
    return starts, np.diff(np.r_[starts, len(codes)])


def _row_tokens(batch: pa.RecordBatch | pa.Table) -> np.ndarray:
    lengths = [
        pc.list_value_length(batch.column(c)).to_numpy(zero_copy_only=False) for c in ("prompt_ids", "completion_ids")
    ]
    return (lengths[0] + lengths[1]).astype(np.int64)


def split_for_ranks(
    result: SampleResult, ranks: int, groups_left: int = 0, first_part: int = 0
) -> tuple[SampleMeta, list[RankPart | None]]:
    """Cut one shard's sample into `ranks` token-balanced parts (module docstring); a part without groups is None."""
    if ranks < 1:
        raise ValueError(f"ranks={ranks}; split for at least one learner rank")
    table = pa.Table.from_batches([result.batch]) if isinstance(result.batch, pa.RecordBatch) else result.batch
    starts, counts = _group_spans(table)
    group_tokens = np.add.reduceat(_row_tokens(table), starts) if len(starts) else np.zeros(0, np.int64)
    owner = token_balanced_assignment(group_tokens, ranks, first_part)
    gids = table.column("group_id").take(pa.array(starts)).to_pylist()
    parts: list[RankPart | None] = []
    for k in range(ranks):
        mine = np.flatnonzero(owner == k)
        if len(mine) == 0:
            parts.append(None)
            continue
        rows = np.concatenate([np.arange(starts[g], starts[g] + counts[g]) for g in mine])
        parts.append(RankPart(table.take(pa.array(rows)), tuple(result.group_weights[g] for g in mine)))
    meta = SampleMeta(
        group_ids=tuple(tuple(gids[g] for g in np.flatnonzero(owner == k)) for k in range(ranks)),
        traces=tuple(int(counts[owner == k].sum()) for k in range(ranks)),
        tokens=tuple(int(group_tokens[owner == k].sum()) for k in range(ranks)),
        staleness=tuple(int(result.staleness[g]) for k in range(ranks) for g in np.flatnonzero(owner == k)),
        group_weights=tuple(float(result.group_weights[g]) for k in range(ranks) for g in np.flatnonzero(owner == k)),
        policy_versions=tuple(sorted(pc.unique(table.column("policy_version")).to_pylist())),
        groups_left=groups_left,
    )
    return meta, parts


def merge_metas(metas: list[SampleMeta]) -> SampleMeta:
    """Several shards' draws for the same ranks as one (rank k's ids/counts concatenated/summed)."""
    ranks = len(metas[0].traces)
    return SampleMeta(
        group_ids=tuple(tuple(g for m in metas for g in m.group_ids[k]) for k in range(ranks)),
        traces=tuple(sum(m.traces[k] for m in metas) for k in range(ranks)),
        tokens=tuple(sum(m.tokens[k] for m in metas) for k in range(ranks)),
        staleness=tuple(s for m in metas for s in m.staleness),
        group_weights=tuple(w for m in metas for w in m.group_weights),
        policy_versions=tuple(sorted({v for m in metas for v in m.policy_versions})),
        groups_left=sum(m.groups_left for m in metas),
    )


def join_parts(parts: list[RankPart | None]) -> RankPart:
    """One rank's parts from several shards as one (groups stay whole and in order)."""
    kept = [p for p in parts if p is not None]
    if not kept:
        raise ValueError("this rank got no groups in this step; sample at least as many groups as learner ranks")
    traces = kept[0].traces if len(kept) == 1 else pa.concat_tables([p.traces for p in kept])
    return RankPart(traces, tuple(w for p in kept for w in p.group_weights))
