"""Replay's per-group weights into the loss, and the learner's per-group priorities back to replay.

Weights in: replay gives one weight per sampled group in (0, 1] — the prioritized-replay importance
weight (N P(i))^-β / max_j (N P(j))^-β (Schaul et al. 2016, "Prioritized Experience Replay", which
normalises by the maximum weight so the update is only ever scaled down) times the `stale_policy:
downweight` factor decay^(staleness - max_staleness). Every trace of a group gets its group's weight.
They are applied as the PER paper does, by scaling each sample's policy-gradient term: the advantages
are multiplied by the weight (for the PPO/clipped surrogates min(r A, clip(r) A) scales by w > 0
exactly as the loss does; REINFORCE-style losses are linear in A). No re-normalisation over the
batch: a batch of stale groups should move the policy less, not the same amount. KL, entropy and
value terms are regularisers and stay unweighted. With all weights 1 (fifo/uniform, stale_policy
evict) nothing changes, bit for bit.

Priorities out: a group's priority is the mean |advantage| over its trained tokens, before weighting
(the analogue of PER's |TD error|: how much the group still moves the policy; a group whose samples
all scored the same has 0 and is rarely drawn again). Replay floors it at `priority_epsilon`.
"""

from __future__ import annotations

import torch


def row_weights(group_weights: tuple[float, ...] | None, group_ids: torch.Tensor) -> torch.Tensor | None:
    """Per-row weights `[B]` from per-group weights (dense `group_ids` `[B]` index them); None if all are 1."""
    if group_weights is None or all(w == 1.0 for w in group_weights):
        return None
    w = torch.tensor(group_weights, dtype=torch.float32, device=group_ids.device)
    if len(w) != int(group_ids.max()) + 1:
        raise ValueError(f"{len(w)} group weights for {int(group_ids.max()) + 1} groups; send one weight per group")
    return w[group_ids]


def weighted_advantages(advantages: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """`advantages` `[B, T]` scaled row-wise by `weights` `[B]` (module docstring)."""
    return advantages if weights is None else advantages * weights.to(advantages.dtype)[:, None]


def group_priorities(advantages: torch.Tensor, loss_mask: torch.Tensor, group_ids: torch.Tensor) -> list[float]:
    """Mean |advantage| over each group's trained tokens: `[B, T]`, `[B, T]` bool, dense `[B]` -> one per group."""
    n_groups = int(group_ids.max()) + 1
    tok = loss_mask.to(torch.float64)
    per_row = (advantages.detach().abs().to(torch.float64) * tok).sum(-1)
    total = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_ids.cpu(), per_row.cpu())
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_ids.cpu(), tok.sum(-1).cpu())
    return (total / count.clamp(min=1)).tolist()
