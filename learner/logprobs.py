"""Log-probs (and entropy, values) of completion tokens from a causal LM without full-vocabulary tensors.

Contract:
- `completion_outputs(policy, tb, temperature, ...)` runs the model's trunk over every position (the
  prompt is context) but applies the LM head only to real completion positions, `chunk_tokens` of them
  at a time: logits `[chunk, V]` in fp32, their log-sum-exp, the target's log-prob and (if asked) the
  entropy, so neither the forward nor the backward ever holds more than one chunk's `[chunk, V]`. A plain
  bias-free linear head without an entropy gradient (the common case) goes through `_LinearHeadLogprob`,
  whose hand-written backward recomputes the chunk's logits and needs one fp32 `[chunk, V]` buffer; any
  other head runs under `torch.utils.checkpoint`. The result equals `log_softmax(logits / temperature)` gathered at the
  completion tokens (tested to fp32 rounding). Returns `[B, T]` tensors, 0 on padding.
- Entropy modes: "none" (not computed), "detached" (a logged diagnostic: no gradient, no extra
  backward memory), "grad" (the entropy bonus needs its gradient: it flows into the trunk and head).
- Under ZeRO-3 the head is called as a module (`lm_head(h)`), so its gather hooks fire, also when the
  checkpoint recomputes it in the backward. Logits are formed in the head's dtype and upcast (as verl and
  OpenRLHF do): under bf16 they carry the rounding that bf16 inference engines have too.
- `CompletionModel` is what the DeepSpeed engine wraps: the HF policy (`.policy`, whose parameter names
  are what rollout serves) plus an optional value head on the trunk's last hidden state (GAE / V-trace;
  zero-initialised, so the first advantages equal the discounted returns). Its forward returns
  `(logp, entropy | None, values | None)`, all `[B, T]`; values at column t are V(s_t), the state
  before completion token t is sampled. With a separate `critic` (`learner.critic`) there is no value head:
  the values are the critic's (`learner.critic.critic_values`), from its own trunk, same positions.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint

from learner.batch import Tokens
from learner.critic import critic_values

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


class _LinearHeadLogprob(torch.autograd.Function):
    """log_softmax(h W^T / temperature) at `targets` for one chunk of a bias-free linear head, with the
    gradient written by hand (as Liger-Kernel's fused linear cross-entropy does): the backward recomputes
    the logits and turns them into dlogp/dz = onehot - softmax in place, so forward and backward each hold
    one fp32 `[n, V]` buffer (plus the head-dtype matmul output) instead of autograd's chain of logits,
    scaled copy, log-sum-exp and softmax. Entropy, when asked, is a non-differentiable output."""

    @staticmethod
    def forward(ctx, h, weight, targets, temperature: float, entropy: bool):
        logits = torch.nn.functional.linear(h, weight)  # under autocast: the autocast dtype, as `head(h)`
        logits_dtype = logits.dtype
        z = _scaled(logits, temperature)
        del logits
        lse = torch.logsumexp(z, dim=-1)
        logp = z.gather(-1, targets[:, None]).squeeze(-1) - lse
        ent = logp.new_zeros(0)
        if entropy:  # H = lse - E_p[z]
            ent = lse - (z - lse[:, None]).exp_().mul_(z).sum(-1)
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.temperature, ctx.dtype = temperature, logits_dtype
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, _grad_ent):
        h, weight, targets, lse = ctx.saved_tensors
        dtype = ctx.dtype  # the forward's matmul dtype (autocast is off in the backward)
        with torch.no_grad():
            logits = torch.nn.functional.linear(h.to(dtype), weight.to(dtype))
            dz = _scaled(logits, ctx.temperature)
            del logits
            dz.sub_(lse[:, None]).exp_().mul_(-grad_logp[:, None])  # -softmax * g
            dz.scatter_add_(-1, targets[:, None], grad_logp[:, None])  # + onehot * g
            if ctx.temperature != 1.0:
                dz.div_(ctx.temperature)
            dz = dz.to(dtype)
            grad_h = (dz @ weight.to(dtype)).to(h.dtype) if ctx.needs_input_grad[0] else None
            grad_w = (dz.t() @ h.to(dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 logits / temperature in one new buffer (no second copy when the head already computes in fp32)."""
    z = logits.float() if logits.dtype != torch.float32 else logits.clone()
    return z.div_(temperature) if temperature != 1.0 else z


def _fusable(head: torch.nn.Module, entropy: EntropyMode) -> bool:
    """The hand-written gradient covers a plain bias-free linear head whose weight is all here (not a ZeRO-3
    partition, which only the module's own gather hooks materialise) and no entropy gradient."""
    return (
        type(head) is torch.nn.Linear and head.bias is None and not hasattr(head.weight, "ds_id") and entropy != "grad"
    )


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
    fused = grad and _fusable(head, entropy)
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if fused:
            logp, ent = _LinearHeadLogprob.apply(h, head.weight, t, temperature, entropy != "none")
        elif grad:
            logp, ent = checkpoint(_head_chunk, head, h, t, temperature, entropy, use_reentrant=False)
        else:
            logp, ent = _head_chunk(head, h, t, temperature, entropy)
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
    """The module the DeepSpeed engine trains: the HF policy plus an optional value head on its trunk or an
    optional separate critic (a sequence-classification model), never both (module docstring)."""

    def __init__(
        self,
        policy: torch.nn.Module,
        value_head: bool = False,
        chunk_tokens: int = 1024,
        critic: torch.nn.Module | None = None,
    ):
        super().__init__()
        if value_head and critic is not None:
            raise ValueError("a CompletionModel has a value head on the policy's trunk or a separate critic, not both")
        self.policy = policy
        self.critic = critic
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
        head = self.value_head
        logp, ent, values = completion_outputs(self.policy, tb, temperature, self.chunk_tokens, entropy, head)
        if self.critic is not None:
            values = critic_values(self.critic, tb)
        return logp, ent, values


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
