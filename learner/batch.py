"""Turn sampled groups (Arrow, `replay.schema.TRACE_SCHEMA`) into padded learner tensors, and split them.

Layout: prompts are left-padded to a common length P and completions right-padded to T, so every
per-token tensor is `[B, T]` and column t of it is completion token t of every row; position ids
count real tokens only, so padding never shifts a sequence. `mask` is 1 on real completion tokens.
Padded positions hold `pad_id` / 0.0 and are never read by the objective (it multiplies by `mask`).

`collate` reads the Arrow list columns' offsets and values buffers straight into tensors (numpy
index arithmetic, no per-row Python, no `to_pydict`). A prompt held once per group (replay.schema's
`prompt_once` layout) is expanded here, by pointing each row at its group's first trace's prompt.
`TrainBatch.select(rows)` cuts a micro- or minibatch out of a batch and trims the padding its rows do
not need; `plan_micro_batches` packs rows under a padded-token budget.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from replay.schema import group_first_rows


@dataclasses.dataclass(frozen=True)
class Tokens:
    """What a model forward needs: the padded sequences and which columns are completion tokens."""

    input_ids: torch.Tensor  # [B, P+T] long
    attention_mask: torch.Tensor  # [B, P+T] long
    position_ids: torch.Tensor  # [B, P+T] long
    completion_ids: torch.Tensor  # [B, T] long
    mask: torch.Tensor  # [B, T] float, 1 on real completion tokens

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.completion_ids.shape[1]


@dataclasses.dataclass(frozen=True)
class TrainBatch:
    input_ids: torch.Tensor  # [B, P+T] long
    attention_mask: torch.Tensor  # [B, P+T] long
    position_ids: torch.Tensor  # [B, P+T] long
    prompt_len: int  # P
    completion_ids: torch.Tensor  # [B, T] long
    mask: torch.Tensor  # [B, T] float
    behaviour_logprobs: torch.Tensor  # [B, T] float
    rewards: torch.Tensor  # [B] float
    group_ids: torch.Tensor  # [B] long, dense 0..G-1 in order of first appearance
    policy_version: torch.Tensor  # [B] long (oldest version that produced the trace)
    token_rewards: torch.Tensor | None  # [B, T] or None

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum().item())

    @property
    def num_rows(self) -> int:
        return int(self.mask.shape[0])

    def tokens(self) -> Tokens:
        return Tokens(self.input_ids, self.attention_mask, self.position_ids, self.completion_ids, self.mask)

    def lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt lengths `[B]`, completion lengths `[B]`) in real tokens."""
        return self.attention_mask[:, : self.prompt_len].sum(1), self.mask.sum(1).long()

    def select(self, rows: torch.Tensor) -> TrainBatch:
        """The rows `rows` (long `[b]`) as their own batch, padded only as far as they need.

        Per-token tensors of the parent batch map onto it by `x[rows, :T']` with T' the new width.
        """
        prompt_lens, completion_lens = self.lengths()
        p, t = int(prompt_lens[rows].max()), int(completion_lens[rows].max())
        cols = slice(self.prompt_len - p, self.prompt_len + t)
        return TrainBatch(
            input_ids=self.input_ids[rows, cols],
            attention_mask=self.attention_mask[rows, cols],
            position_ids=self.position_ids[rows, cols],
            prompt_len=p,
            completion_ids=self.completion_ids[rows, :t],
            mask=self.mask[rows, :t],
            behaviour_logprobs=self.behaviour_logprobs[rows, :t],
            rewards=self.rewards[rows],
            group_ids=self.group_ids[rows],
            policy_version=self.policy_version[rows],
            token_rewards=None if self.token_rewards is None else self.token_rewards[rows, :t],
        )

    def to(self, device: torch.device | str) -> TrainBatch:
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )


@dataclasses.dataclass(frozen=True)
class _ListColumn:
    """An Arrow list column as buffers: row i is `values[offsets[i] : offsets[i] + lengths[i]]`."""

    values: np.ndarray
    offsets: np.ndarray  # [B] start of each row in `values`
    lengths: np.ndarray  # [B]; 0 for null rows
    valid: np.ndarray  # [B] bool


def _list_column(batch: pa.RecordBatch | pa.Table, name: str) -> _ListColumn:
    col = batch.column(name)
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    # `offsets` already accounts for a slice's offset and indexes the unsliced child `values`.
    offsets = arr.offsets.to_numpy().astype(np.int64)
    valid = np.ones(len(arr), dtype=bool) if arr.null_count == 0 else arr.is_valid().to_numpy(zero_copy_only=False)
    lengths = np.where(valid, offsets[1:] - offsets[:-1], 0)  # a null slot may span child values: ignore them
    return _ListColumn(arr.values.to_numpy(zero_copy_only=False), offsets[:-1], lengths, valid)


def _scatter_rows(out: torch.Tensor, col: _ListColumn, first_column: np.ndarray) -> None:
    """Write row i of `col` into `out[i, first_column[i] : first_column[i] + lengths[i]]` (one vectorised copy)."""
    lengths = col.lengths
    n = int(lengths.sum())
    if n == 0:
        return
    starts_in_flat = np.cumsum(lengths) - lengths
    within = np.arange(n, dtype=np.int64) - np.repeat(starts_in_flat, lengths)
    src = np.repeat(col.offsets, lengths) + within
    rows = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    dst = rows * out.shape[1] + np.repeat(first_column, lengths) + within
    out.view(-1)[torch.from_numpy(dst)] = torch.from_numpy(col.values[src]).to(out.dtype)


