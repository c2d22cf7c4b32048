"""KL estimators and KL penalty surrogates, per token, in log space.

Contract:
- `kl_estimate(logp, logq, estimator)` -> `[B, T]`: a per-token Monte-Carlo estimate of KL(p || q)
  for tokens *sampled from p* (Schulman, "Approximating KL divergence", 2020). With
  `r = logq - logp`: `k1 = -r` (unbiased, can be negative), `k2 = r**2 / 2` (biased, low variance),
  `k3 = exp(r) - r - 1` (unbiased, always >= 0; its expectation is the *unnormalised* KL, which equals
  the KL when p and q are normalised -- RPG, arXiv:2505.17508, "k3 is exactly the UKL").
- `kl_penalty(learner, target, behaviour, estimator, direction)` -> `[B, T]`: a differentiable
  surrogate whose expectation under the *behaviour* policy mu (who sampled the tokens) is the chosen
  divergence between the learner pi and `target`, and whose gradient is that divergence's gradient
  (the off-policy weighting RPG derives; GRPO's unweighted k3 misses it):
    "reverse"            KL(pi || target):  w * kl_estimate(pi, target),  w = pi/mu (w carries grad)
    "forward"            KL(target || pi):  v * kl_estimate(target, pi),  v = target/mu (no grad; 1 if
                                            target is mu itself)
    "reverse_unweighted" kl_estimate(pi, target) with no weight: verl/TRL's GRPO convention, kept for
                                            parity. Its gradient is not the gradient of KL(pi||target).
- `kl_reinforce_coef(...)` -> `[B, T]`, detached: the coefficient g with grad(kl_penalty) = g * grad(log pi),
  for REINFORCE-style losses `-sg(c) * log pi` (RPG's REINFORCE-style estimators).

Numerical safety: every log-ratio is clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] before `exp`
(the PPO convention of verl/OpenRLHF; exp(20) ~ 4.9e8 keeps float32 finite). Beyond the clamp the
value saturates and its gradient is zero. With `mask` given, padded positions are never read
(they may hold NaN) and come out as 0.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]
KLDirection = Literal["reverse", "forward", "reverse_unweighted"]
LOG_RATIO_CLAMP = 20.0


def _clamped(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _sanitise(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # torch.where (not x * mask) so NaN/inf padding neither leaks into values nor into gradients.
    return x if mask is None else torch.where(mask.bool(), x, torch.zeros_like(x))


def kl_estimate(
    logp: torch.Tensor, logq: torch.Tensor, estimator: KLEstimator, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token estimate of KL(p || q) from tokens sampled from p.

    Args:
        logp, logq: `[B, T]` log-probabilities of the sampled tokens under p and q.
        estimator: "k1" | "k2" | "k3" (module docstring).
        mask: optional `[B, T]`, 1 = response token; padded positions are returned as 0.
    Returns: `[B, T]`.
    """
    logp, logq = _sanitise(logp, mask), _sanitise(logq, mask)
    r = _clamped(logq - logp)
    if estimator == "k1":
        out = -r
    elif estimator == "k2":
        out = 0.5 * r * r
    elif estimator == "k3":
        # Schulman's k3 = (ratio - 1) - log ratio: unbiased and non-negative.
        out = torch.expm1(r) - r
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of 'k1', 'k2', 'k3'")
    return _sanitise(out, mask)


