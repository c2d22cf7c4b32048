"""Synthetic, valid trace batches for tests and benchmarks (no model needed).

Contract: `group_batch` returns a TRACE_SCHEMA RecordBatch holding whole groups that pass
`replay.schema.validate_trace`; token ids, logprobs and rewards are drawn from `seed`, so the
same arguments give the same batch except for `created_at`.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from replay.schema import TRACE_SCHEMA


def _lists(lengths: np.ndarray, values: np.ndarray) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def group_batch(
    group_ids: list[str],
    group_size: int = 4,
    prompt_tokens: int = 16,
    completion_tokens: int = 32,
    policy_version: int | list[int] = 0,
    seed: int = 0,
) -> pa.RecordBatch:
    """`len(group_ids) * group_size` traces, group by group; `policy_version` per group or for all."""
    rng = np.random.default_rng(seed)
    n = len(group_ids) * group_size
    versions = np.broadcast_to(np.asarray(policy_version, dtype=np.int64), (len(group_ids),))
    p_len = np.full(n, prompt_tokens)
    c_len = rng.integers(max(1, completion_tokens // 2), completion_tokens + 1, size=n)
    cols = {
        "trace_id": [f"{g}/{i}" for g in group_ids for i in range(group_size)],
        "group_id": [g for g in group_ids for _ in range(group_size)],
        "prompt_ids": _lists(p_len, rng.integers(0, 32000, p_len.sum(), dtype=np.int32)),
        "completion_ids": _lists(c_len, rng.integers(0, 32000, c_len.sum(), dtype=np.int32)),
        "behaviour_logprobs": _lists(c_len, -rng.exponential(1.0, c_len.sum()).astype(np.float32)),
        "reward": rng.integers(0, 2, n).astype(np.float32),
        "token_rewards": pa.nulls(n, pa.list_(pa.float32())),
        "policy_version": np.repeat(versions, group_size),
        "policy_version_max": np.repeat(versions, group_size),
        "task": ["synthetic"] * n,
        "metadata": ["{}"] * n,
        "created_at": np.full(n, time.time()),
    }
    return pa.RecordBatch.from_pydict(cols, schema=TRACE_SCHEMA)
