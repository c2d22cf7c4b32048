"""Sharding: stable routing of whole groups, proportional allocation, merging."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from replay.config import ReplayConfig
from replay.schema import TraceError
from replay.sharding import allocate, merge_samples, shard_of, split_by_shard
from replay.synthetic import group_batch
from replay.table import ReplayTable


def test_split_keeps_every_row_once_and_groups_whole():
    batch = group_batch([f"g{i}" for i in range(40)], group_size=3)
    parts = split_by_shard(batch, 4)
    assert sum(p.num_rows for p in parts if p is not None) == 120
    for k, part in enumerate(parts):
        if part is not None:
            gids = part["group_id"].to_pylist()
            assert all(shard_of(g, 4) == k for g in gids)
            assert all(gids.count(g) == 3 for g in set(gids))
    assert all(p is not None for p in parts)  # 40 groups over 4 shards: none empty (crc32 spreads)


def test_batch_without_group_id_is_a_clear_error():
    batch = group_batch(["a"]).drop_columns(["group_id"])
    with pytest.raises(TraceError, match="missing field 'group_id'"):
        split_by_shard(batch, 2)


def test_allocate_is_capped_proportional_and_exact():
    rng = np.random.default_rng(0)
    assert allocate(5, [2, 2], rng) is None
    draws = np.array([allocate(4, [30, 10, 0], rng) for _ in range(2000)])
    assert np.all(draws.sum(axis=1) == 4) and np.all(draws[:, 2] == 0) and np.all(draws <= [30, 10, 0])
    assert abs(draws[:, 0].mean() - 3.0) < 0.1  # hypergeometric mean 4 * 30 / 40
    assert np.array_equal(allocate(3, [1, 2], rng), [1, 2])


def test_merge_samples_concatenates_in_order():
    a, b = ReplayTable(ReplayConfig()), ReplayTable(ReplayConfig(), shard_id=1)
    a.insert(group_batch(["x"], group_size=2))
    b.insert(group_batch(["y", "z"], group_size=1, policy_version=1))
    merged = merge_samples([a.sample(1, 2), b.sample(2, 2)])
    assert merged.batch["group_id"].to_pylist() == ["x", "x", "y", "z"]
    assert merged.staleness == (2, 1, 1) and merged.group_weights == (1.0, 1.0, 1.0)
    assert isinstance(merged.batch, pa.RecordBatch)
