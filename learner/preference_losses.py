"""Losses on preference pairs and the reward shaping of a learned reward model.

Contract (all inputs `[B]` float tensors, one entry per pair; outputs a scalar mean unless stated):
- `bradley_terry_loss(r_chosen, r_rejected, margin, magnitude_coef)` = mean(−log σ(r_c − r_r − m))
  + magnitude_coef · mean(r_c² + r_r²) / 2. The margin is Llama 2's preference-strength margin (Touvron et
  al. 2023, eq. 2); the magnitude term keeps the reward's scale anchored, since BT only sees differences.
- `dpo_loss(policy_c, policy_r, ref_c, ref_r, beta, kind, label_smoothing)` on summed sequence log-probs:
  `dpo` (Rafailov et al. 2023): −log σ(β·h) with h = (π_c − ref_c) − (π_r − ref_r);
  `cdpo` (conservative DPO, Mitchell 2023): −(1−ε)·log σ(β·h) − ε·log σ(−β·h), ε = label_smoothing;
  `ipo` (Azar et al. 2023): (h − 1/(2β))², with h from length-averaged log-probs as in the IPO paper.
  Returns (loss, implicit rewards of chosen `[B]`, of rejected `[B]`), the rewards β·(π − ref), detached.
- `pairwise_accuracy(r_chosen, r_rejected)`: the fraction ranked right, ties half.
The RLHF reward shaping itself (the RM score on the last response token, −β·KL on every token) is
`learner.advantages.outcome_token_rewards` with the objective's `kl_ref_in: reward`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

DPOKind = Literal["dpo", "ipo", "cdpo"]


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | float = 0.0,
    magnitude_coef: float = 0.0,
) -> torch.Tensor:
    """Bradley–Terry negative log-likelihood that chosen beats rejected by at least `margin`."""
    nll = -F.logsigmoid(r_chosen - r_rejected - margin).mean()
    if magnitude_coef == 0.0:
        return nll
    return nll + magnitude_coef * 0.5 * (r_chosen.square() + r_rejected.square()).mean()


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    kind: DPOKind = "dpo",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference loss on sequence log-probs `[B]` (summed, or length-averaged for `ipo`)."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if kind == "ipo":
        loss = (h - 1.0 / (2.0 * beta)).square().mean()
    elif kind in ("dpo", "cdpo"):
        eps = label_smoothing if kind == "cdpo" else 0.0
        loss = (-(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)).mean()
    else:
        raise ValueError(f"unknown preference loss kind {kind!r}; use one of dpo, ipo, cdpo")
    chosen_reward = (beta * (policy_chosen - ref_chosen)).detach()
    rejected_reward = (beta * (policy_rejected - ref_rejected)).detach()
    return loss, chosen_reward, rejected_reward


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Fraction of pairs ranked correctly (ties count half, so a constant model scores 0.5)."""
    wins = (r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()
    return float(wins.mean())
