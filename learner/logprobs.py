"""Log-probs (and entropy, values) of completion tokens from a causal LM without full-vocabulary tensors.

Contract:
- `completion_outputs(policy, tb, temperature, ...)` runs the model's trunk over every position (the
  prompt is context) but applies the LM head only to real completion positions, `chunk_tokens` of them
  at a time: logits `[chunk, V]` in fp32, their log-sum-exp, the target's log-prob and (if asked) the
  entropy, under `torch.utils.checkpoint`, so neither the forward nor the backward ever holds more than
  one chunk's `[chunk, V]`. The result equals `log_softmax(logits / temperature)` gathered at the
  completion tokens (tested to fp32 rounding). Returns `[B, T]` tensors, 0 on padding.
- Entropy modes: "none" (not computed), "detached" (a logged diagnostic: no gradient, no extra
  backward memory), "grad" (the entropy bonus needs its gradient: it flows into the trunk and head).
- The head is called as a module (`lm_head(h)`), so ZeRO-3's gather hooks fire for it, also when the
  checkpoint recomputes it in the backward. Logits are formed in the head's dtype and upcast (as verl and
  OpenRLHF do): under bf16 they carry the rounding that bf16 inference engines have too.
- `CompletionModel` is what the DeepSpeed engine wraps: the HF policy (`.policy`, whose parameter names
  are what rollout serves) plus an optional value head on the trunk's last hidden state (GAE / V-trace;
  zero-initialised, so the first advantages equal the discounted returns). Its forward returns
  `(logp, entropy | None, values | None)`, all `[B, T]`; values at column t are V(s_t), the state
  before completion token t is sampled.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint

from learner.batch import Tokens

EntropyMode = Literal["none", "detached", "grad"]
# Models whose logits are not `lm_head(hidden)`: they keep the full-logits path (correct, not chunked).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _head_chunk(
    head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: EntropyMode
) -> tuple[torch.Tensor, torch.Tensor]:
    """`h [n, H]`, `targets [n]` -> (log-prob of each target `[n]`, entropy `[n]` or an empty tensor)."""
    logits = head(h).float() / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    if entropy == "none":
        return logp, logp.new_zeros(0)
    with torch.set_grad_enabled(torch.is_grad_enabled() and entropy == "grad"):
        probs = torch.softmax(logits, dim=-1)
        ent = lse - (probs * logits).sum(-1)  # H = lse - E_p[z]
    return logp, ent


def chunked_head_logprobs(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    entropy: EntropyMode = "none",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs `[n]` of `targets [n]` given hidden states `hidden [n, H]`, in chunks (module docstring)."""
    logps, ents = [], []
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    for start in range(0, hidden.shape[0], chunk_tokens):
        args = (head, hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens], temperature, entropy)
        logp, ent = checkpoint(_head_chunk, *args, use_reentrant=False) if grad else _head_chunk(*args)
        logps.append(logp)
        ents.append(ent)
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if entropy != "none" else None)
    ent_out = None if entropy == "none" else torch.cat(ents)
    if ent_out is not None and entropy == "detached":
        ent_out = ent_out.detach()
    return torch.cat(logps), ent_out


def _completion_hidden(hidden: torch.Tensor, prompt_len: int, width: int) -> torch.Tensor:
    """Columns P-1 .. P-2+T of `[B, P+T, ...]`: the positions that predict completion tokens."""
    return hidden[:, prompt_len - 1 : prompt_len - 1 + width]


def _scatter(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    out = values.new_zeros(where.shape)
    return out.masked_scatter(where, values)


def _full_vocab_logprobs(logits: torch.Tensor, tb: Tokens, temperature: float, entropy: EntropyMode):
    """Fallback for heads with a logit transform: log_softmax over full `[B, T, V]` logits (not chunked)."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, tb.completion_ids.unsqueeze(-1)).squeeze(-1) * tb.mask
    if entropy == "none":
        return logp, None
    ent = -(logp_all.exp() * logp_all).sum(-1) * tb.mask
    return logp, ent.detach() if entropy == "detached" else ent


def completion_outputs(
    policy: torch.nn.Module,
    tb: Tokens,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    entropy: EntropyMode = "none",
    value_head: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(log-probs `[B, T]`, entropy `[B, T]` or None, values `[B, T]` or None) of `tb`'s completions."""
    inputs = {"input_ids": tb.input_ids, "attention_mask": tb.attention_mask, "position_ids": tb.position_ids}
    width = tb.completion_ids.shape[1]
    if any(getattr(policy.config, name, None) not in (None, 1.0) for name in _LOGIT_TRANSFORMS):
        out = policy(**inputs, use_cache=False, output_hidden_states=value_head is not None)
        logp, ent = _full_vocab_logprobs(_completion_hidden(out.logits, tb.prompt_len, width), tb, temperature, entropy)
        hidden = None if value_head is None else _completion_hidden(out.hidden_states[-1], tb.prompt_len, width)
    else:
        out = policy.get_decoder()(**inputs, use_cache=False)
        hidden = _completion_hidden(out.last_hidden_state, tb.prompt_len, width)
        where = tb.mask.bool()
        head = policy.get_output_embeddings()
        logp, ent = chunked_head_logprobs(
            head, hidden[where], tb.completion_ids[where], temperature, chunk_tokens, entropy
        )
        logp, ent = _scatter(logp, where), None if ent is None else _scatter(ent, where)
    values = None
    if value_head is not None:
        values = value_head(hidden.to(value_head.weight.dtype)).squeeze(-1).float()
    return logp, ent, values


class CompletionModel(torch.nn.Module):
    """The module the DeepSpeed engine trains: the HF policy plus an optional value head (module docstring)."""

    def __init__(self, policy: torch.nn.Module, value_head: bool = False, chunk_tokens: int = 1024):
        super().__init__()
        self.policy = policy
        self.chunk_tokens = chunk_tokens
        self.value_head = torch.nn.Linear(policy.config.hidden_size, 1) if value_head else None
        if self.value_head is not None:
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        completion_ids: torch.Tensor,
        mask: torch.Tensor,
        temperature: float = 1.0,
        entropy: EntropyMode = "none",
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        tb = Tokens(input_ids, attention_mask, position_ids, completion_ids, mask)
        return completion_outputs(self.policy, tb, temperature, self.chunk_tokens, entropy, self.value_head)


def run_completion_model(model, tb: Tokens, temperature: float, entropy: EntropyMode = "none"):
    """Call `model` (a `CompletionModel` or the DeepSpeed engine around one) on `tb`."""
    return model(
        input_ids=tb.input_ids,
        attention_mask=tb.attention_mask,
        position_ids=tb.position_ids,
        completion_ids=tb.completion_ids,
        mask=tb.mask,
        temperature=temperature,
        entropy=entropy,
    )
