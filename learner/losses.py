"""Policy losses with importance corrections, and loss aggregation.

Contract: every function takes per-token `[B, T]` tensors and a `mask [B, T]` (1 = response token),
never reads padded positions (they may hold NaN), and returns `(scalar loss to minimise, dict[str, float])`.
Ratios are formed in log space and the log-ratio is clamped to +-20 before `exp` (kl.LOG_RATIO_CLAMP).

Variants:
- `policy_loss`: PPO clip (Schulman et al., 2017) with separate low/high ranges (DAPO's clip-higher),
  optional dual clip for negative advantages (Ye et al., 2020, bound -A*c, c > 1).
    * anchor = `old_logprobs`. Coupled PPO passes the behaviour logprobs here.
    * decoupled PPO (AReaL, Fu et al., 2025): pass the proximal logprobs as `old_logprobs` and the
      behaviour logprobs as `behaviour_logprobs`; the clipped objective is then weighted per token by
      the detached proximal/behaviour ratio, so staleness changes the weight, not the trust region.
    * TIS (Yao et al., 2025, "Your efficient RL framework secretly brings you off-policy RL"):
      `tis_cap` truncates that weight at the cap ("truncate"), or zeroes tokens above it ("mask",
      AReaL's behaviour-weight cap; the token still counts in the denominator).
    * `ratio_level="sequence"` is GSPO (Zheng et al., 2025): the ratio is the length-normalised
      sequence ratio exp(mean_t log r_t), applied to every token of the row (GSPO-token form, whose
      gradient equals GSPO's when aggregated by "seq-mean-token-mean").
- `vtrace_policy_loss`: IMPALA's truncated importance weight min(rho, rho_bar) (Espeholt et al., 2018)
  on a REINFORCE gradient, rho = pi/mu.
- `rpg_reinforce_loss`: RPG's REINFORCE-style estimator with RPG-style clip (arXiv:2505.17508).
- `is_surrogate_loss`: RPG's fully differentiable off-policy surrogate -w*A, w = pi/mu (the KL part
  is added by the caller with `kl.kl_penalty`).

Aggregation (`aggregate`): "token-mean" (mean over all response tokens of the batch, DAPO),
"seq-mean-token-mean" (GRPO's per-sequence mean then mean over rows), "seq-mean-token-sum" (sum per
row, mean over rows), "seq-mean-token-sum-norm" (Dr.GRPO: sum over all tokens / (B * norm_tokens),
a constant normaliser so no length bias). Seq modes average over rows with >= 1 loss token.
When no loss token remains the loss is 0 but still attached to the graph, so backward runs on every rank.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from learner.kl import LOG_RATIO_CLAMP

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def _where(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros_like(x))


def _log_ratio(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    return (logp - logq).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x [B, T]` over `mask` (0 when the mask is empty)."""
    m = mask.bool()
    return _where(m, x).sum() / m.sum().clamp(min=1)


def agg_denominator(mask: torch.Tensor, agg: AggMode, norm_tokens: int | None = None) -> torch.Tensor:
    """What `aggregate` divides by for `mask [B, T]`: tokens, rows with >= 1 token, or B * norm_tokens.

    Not clamped (0 when nothing counts), so summed over micro-batches (and ranks) it is the whole batch's
    denominator: that is how the learner makes a micro-batched update equal the whole-batch one.
    """
    m = mask.bool()
    if agg == "token-mean":
        return m.sum()
    if agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return m.any(dim=-1).sum()
    if agg == "seq-mean-token-sum-norm":
        if not norm_tokens or norm_tokens < 1:
            raise ValueError("agg='seq-mean-token-sum-norm' needs norm_tokens >= 1 (e.g. the max response length)")
        return torch.tensor(float(m.shape[0] * norm_tokens), device=m.device)
    raise ValueError(f"unknown agg {agg!r}; expected one of {AggMode.__args__}")


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, agg: AggMode, norm_tokens: int | None = None
) -> torch.Tensor:
    """Reduce `per_token [B, T]` to a scalar by `agg` (module docstring): a sum over `agg_denominator`."""
    m = mask.bool()
    x = _where(m, per_token)
    denominator = agg_denominator(m, agg, norm_tokens).clamp(min=1)  # no loss token: 0, still attached
    if agg == "seq-mean-token-mean":
        return (x.sum(-1) / m.sum(-1).clamp(min=1)).sum() / denominator
    return x.sum() / denominator


def as_floats(d: dict[str, torch.Tensor]) -> dict[str, float]:
    keys = list(d)
    vals = torch.stack([d[k].detach().to(torch.float64).reshape(()) for k in keys]).tolist() if keys else []
    return dict(zip(keys, vals))


