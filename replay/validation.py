"""Vectorised `replay.schema.validate_trace` over a whole RecordBatch.

Contract: `schema_problem(batch)` names what differs from `TRACE_SCHEMA` (or returns None);
`invalid_rows(batch)` maps the row index of every broken trace to the first broken invariant, in
the same order and wording as `validate_trace`, so a row rejected here would raise there too.
Both use pyarrow compute kernels; no Python loop touches token data.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from replay.schema import TRACE_SCHEMA

_LOGPROB_TOLERANCE = 1e-4  # as validate_trace: sampled-token logprobs may round a hair above 0


def schema_problem(batch: pa.RecordBatch) -> str | None:
    """None if `batch.schema` equals TRACE_SCHEMA, else one line per missing/extra/mistyped field."""
    if batch.schema.equals(TRACE_SCHEMA):
        return None
    have = {f.name: f.type for f in batch.schema}
    problems = [f"missing field {f.name!r} ({f.type})" for f in TRACE_SCHEMA if f.name not in have]
    problems += [
        f"field {f.name!r} is {have[f.name]}, expected {f.type}"
        for f in TRACE_SCHEMA
        if f.name in have and have[f.name] != f.type
    ]
    problems += [f"unexpected field {name!r}" for name in have if name not in TRACE_SCHEMA.names]
    if not problems:
        problems = ["field order or nullability differs"]
    return (
        "batch schema differs from replay.schema.TRACE_SCHEMA: "
        + "; ".join(problems)
        + "; build batches with replay.schema.traces_to_batch"
    )


def _np(arr: pa.Array, fill) -> np.ndarray:
    return arr.fill_null(fill).to_numpy(zero_copy_only=False)


def _list_len(batch: pa.RecordBatch, name: str) -> np.ndarray:
    return _np(pc.list_value_length(batch[name]), 0).astype(np.int64)


def _null_rows(batch: pa.RecordBatch) -> list[tuple[np.ndarray, str]]:
    out = []
    for field in TRACE_SCHEMA:
        col = batch[field.name]
        if not field.nullable and col.null_count:
            out.append((_np(col.is_null(), True), f"{field.name} is null; it is required"))
    return out


def _bad_logprob_rows(batch: pa.RecordBatch) -> np.ndarray:
    lists = batch["behaviour_logprobs"]
    values = pc.list_flatten(lists)
    ok = pc.and_(pc.is_finite(values), pc.less_equal(values, _LOGPROB_TOLERANCE))
    bad_values = ~_np(ok, False)
    mask = np.zeros(len(batch), dtype=bool)
    mask[_np(pc.list_parent_indices(lists), 0)[bad_values]] = True
    return mask


def _checks(batch: pa.RecordBatch) -> list[tuple[np.ndarray, str]]:
    n = _list_len(batch, "completion_ids")
    n_lp = _list_len(batch, "behaviour_logprobs")
    tr = batch["token_rewards"]
    n_tr = np.where(_np(tr.is_valid(), False), _list_len(batch, "token_rewards"), n)
    pv, pv_max = _np(batch["policy_version"], 0), _np(batch["policy_version_max"], 0)
    return _null_rows(batch) + [
        (n == 0, "completion_ids is empty; a trace needs at least one sampled token"),
        (
            n_lp != n,
            "behaviour_logprobs length differs from completion_ids length; "
            "the engine must return one logprob per sampled token",
        ),
        (n_tr != n, "token_rewards length differs from completion_ids length (one per completion token)"),
        (
            ~_np(pc.is_finite(batch["reward"]), False),
            "reward is not finite; rewards must be finite (score failures as a number, e.g. 0)",
        ),
        (_bad_logprob_rows(batch), "behaviour_logprobs must be finite log-probabilities <= 0"),
        ((pv < 0) | (pv_max < pv), "need 0 <= policy_version <= policy_version_max"),
    ]


def invalid_rows(batch: pa.RecordBatch) -> dict[int, str]:
    """Row index -> first broken invariant (prefixed with the trace and group ids), for a TRACE_SCHEMA batch."""
    reasons: dict[int, str] = {}
    trace_ids, group_ids = batch["trace_id"], batch["group_id"]
    for mask, why in _checks(batch):
        for row in np.flatnonzero(mask):
            row = int(row)
            if row not in reasons:
                reasons[row] = f"trace {trace_ids[row].as_py()} (group {group_ids[row].as_py()}): {why}"
    return reasons