def _d_estimate_d_logq(logp: torch.Tensor, logq: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """d kl_estimate(logp, logq) / d logq, inside the clamp (zero outside it)."""
    raw = logq - logp
    r = _clamped(raw)
    inside = (raw.abs() <= LOG_RATIO_CLAMP).to(raw.dtype)
    grads = {"k1": lambda: -torch.ones_like(r), "k2": lambda: r, "k3": lambda: torch.expm1(r)}
    if estimator not in grads:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of 'k1', 'k2', 'k3'")
    return grads[estimator]() * inside


def _weights(learner, target, behaviour) -> tuple[torch.Tensor, torch.Tensor]:
    """w = pi/mu (with grad) and v = target/mu (detached), both clamped in log space."""
    w = torch.exp(_clamped(learner - behaviour.detach()))
    v = torch.exp(_clamped(target.detach() - behaviour.detach()))
    return w, v


def kl_penalty(
    learner_logprobs: torch.Tensor,
    target_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    estimator: KLEstimator,
    direction: KLDirection,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable per-token KL surrogate for tokens sampled from mu (module docstring).

    Implements RPG's fully differentiable off-policy surrogates (arXiv:2505.17508; samples from the
    old policy, weight pi/pi_old): reverse+k1 -> KL(pi||q), reverse+k3 -> UKL(pi||q) (the
    "k3 = UKL" identity), forward+k1 -> KL(q||pi), forward+k3 -> UKL(q||pi). RPG states these per
    sequence; here they are applied per token (per-token ratios, as PPO/GRPO implementations do).

    Args: `[B, T]` log-probs of the sampled tokens under pi (grad), the target q and the behaviour mu;
        `mask` `[B, T]`. Returns: `[B, T]`, 0 at padded positions.
    """
    lp, tq, mu = (_sanitise(t, mask) for t in (learner_logprobs, target_logprobs, behaviour_logprobs))
    tq = tq.detach()
    if direction == "reverse_unweighted":
        return kl_estimate(lp, tq, estimator, mask)
    w, v = _weights(lp, tq, mu)
    if direction == "reverse":
        return _sanitise(w * kl_estimate(lp, tq, estimator), mask)
    if direction == "forward":
        return _sanitise(v * kl_estimate(tq, lp, estimator), mask)
    raise ValueError(f"unknown KL direction {direction!r}; expected 'reverse', 'forward' or 'reverse_unweighted'")


@torch.no_grad()
def kl_reinforce_coef(
    learner_logprobs: torch.Tensor,
    target_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    estimator: KLEstimator,
    direction: KLDirection,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Detached g with d kl_penalty / d log pi = g, per token (RPG's REINFORCE-style weights).

    reverse: g = w * (k(pi, q) + dk/dlog pi); for k3 this is w * log(pi/q), for k1 w * (log(pi/q) + 1).
    forward: g = v * dk(q, pi)/dlog pi; for k3 this is w - v, for k1 it is -v.
    Returns: `[B, T]`, 0 at padded positions.
    """
    lp, tq, mu = (_sanitise(t, mask) for t in (learner_logprobs, target_logprobs, behaviour_logprobs))
    w, v = _weights(lp, tq, mu)
    if direction == "reverse_unweighted":
        g = _d_estimate_d_logp(lp, tq, estimator)
    elif direction == "reverse":
        g = w * (kl_estimate(lp, tq, estimator) + _d_estimate_d_logp(lp, tq, estimator))
    elif direction == "forward":
        g = v * _d_estimate_d_logq(tq, lp, estimator)
    else:
        raise ValueError(f"unknown KL direction {direction!r}; expected 'reverse', 'forward' or 'reverse_unweighted'")
    return _sanitise(g, mask)


def _d_estimate_d_logp(logp: torch.Tensor, logq: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """d kl_estimate(logp, logq) / d logp: the estimate depends on logq - logp only."""
    return -_d_estimate_d_logq(logp, logq, estimator)


def adaptive_kl_coef(coef: float, kl: float, target: float, sequences: float, horizon: int) -> float:
    """The next KL coefficient of Ziegler et al.'s (2019) proportional controller (TRL's and OpenRLHF's
    AdaptiveKLController): `coef * (1 + clip(kl / target - 1, -0.2, 0.2) * min(1, sequences / horizon))`.
    It rises while the measured KL is above the target and falls below it, by at most 20% per step (the
    `min(1, ...)` keeps a step larger than the horizon from flipping the sign). A non-finite `kl` leaves it."""
    if not math.isfinite(kl):
        return coef
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * min(1.0, sequences / horizon))