def _frac(cond: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (cond & m).sum().to(torch.float64) / m.sum().clamp(min=1)


def _masked_extreme(x: torch.Tensor, m: torch.Tensor, kind: Literal["min", "max"]) -> torch.Tensor:
    """Min or max of `x` over the mask; NaN (no data) when the mask is empty."""
    vals = x[m]
    if vals.numel() == 0:
        return torch.full((), float("nan"))
    return vals.min() if kind == "min" else vals.max()


def _normalised_ess(log_w: torch.Tensor) -> torch.Tensor:
    """(sum w)^2 / (n * sum w^2) in (0, 1], from log-weights `[n]`, computed in log space."""
    if log_w.numel() == 0:
        return torch.ones((), dtype=torch.float64)
    lw = log_w.to(torch.float64)
    return torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0) - math.log(lw.numel()))


@torch.no_grad()
def importance_diagnostics(
    learner_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """pi/mu ratio mean/min/max over response tokens and normalised ESS (Kish) of token and sequence weights."""
    m = mask.bool()
    lw = _where(m, _log_ratio(_where(m, learner_logprobs), _where(m, behaviour_logprobs)))
    w = torch.exp(lw[m]) if m.any() else torch.ones(1, dtype=lw.dtype)
    seq = lw.sum(-1)[m.any(-1)]  # sequence log-weight sum_t log r_t
    return as_floats(
        {
            "is_ratio_mean": w.mean(),
            "is_ratio_min": w.min(),
            "is_ratio_max": w.max(),
            "ess_token": _normalised_ess(lw[m]),
            "ess_seq": _normalised_ess(seq),
        }
    )


def _gspo_log_ratio(log_ratio: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """GSPO-token: value = the row's mean log-ratio, gradient = each token's own log-prob gradient."""
    seq = (_where(m, log_ratio).sum(-1) / m.sum(-1).clamp(min=1))[:, None]
    return seq.detach() + log_ratio - log_ratio.detach()


def _behaviour_weight(old, behaviour, m, tis_cap, tis_mode):
    """Detached per-token proximal/behaviour weight for decoupled PPO, with optional TIS cap."""
    w = torch.exp(_log_ratio(old, behaviour)).detach()
    over = (w > tis_cap) & m if tis_cap is not None else torch.zeros_like(m)
    if tis_cap is not None:
        w = w.clamp(max=tis_cap) if tis_mode == "truncate" else torch.where(over, torch.zeros_like(w), w)
    return w, over


def policy_loss(
    learner_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: AggMode = "token-mean",
    norm_tokens: int | None = None,
    ratio_level: Literal["token", "sequence"] = "token",
    behaviour_logprobs: torch.Tensor | None = None,
    tis_cap: float | None = None,
    tis_mode: Literal["truncate", "mask"] = "truncate",
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip family (module docstring). All tensors `[B, T]`; `learner_logprobs` carries grad.

    Returns the loss -E[w_b * min(r A, clip(r, 1-clip_low, 1+clip_high) A)] (dual clip: for A < 0
    the objective is bounded below by dual_clip * A) and diagnostics: clip_frac_low/high/dual,
    ratio_mean/min/max (of r), and with `behaviour_logprobs` behaviour_weight_mean/max, tis_frac.
    """
    m = mask.bool()
    lp, old, adv = _where(m, learner_logprobs), _where(m, old_logprobs.detach()), _where(m, advantages.detach())
    log_r = _log_ratio(lp, old)
    if ratio_level == "sequence":
        log_r = _gspo_log_ratio(log_r, m)
    ratio = torch.exp(log_r)
    obj = torch.minimum(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)
    if dual_clip is not None:
        obj = torch.where(adv < 0, torch.maximum(obj, dual_clip * adv), obj)
    per_token, diag = -obj, {}
    if behaviour_logprobs is not None:
        bw, over = _behaviour_weight(old, _where(m, behaviour_logprobs.detach()), m, tis_cap, tis_mode)
        per_token = per_token * bw
        diag |= {
            "behaviour_weight_mean": masked_mean(bw, m),
            "behaviour_weight_max": _masked_extreme(bw, m, "max"),
            "tis_frac": _frac(over, m),
        }
    r = ratio.detach()
    diag |= {
        "clip_frac_low": _frac((r < 1 - clip_low) & (adv < 0), m),
        "clip_frac_high": _frac((r > 1 + clip_high) & (adv > 0), m),
        "clip_frac_dual": _frac((r > dual_clip) & (adv < 0), m) if dual_clip else torch.zeros(()),
        "ratio_mean": masked_mean(r, m),
        "ratio_min": _masked_extreme(r, m, "min"),
        "ratio_max": _masked_extreme(r, m, "max"),
    }
    return aggregate(per_token, m, agg, norm_tokens), as_floats(diag)


def _score(lp: torch.Tensor) -> torch.Tensor:
    """exp(lp - sg(lp)): value 1, gradient d log pi. `-sg(c) * _score(lp)` has value -c, grad -c d log pi."""
    return torch.exp(lp - lp.detach())


def vtrace_policy_loss(
    learner_logprobs,
    behaviour_logprobs,
    advantages,
    mask,
    *,
    rho_bar: float = 1.0,
    agg: AggMode = "token-mean",
    norm_tokens: int | None = None,
):
    """IMPALA policy gradient: -min(rho, rho_bar) * A * grad log pi, rho = pi/mu; all `[B, T]`."""
    m = mask.bool()
    lp, adv = _where(m, learner_logprobs), _where(m, advantages.detach())
    rho = torch.exp(_log_ratio(lp, _where(m, behaviour_logprobs))).detach()
    per_token = -(rho.clamp(max=rho_bar) * adv) * _score(lp)
    diag = {"rho_clip_frac": _frac(rho > rho_bar, m), "ratio_mean": masked_mean(rho, m)}
    return aggregate(per_token, m, agg, norm_tokens), as_floats(diag)


def is_surrogate_loss(
    learner_logprobs,
    behaviour_logprobs,
    advantages,
    mask,
    *,
    agg: AggMode = "token-mean",
    norm_tokens: int | None = None,
):
    """RPG's fully differentiable reward surrogate -E_mu[w A], w = pi/mu with grad; all `[B, T]`."""
    m = mask.bool()
    lp, adv = _where(m, learner_logprobs), _where(m, advantages.detach())
    w = torch.exp(_log_ratio(lp, _where(m, behaviour_logprobs.detach())))
    return aggregate(-w * adv, m, agg, norm_tokens), as_floats({"ratio_mean": masked_mean(w.detach(), m)})


def rpg_clip_weight(
    w: torch.Tensor, a_reg: torch.Tensor, clip_low: float | None, clip_high: float | None, dual_clip: float | None
) -> torch.Tensor:
    """RPG-style clip C(w, A_reg): w clipped to [1-clip_low, 1+clip_high] where A_reg >= 0; where
    A_reg < 0 only the lower bound 1-clip_low and the dual-clip cap c apply (dual-clip adapted to a
    REINFORCE weight, arXiv:2505.17508 Sec. "RPG-Style Clip"). None disables a bound.
    """
    lo = None if clip_low is None else 1 - clip_low
    hi = None if clip_high is None else 1 + clip_high
    pos = w.clamp(min=lo, max=hi) if (lo is not None or hi is not None) else w
    neg = w.clamp(min=lo, max=dual_clip) if (lo is not None or dual_clip is not None) else w
    return torch.where(a_reg >= 0, pos, neg)


def rpg_reinforce_loss(
    learner_logprobs,
    behaviour_logprobs,
    advantages,
    mask,
    *,
    kl_coef: torch.Tensor | None = None,
    clip_low: float | None = None,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: AggMode = "token-mean",
    norm_tokens: int | None = None,
):
    """RPG REINFORCE-style loss -E_mu[sg(C(w, A_reg) * A_reg) * log pi] (arXiv:2505.17508).

    Args: `[B, T]` tensors; `kl_coef` = sum_j beta_j * kl.kl_reinforce_coef(...) (detached), so the
    unclipped coefficient w*A - kl_coef = w * A_reg has exactly the gradient of `is_surrogate_loss` +
    sum_j beta_j * kl_penalty (tested). Clipping (RPG-style clip) trades that exactness for variance.
    """
    m = mask.bool()
    lp, adv = _where(m, learner_logprobs), _where(m, advantages.detach())
    w = torch.exp(_log_ratio(lp, _where(m, behaviour_logprobs))).detach()
    a_reg = adv if kl_coef is None else adv - _where(m, kl_coef.detach()) / w
    wc = rpg_clip_weight(w, a_reg, clip_low, clip_high, dual_clip)
    per_token = -(wc * a_reg) * _score(lp)
    diag = {
        "clip_frac_low": _frac(w < wc, m),
        "clip_frac_high": _frac((w > wc) & (a_reg >= 0), m),
        "clip_frac_dual": _frac((w > wc) & (a_reg < 0), m),
        "ratio_mean": masked_mean(w, m),
        "a_reg_mean": masked_mean(a_reg, m),
    }
    return aggregate(per_token, m, agg, norm_tokens), as_floats(diag)
