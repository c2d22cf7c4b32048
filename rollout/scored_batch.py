"""`ScoredBatch`: one rollout call's scored completions as flat column buffers, and its Arrow batch for replay.

The rollout -> replay hot path: engine outputs (token ids, behaviour logprobs), rewards and versions go into
numpy buffers once (offsets + values, one row per completion), and `to_arrow` builds the `TRACE_SCHEMA` batch
a rollout worker inserts from them, with the prompt held once per group (`replay.schema.prompt_once` form)
— no `replay.schema.Trace` object per completion.

Contract (the same rows, values and order `rollout.sampling.sample_groups` gives as `Trace`s, then
`traces_to_batch` and `prompt_once`):
- rows are whole groups of `group_size` consecutive completions, in problem order; group g's rows are
  `g * group_size ... (g + 1) * group_size - 1`;
- `metadata` is JSON `{"answer": ..., "finish_reason": ...}` plus `"origin"` when the call is stamped;
- `trace_id` is a fresh uuid4 hex per row; `created_at` is one `time.time()` for the batch (the per-`Trace`
  path stamps each record microseconds apart);
- `uniform_groups` marks the groups whose total rewards (outcome + sum of token rewards, float64, exact
  equality) are all equal, as `rollout.sampling.drop_uniform_groups` does; `to_arrow(keep=...)` leaves them out
  after checking every row.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from replay.schema import TRACE_SCHEMA, Trace, TraceError, invalid_rows


@dataclasses.dataclass(frozen=True)
class ScoredBatch:
    """Scored completions of whole groups; per-group fields `[G]`, per-row `[N]` (N = G * group_size), tokens `[T]`."""

    group_size: int
    group_ids: tuple[str, ...]  # [G]
    prompts: tuple[Sequence[int], ...]  # [G] prompt token ids
    tasks: tuple[str, ...]  # [G]
    answers: tuple  # [G] the problem's reference answer (JSON-able), for metadata
    offsets: np.ndarray  # [N + 1] int64: completion r's tokens are values[offsets[r]:offsets[r + 1]]
    completion_ids: np.ndarray  # [T] int32
    behaviour_logprobs: np.ndarray  # [T] float32
    rewards: np.ndarray  # [N] float64
    finish_reasons: tuple[str, ...]  # [N]
    token_rewards: tuple | None  # [N] per-token rewards per completion (process rewards), or None
    policy_version: int
    policy_version_max: int

    @property
    def num_traces(self) -> int:
        return len(self.rewards)

    @property
    def num_groups(self) -> int:
        return len(self.group_ids)

    def completion_lengths(self) -> np.ndarray:
        """[N] tokens per completion."""
        return np.diff(self.offsets)

    def row_tasks(self) -> list[str]:
        return [t for t in self.tasks for _ in range(self.group_size)]

    def group_rewards(self) -> np.ndarray:
        """[G, group_size] outcome rewards."""
        return self.rewards.reshape(self.num_groups, self.group_size)

    def uniform_groups(self) -> np.ndarray:
        """[G] bool: the group's total rewards (outcome + token rewards) are all equal.

        Totals in float64 with Python's `sum` over token rewards, exactly the comparison
        `rollout.sampling.drop_uniform_groups` makes (verifiable rewards are discrete: any spread is a
        non-zero group-relative advantage)."""
        totals = self.rewards.tolist()
        if self.token_rewards is not None:
            totals = [r + (sum(tr) if tr is not None else 0.0) for r, tr in zip(totals, self.token_rewards)]
        gs = self.group_size
        return np.array([len(set(totals[g * gs : (g + 1) * gs])) == 1 for g in range(self.num_groups)], dtype=bool)

    def to_arrow(self, origins: Sequence[dict] | None = None, keep: np.ndarray | None = None) -> pa.RecordBatch:
        """The `TRACE_SCHEMA` batch replay takes, prompt once per group.

        `origins` `[G]`: each group's "origin" metadata stamp; `keep` `[G]` bool: the groups to return (e.g.
        not `uniform_groups()`). Every row is checked against the trace contract first, kept or not (as
        `sample_groups` checks every sampled trace): `TraceError` names the first broken row."""
        n, gs = self.num_traces, self.group_size
        columns = [self._column(f.name, n, gs, origins) for f in TRACE_SCHEMA]
        batch = pa.RecordBatch.from_arrays(columns, schema=TRACE_SCHEMA)
        problems = invalid_rows(batch)
        if problems:
            raise TraceError(problems[min(problems)])
        if keep is not None and not np.all(keep):
            batch = batch.filter(pa.array(np.repeat(np.asarray(keep, dtype=bool), gs)))
        return batch

    def _column(self, name: str, n: int, gs: int, origins: Sequence[dict] | None) -> pa.Array:
        ftype = TRACE_SCHEMA.field(name).type
        if name == "trace_id":
            return pa.array([uuid.uuid4().hex for _ in range(n)], type=ftype)
        if name == "group_id":
            return pa.array(np.repeat(np.array(self.group_ids, dtype=object), gs), type=ftype)
        if name == "prompt_ids":
            return _prompt_once_column(self.prompts, gs, ftype)
        if name in ("completion_ids", "behaviour_logprobs"):
            values = self.completion_ids if name == "completion_ids" else self.behaviour_logprobs
            return pa.ListArray.from_arrays(pa.array(self.offsets.astype(np.int32)), pa.array(values), type=ftype)
        if name == "reward":
            return pa.array(self.rewards.astype(np.float32), type=ftype)
        if name == "token_rewards":
            return pa.array(self.token_rewards if self.token_rewards is not None else [None] * n, type=ftype)
        if name in ("policy_version", "policy_version_max"):
            return pa.array(np.full(n, getattr(self, name), dtype=np.int64), type=ftype)
        if name == "task":
            return pa.array(self.row_tasks(), type=ftype)
        if name == "metadata":
            return pa.array(self._metadata(origins), type=ftype)
        if name == "created_at":
            return pa.array(np.full(n, time.time(), dtype=np.float64), type=ftype)
        raise KeyError(f"ScoredBatch has no column {name!r}: TRACE_SCHEMA and ScoredBatch.to_arrow disagree")

    def _metadata(self, origins: Sequence[dict] | None) -> list[str]:
        out = []
        for r, finish in enumerate(self.finish_reasons):
            g = r // self.group_size
            meta = {"answer": self.answers[g], "finish_reason": finish}
            if origins is not None:
                meta["origin"] = origins[g]
            out.append(json.dumps(meta))
        return out

    @classmethod
    def from_traces(cls, traces: Sequence[Trace], group_size: int) -> ScoredBatch:
        """The columns of `traces` (whole groups of `group_size`, consecutive), e.g. to compare the two paths."""
        firsts = traces[::group_size]
        lengths = [len(t.completion_ids) for t in traces]
        offsets = np.zeros(len(traces) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        has_token_rewards = any(t.token_rewards is not None for t in traces)
        return cls(
            group_size=group_size,
            group_ids=tuple(t.group_id for t in firsts),
            prompts=tuple(t.prompt_ids for t in firsts),
            tasks=tuple(t.task for t in firsts),
            answers=tuple(t.meta.get("answer") for t in firsts),
            offsets=offsets,
            completion_ids=np.array([x for t in traces for x in t.completion_ids], dtype=np.int32),
            behaviour_logprobs=np.array([x for t in traces for x in t.behaviour_logprobs], dtype=np.float32),
            rewards=np.array([t.reward for t in traces], dtype=np.float64),
            finish_reasons=tuple(t.meta.get("finish_reason", "") for t in traces),
            token_rewards=tuple(t.token_rewards for t in traces) if has_token_rewards else None,
            policy_version=min((t.policy_version for t in traces), default=0),
            policy_version_max=max((t.policy_version_max for t in traces), default=0),
        )


def _prompt_once_column(prompts: Sequence[Sequence[int]], group_size: int, ftype: pa.DataType) -> pa.ListArray:
    """`prompt_ids` with each group's prompt on its first row and empty lists on the others."""
    lengths = np.zeros(len(prompts) * group_size, dtype=np.int64)
    lengths[::group_size] = [len(p) for p in prompts]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter((t for p in prompts for t in p), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), type=ftype)
