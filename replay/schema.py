"""The trace contract: one `Trace` is one scored completion of one prompt.

Invariants (checked by `invalid_rows` on a batch, `validate_trace` on one trace — one implementation):
- `len(behaviour_logprobs) == len(completion_ids) >= 1`; `token_rewards`, when present, has the same length.
- `reward` is finite; every behaviour logprob is finite and <= 0.
- `policy_version <= policy_version_max`: `policy_version` is the oldest weights that produced any
  token of the completion (staleness is measured from it), `policy_version_max` the newest.
- every trace of a group shares `group_id`; a group is the unit of insert, sample and eviction.
- a group's traces share one prompt, held once per group (`prompt_once`): the group's first trace in a
  batch carries `prompt_ids`, the others may carry an empty list (meaning "the group's prompt").
  A batch with the prompt on every trace is valid too; `expand_prompts` gives every trace its prompt.

`schema_problem(batch)` names what differs from `TRACE_SCHEMA`; `invalid_rows(batch)` maps each broken
row to its first broken invariant. This module imports nothing of ours; everything else imports it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
import uuid
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

TRACE_SCHEMA = pa.schema(
    [
        pa.field("trace_id", pa.string(), nullable=False),
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("completion_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("behaviour_logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("reward", pa.float32(), nullable=False),
        pa.field("token_rewards", pa.list_(pa.float32()), nullable=True),
        pa.field("policy_version", pa.int64(), nullable=False),
        pa.field("policy_version_max", pa.int64(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("metadata", pa.string(), nullable=False),  # JSON object
        pa.field("created_at", pa.float64(), nullable=False),  # unix seconds
    ]
)


class TraceError(ValueError):
    """A trace breaks the contract above; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class Trace:
    group_id: str
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    behaviour_logprobs: tuple[float, ...]
    reward: float
    policy_version: int
    policy_version_max: int | None = None
    token_rewards: tuple[float, ...] | None = None
    task: str = ""
    metadata: str = "{}"
    trace_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = dataclasses.field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.policy_version_max is None:
            object.__setattr__(self, "policy_version_max", self.policy_version)

    @property
    def meta(self) -> dict:
        return json.loads(self.metadata)


def validate_trace(t: Trace) -> None:
    """Raise `TraceError` naming the first broken invariant of `t` (the same check `invalid_rows` runs on batches)."""
    problems = invalid_rows(traces_to_batch([t]))
    if problems:
        raise TraceError(problems[0])


def validate_traces(traces: Sequence[Trace]) -> None:
    """Raise `TraceError` naming the first broken invariant of any of `traces`: one vectorised check over
    the batch (`invalid_rows`), instead of building a one-row batch per trace."""
    problems = invalid_rows(traces_to_batch(traces)) if traces else {}
    if problems:
        raise TraceError(problems[min(problems)])


_FLAT_LISTS = {"prompt_ids": np.int32, "completion_ids": np.int32, "behaviour_logprobs": np.float32}


def _list_column(rows: list[Sequence], dtype: np.dtype, arrow_type: pa.DataType) -> pa.ListArray:
    """Non-null list column from per-row sequences: one offsets and one values buffer, no per-row lists."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(rows), dtype=dtype, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), type=arrow_type)


def traces_to_batch(traces: Sequence[Trace]) -> pa.RecordBatch:
    """Pack traces into one RecordBatch with `TRACE_SCHEMA` (column order = schema order)."""
    cols = {f.name: [getattr(t, f.name) for t in traces] for f in TRACE_SCHEMA}
    arrays = {
        name: _list_column(cols[name], dtype, TRACE_SCHEMA.field(name).type) for name, dtype in _FLAT_LISTS.items()
    }
    for name, values in cols.items():
        if name not in arrays:  # scalars, and token_rewards (nullable, usually all null)
            arrays[name] = pa.array(values, type=TRACE_SCHEMA.field(name).type)
    return pa.RecordBatch.from_arrays([arrays[f.name] for f in TRACE_SCHEMA], schema=TRACE_SCHEMA)


def batch_to_traces(batch: pa.RecordBatch | pa.Table) -> list[Trace]:
    """Inverse of `traces_to_batch`; raises `TraceError` if the schema differs."""
    if not batch.schema.equals(TRACE_SCHEMA):
        raise TraceError(f"batch schema differs from replay.schema.TRACE_SCHEMA:\n{batch.schema}")
    out = []
    for row in batch.to_pylist():
        for key in ("prompt_ids", "completion_ids", "behaviour_logprobs"):
            row[key] = tuple(row[key])
        if row["token_rewards"] is not None:
            row["token_rewards"] = tuple(row["token_rewards"])
        out.append(Trace(**row))
    return out


# ---- validation: one implementation, vectorised over a batch (pyarrow compute, no Python loop over tokens) ----
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
    prompt_len = _list_len(batch, "prompt_ids")
    no_prompt = (prompt_len == 0) & (prompt_len[group_first_rows(batch)] == 0)
    return _null_rows(batch) + [
        (
            no_prompt,
            "prompt_ids is empty and so is its group's first trace's; the first trace of each group carries "
            "the group's prompt (replay.schema.prompt_once)",
        ),
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


def group_first_rows(batch: pa.RecordBatch | pa.Table) -> np.ndarray:
    """For each row `[B]`, the row index of the first trace of its group in `batch`."""
    gid = batch["group_id"]
    codes = pc.index_in(gid, value_set=pc.unique(gid)).to_numpy(zero_copy_only=False)
    _, first = np.unique(codes, return_index=True)  # unique codes are 0..G-1, in that order
    return first[codes].astype(np.int64)


def prompt_once(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The same traces with `prompt_ids` kept only on each group's first trace (others: empty list)."""
    prompts = batch["prompt_ids"]
    first = group_first_rows(batch) == np.arange(batch.num_rows)
    lengths = np.where(first, _list_len(batch, "prompt_ids"), 0)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    values = pc.list_flatten(prompts.filter(pa.array(first)))
    column = pa.ListArray.from_arrays(offsets, values, type=prompts.type)
    return batch.set_column(batch.schema.get_field_index("prompt_ids"), TRACE_SCHEMA.field("prompt_ids"), column)


def expand_prompts(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The same traces with every trace's `prompt_ids` filled in from its group's first trace."""
    empty = _list_len(batch, "prompt_ids") == 0
    if not empty.any():
        return batch
    src = np.where(empty, group_first_rows(batch), np.arange(batch.num_rows))
    column = batch["prompt_ids"].take(pa.array(src))
    return batch.set_column(batch.schema.get_field_index("prompt_ids"), TRACE_SCHEMA.field("prompt_ids"), column)


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
