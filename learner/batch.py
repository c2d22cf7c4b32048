"""Turn sampled groups (Arrow, `replay.schema.TRACE_SCHEMA`) into padded learner tensors.

Layout: prompts are left-padded to a common length P and completions right-padded to T, so every
per-token tensor is `[B, T]` and column t of it is completion token t of every row; position ids
count real tokens only, so padding never shifts a sequence. `mask` is 1 on real completion tokens.
Padded positions hold `pad_id` / 0.0 and are never read by the objective (it multiplies by `mask`).
"""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import torch


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


def _dense_ids(keys: list[str]) -> torch.Tensor:
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(k, len(index)) for k in keys], dtype=torch.long)


def collate(batch: pa.RecordBatch | pa.Table, pad_id: int) -> TrainBatch:
    """Pad a batch of traces into a `TrainBatch` (see module docstring for the layout)."""
    cols = batch.to_pydict()
    prompts, completions = cols["prompt_ids"], cols["completion_ids"]
    b = len(prompts)
    if b == 0:
        raise ValueError("collate got an empty batch; sample at least one group")
    p, t = max(map(len, prompts)), max(map(len, completions))
    input_ids = torch.full((b, p + t), pad_id, dtype=torch.long)
    attention = torch.zeros((b, p + t), dtype=torch.long)
    mask = torch.zeros((b, t))
    behaviour = torch.zeros((b, t))
    token_rewards = None
    if any(r is not None for r in cols["token_rewards"]):
        token_rewards = torch.zeros((b, t))
    for i, (pr, co) in enumerate(zip(prompts, completions)):
        input_ids[i, p - len(pr) : p] = torch.tensor(pr)
        input_ids[i, p : p + len(co)] = torch.tensor(co)
        attention[i, p - len(pr) : p + len(co)] = 1
        mask[i, : len(co)] = 1.0
        behaviour[i, : len(co)] = torch.tensor(cols["behaviour_logprobs"][i])
        if token_rewards is not None and cols["token_rewards"][i] is not None:
            token_rewards[i, : len(co)] = torch.tensor(cols["token_rewards"][i])
    position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=position_ids,
        prompt_len=p,
        completion_ids=input_ids[:, p:],
        mask=mask,
        behaviour_logprobs=behaviour,
        rewards=torch.tensor(cols["reward"], dtype=torch.float32),
        group_ids=_dense_ids(cols["group_id"]),
        policy_version=torch.tensor(cols["policy_version"], dtype=torch.long),
        token_rewards=token_rewards,
    )


def completion_logprobs(
    model: torch.nn.Module, tb: TrainBatch, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs `[B, T]` of each completion token under `model` at `temperature` (and entropy `[B, T]`).

    Logits at position P-1+t predict completion token t. Temperature matches the sampler's, so the
    ratio against `behaviour_logprobs` compares the same distributions.
    """
    logp, entropy, _ = completion_outputs(model, tb, temperature, with_entropy)
    return logp, entropy


def completion_outputs(
    model: torch.nn.Module, tb: TrainBatch, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`completion_logprobs` plus the values `[B, T]` when `model` has a value head (else None)."""
    out = model(input_ids=tb.input_ids, attention_mask=tb.attention_mask, position_ids=tb.position_ids, use_cache=False)
    logits = completion_slice(out.logits, tb).float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = torch.gather(logp_all, -1, tb.completion_ids.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1).detach()
    values = getattr(out, "state_values", None)  # `learner.auxiliary.PolicyValueOutput` (HF outputs have none)
    return logp, entropy, None if values is None else completion_slice(values, tb).float()


def completion_slice(per_position: torch.Tensor, tb: TrainBatch) -> torch.Tensor:
    """Columns P-1 .. P-2+T of a per-position tensor `[B, P+T, ...]`: those that predict completion tokens."""
    p, t = tb.prompt_len, tb.completion_ids.shape[1]
    return per_position[:, p - 1 : p - 1 + t]
