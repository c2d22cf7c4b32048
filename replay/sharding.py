"""Spreading groups over K replay shards and drawing a sample from several of them (pure, no ray).

Contract:
- `shard_of(group_id, K)` is a stable hash (crc32), so a group's traces always land on one shard and
  every process agrees on where a group lives.
- `split_by_shard(batch, K)` returns K sub-batches (None where empty) that together hold every row once.
- `allocate(n, available, rng)` splits a sample of n groups over shards in proportion to what each
  can give: a multivariate hypergeometric draw, i.e. exactly as if n groups were drawn uniformly
  from the union of all shards; never more than a shard has; None if the shards hold fewer than n.
- `merge_samples` concatenates per-shard results; `merge_inserts` sums per-shard insert results.
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa

from replay.schema import TraceError, schema_problem
from replay.table import InsertResult, SampleResult


def shard_of(group_id: str, num_shards: int) -> int:
    return zlib.crc32(group_id.encode()) % num_shards


def split_by_shard(batch: pa.RecordBatch, num_shards: int) -> list[pa.RecordBatch | None]:
    if "group_id" not in batch.schema.names or batch.schema.field("group_id").type != pa.string():
        raise TraceError(schema_problem(batch) or "batch has no string group_id column")
    if num_shards == 1:
        return [batch]
    gids = batch["group_id"].to_pylist()
    home = {g: shard_of(g, num_shards) for g in set(gids)}
    rows = np.fromiter((home[g] for g in gids), dtype=np.int64, count=len(gids))
    return [batch.filter(pa.array(rows == k)) if np.any(rows == k) else None for k in range(num_shards)]


def allocate(n: int, available: list[int], rng: np.random.Generator) -> np.ndarray | None:
    """n groups over shards with `available` [K] groups each -> counts [K], or None if sum(available) < n."""
    avail = np.asarray(available, dtype=np.int64)
    if avail.sum() < n:
        return None
    return rng.multivariate_hypergeometric(avail, n)


def merge_samples(results: list[SampleResult]) -> SampleResult:
    if len(results) == 1:
        return results[0]
    return SampleResult(
        batch=pa.concat_batches([r.batch for r in results]),
        group_weights=tuple(w for r in results for w in r.group_weights),
        staleness=tuple(s for r in results for s in r.staleness),
    )


def merge_inserts(results: list[InsertResult]) -> InsertResult:
    return InsertResult(
        accepted_groups=sum(r.accepted_groups for r in results),
        accepted_traces=sum(r.accepted_traces for r in results),
        rejected=tuple(x for r in results for x in r.rejected),
        reasons=tuple(x for r in results for x in r.reasons),
    )
