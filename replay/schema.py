"""The trace contract: one `Trace` is one scored completion of one prompt.

Invariants (checked by `validate_trace`):
- `len(behaviour_logprobs) == len(completion_ids) >= 1`; `token_rewards`, when present, has the same length.
- `reward` is finite; every behaviour logprob is finite and <= 0.
- `policy_version <= policy_version_max`: `policy_version` is the oldest weights that produced any
  token of the completion (staleness is measured from it), `policy_version_max` the newest.
- every trace of a group shares `group_id`; a group is the unit of insert, sample and eviction.

This module imports nothing of ours; everything else imports it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from collections.abc import Sequence

import pyarrow as pa

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
    """Raise `TraceError` naming the first broken invariant of `t`."""
    n = len(t.completion_ids)
    where = f"trace {t.trace_id} (group {t.group_id})"
    if n == 0:
        raise TraceError(f"{where}: completion_ids is empty; a trace needs at least one sampled token")
    if len(t.behaviour_logprobs) != n:
        raise TraceError(
            f"{where}: behaviour_logprobs has {len(t.behaviour_logprobs)} entries but completion_ids has {n}; "
            "the engine must return one logprob per sampled token"
        )
    if t.token_rewards is not None and len(t.token_rewards) != n:
        raise TraceError(
            f"{where}: token_rewards has {len(t.token_rewards)} entries, expected {n} (one per completion token)"
        )
    if not math.isfinite(t.reward):
        raise TraceError(f"{where}: reward is {t.reward}; rewards must be finite (score failures as a number, e.g. 0)")
    if any(not math.isfinite(x) or x > 1e-4 for x in t.behaviour_logprobs):
        raise TraceError(f"{where}: behaviour_logprobs must be finite log-probabilities <= 0")
    if t.policy_version < 0 or t.policy_version_max < t.policy_version:
        raise TraceError(
            f"{where}: policy_version={t.policy_version}, policy_version_max={t.policy_version_max}; "
            "need 0 <= policy_version <= policy_version_max"
        )


def traces_to_batch(traces: Sequence[Trace]) -> pa.RecordBatch:
    """Pack traces into one RecordBatch with `TRACE_SCHEMA` (column order = schema order)."""
    cols = {f.name: [getattr(t, f.name) for t in traces] for f in TRACE_SCHEMA}
    cols["prompt_ids"] = [list(x) for x in cols["prompt_ids"]]
    cols["completion_ids"] = [list(x) for x in cols["completion_ids"]]
    cols["behaviour_logprobs"] = [list(x) for x in cols["behaviour_logprobs"]]
    cols["token_rewards"] = [None if x is None else list(x) for x in cols["token_rewards"]]
    return pa.RecordBatch.from_pydict(cols, schema=TRACE_SCHEMA)


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