def _dense_ids(column: pa.ChunkedArray | pa.Array) -> torch.Tensor:
    """Dense ids 0..G-1 in order of first appearance (`pc.unique` keeps that order)."""
    ids = pc.index_in(column, value_set=pc.unique(column))
    return torch.from_numpy(ids.to_numpy(zero_copy_only=False).astype(np.int64))


def _prompt_column(batch: pa.RecordBatch | pa.Table) -> _ListColumn:
    """Each row's prompt: its own `prompt_ids`, or (prompt held once per group) its group's first trace's.

    Only offsets and lengths are re-pointed; the prompt's token values are not copied per row."""
    col = _list_column(batch, "prompt_ids")
    empty = col.lengths == 0
    if not empty.any():
        return col
    src = np.where(empty, group_first_rows(batch), np.arange(len(empty)))
    return _ListColumn(col.values, col.offsets[src], col.lengths[src], col.valid[src])


def collate(batch: pa.RecordBatch | pa.Table, pad_id: int) -> TrainBatch:
    """Pad a batch of traces into a `TrainBatch` (see module docstring for the layout)."""
    b = batch.num_rows
    if b == 0:
        raise ValueError("collate got an empty batch; sample at least one group")
    prompts, completions = _prompt_column(batch), _list_column(batch, "completion_ids")
    p, t = int(prompts.lengths.max()), int(completions.lengths.max())
    input_ids = torch.full((b, p + t), pad_id, dtype=torch.long)
    _scatter_rows(input_ids, prompts, p - prompts.lengths)
    _scatter_rows(input_ids, completions, np.full(b, p))
    positions = torch.arange(p + t)
    prompt_lens, completion_lens = torch.from_numpy(prompts.lengths), torch.from_numpy(completions.lengths)
    attention = ((positions >= p - prompt_lens[:, None]) & (positions < p + completion_lens[:, None])).long()
    mask = (positions[:t] < completion_lens[:, None]).float()
    behaviour = torch.zeros((b, t))
    _scatter_rows(behaviour, _list_column(batch, "behaviour_logprobs"), np.zeros(b, dtype=np.int64))
    token_rewards = None
    rewards_col = _list_column(batch, "token_rewards")
    if rewards_col.valid.any():
        token_rewards = torch.zeros((b, t))
        _scatter_rows(token_rewards, rewards_col, np.zeros(b, dtype=np.int64))
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=(attention.cumsum(dim=1) - 1).clamp(min=0),
        prompt_len=p,
        completion_ids=input_ids[:, p:],
        mask=mask,
        behaviour_logprobs=behaviour,
        rewards=torch.from_numpy(batch.column("reward").to_numpy().astype(np.float32)),
        group_ids=_dense_ids(batch.column("group_id")),
        policy_version=torch.from_numpy(batch.column("policy_version").to_numpy().astype(np.int64)),
        token_rewards=token_rewards,
    )


def plan_micro_batches(
    prompt_lens: torch.Tensor, completion_lens: torch.Tensor, token_budget: int | None, min_count: int = 1
) -> list[torch.Tensor]:
    """Split rows into micro-batches (long index tensors) of <= `token_budget` padded tokens each.

    Padded tokens of a micro-batch = rows x (longest prompt + longest completion among them), what its
    forward actually computes. Rows go longest first (similar lengths share a micro-batch, so little
    padding); a row longer than the budget goes alone. `token_budget=None` is one micro-batch. Ranks
    must run the same number of forward/backward passes under ZeRO-2/3 (their collectives pair up),
    so the largest micro-batches are halved until there are `min_count`; if single rows run out, the
    list is topped up with empty tensors (the caller runs a zero-weight pass for them).
    """
    n = len(prompt_lens)
    order = torch.argsort(prompt_lens + completion_lens, descending=True, stable=True)
    if token_budget is None:
        plan = [order]
    else:
        plan, current, p_max, t_max = [], [], 0, 0
        for i in order.tolist():
            p, t = max(p_max, int(prompt_lens[i])), max(t_max, int(completion_lens[i]))
            if current and (len(current) + 1) * (p + t) > token_budget:
                plan.append(torch.tensor(current, dtype=torch.long))
                current, p, t = [], int(prompt_lens[i]), int(completion_lens[i])
            current.append(i)
            p_max, t_max = p, t
        plan.append(torch.tensor(current, dtype=torch.long))
    while len(plan) < min_count and max(len(rows) for rows in plan) > 1:
        largest = max(range(len(plan)), key=lambda j: len(plan[j]))
        rows = plan.pop(largest)
        plan[largest:largest] = [rows[: len(rows) // 2], rows[len(rows) // 2 :]]
    empty = torch.zeros(0, dtype=torch.long)
    return plan + [empty] * (min_count - len(plan)) if n else [empty] * max(1, min_count)


def split_minibatches(num_rows: int, minibatches: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """`minibatches` disjoint row sets covering `num_rows` rows, sizes differing by at most one.

    A random permutation (PPO shuffles minibatches each epoch) so each one mixes groups; with
    `minibatches` > `num_rows` the extra sets are empty.
    """
    if minibatches == 1:
        return [torch.arange(num_rows)]
    perm = torch.randperm(num_rows, generator=generator)
    return [perm[i::minibatches].sort().values for i in range(minibatches)]
