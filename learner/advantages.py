"""Advantage estimators: group baselines (GRPO, Dr.GRPO, RLOO, pass@k, best-of-group), REINFORCE++, GAE.

Contract:
- Sequence estimators take `rewards [B]` and `group_ids [B]` (any integers, any order; a group is
  every row sharing an id) and return `[B]`, computed without grad.
- Token estimators take `token_rewards [B, T]`, `mask [B, T]` (1 = response token) and return `[B, T]`;
  padded positions are never read (may hold NaN) and are 0 in the output. Masks need not be
  right-padded: GAE and returns-to-go skip masked positions (e.g. tool output inside a response).
- Degenerate groups: a group of one sample has advantage 0 under GRPO and RLOO (there is no
  baseline but itself; verl instead passes the raw reward through). A zero-variance group has
  advantage exactly 0 (numerator 0). `zero_variance_groups` marks both, for DAPO's dynamic sampling
  filter (Yu et al., 2025), which drops groups that carry no learning signal.
- pass@k-aware estimators (binary rewards: a sample is correct iff reward >= `solved_at`): uniform
  groups get exactly 0, like GRPO and RLOO. `pass_at_k_advantages` also gives 0 to a group whose
  every k-subset already holds a correct sample (more than G - k correct): pass@k is 1 there.
- GRPO scales by the unbiased sample std plus eps (verl, TRL, OpenRLHF agree: `torch.std` + eps),
  eps = 1e-6 as verl (TRL uses 1e-4).
"""

from __future__ import annotations

import torch


def _sanitise(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def _group_index(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`[B]` dense group index of each row (0..n_groups-1) and the number of groups."""
    if group_ids.shape != values.shape or group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(
            f"group_ids must be an integer tensor shaped like rewards {tuple(values.shape)}; "
            f"got {group_ids.dtype} {tuple(group_ids.shape)}"
        )
    _, inv = torch.unique(group_ids, return_inverse=True)
    return inv, int(inv.max()) + 1 if inv.numel() else 0


def _group_stats(values: torch.Tensor, group_ids: torch.Tensor):
    """Per-row group (count, mean, unbiased std) for `values [B]`; std is 0 for singletons."""
    inv, n_groups = _group_index(values, group_ids)
    count = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, inv, torch.ones_like(values))
    mean = torch.zeros_like(count).index_add_(0, inv, values) / count
    sq = torch.zeros_like(count).index_add_(0, inv, (values - mean[inv]) ** 2)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    return count[inv], mean[inv], std[inv]


@torch.no_grad()
def grpo_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO (Shao et al., 2024): (r - group mean) / (group std + eps); `[B] -> [B]`.

    `scale_by_std=False` is Dr.GRPO's advantage (Liu et al., 2025, "Understanding R1-Zero-like
    training"): std scaling up-weights near-solved and near-failed prompts.
    """
    count, mean, std = _group_stats(rewards.to(torch.float64), group_ids)
    adv = rewards.to(torch.float64) - mean
    if scale_by_std:
        adv = adv / (std + eps)
    return torch.where(count > 1, adv, torch.zeros_like(adv)).to(rewards.dtype)


@torch.no_grad()
def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """RLOO (Ahmadian et al., 2024): r_i minus the mean of the *other* rewards of its group; `[B] -> [B]`.

    Equals n/(n-1) * (r_i - group mean); sums to zero per group.
    """
    count, mean, _ = _group_stats(rewards.to(torch.float64), group_ids)
    adv = (rewards.to(torch.float64) - mean) * count / (count - 1).clamp(min=1)
    return torch.where(count > 1, adv, torch.zeros_like(adv)).to(rewards.dtype)


def _all_wrong_fraction(count: torch.Tensor, wrong: torch.Tensor, k: int) -> torch.Tensor:
    """C(wrong, k) / C(count, k) per row, as prod_{i<k} (wrong - i) / (count - i); needs count >= k."""
    out = torch.ones_like(count)
    for i in range(k):
        out = out * ((wrong - i) / (count - i)).clamp(min=0)
    return out


@torch.no_grad()
def pass_at_k_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, k: int, solved_at: float = 1.0
) -> torch.Tensor:
    """Pass@k Training's analytical advantage (Chen et al., 2025, "Pass@k Training for Adaptively
    Balancing Exploration and Exploitation of Large Reasoning Models"); `[B] -> [B]`.

    The group's G samples (c correct, G - c wrong) form C(G, k) k-subsets, each rewarded 1 iff it holds
    a correct sample; a subset's advantage is (its reward - mean) / std over all subsets, and a sample's
    advantage is the mean over the subsets that contain it. In closed form, with
    R = 1 - C(G-c, k) / C(G, k) (the group's pass@k) and sigma = sqrt(R (1 - R)):
        correct sample: (1 - R) / sigma
        wrong sample:   (1 - R - C(G-c-1, k-1) / C(G-1, k-1)) / sigma
    and 0 where sigma = 0 (all correct, none correct, or c > G - k). k = 1 is GRPO with the population std.
    """
    if k < 1:
        raise ValueError(f"pass@k advantages need k >= 1, got k={k}")
    inv, n_groups = _group_index(rewards, group_ids)
    r = rewards.to(torch.float64)
    ok = (r >= solved_at).to(torch.float64)
    count = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, inv, torch.ones_like(r))[inv]
    correct = torch.zeros_like(count).index_add_(0, inv, ok)[inv] if n_groups else count
    if bool((count < k).any()):
        raise ValueError(
            f"pass@{k} advantages need groups of at least k={k} samples, got a group of {int(count.min())}: "
            "raise rollout.group_size or lower learner.objective.pass_k"
        )
    wrong = count - correct
    group_pass = 1.0 - _all_wrong_fraction(count, wrong, k)
    sigma = torch.sqrt(group_pass * (1.0 - group_pass))
    # For a wrong sample: the fraction of its k-subsets whose other k-1 members are all wrong too.
    alone = _all_wrong_fraction(count - 1, (wrong - 1).clamp(min=0), k - 1)
    num = torch.where(ok.bool(), 1.0 - group_pass, 1.0 - group_pass - alone)
    adv = torch.where(sigma > 0, num / sigma.clamp(min=1e-300), torch.zeros_like(num))
    return adv.to(rewards.dtype)


@torch.no_grad()
def best_of_group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Best-of-group (pass@G) advantage, verl's `grpo_passk` estimator (after Tang et al., 2025,
    "Optimizing Language Models for Inference Time Objectives using Reinforcement Learning"); `[B] -> [B]`.

    Only the group's best sample gets credit: r_max - r_second_max (divided by the group's unbiased std
    + eps when `scale_by_std`); every other sample gets 0. Of tied best samples the first in the batch is
    "best", and its advantage is 0 anyway. Groups of one get 0 (no second sample to compare with).
    """
    inv, n_groups = _group_index(rewards, group_ids)
    r = rewards.to(torch.float64)
    rows = torch.arange(r.numel(), device=r.device)
    top = torch.full((n_groups,), -torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, inv, r, "amax")
    first_best = torch.full((n_groups,), r.numel(), device=r.device).scatter_reduce(
        0, inv, torch.where(r == top[inv], rows, r.numel()), "amin"
    )
    is_best = rows == first_best[inv]
    others = torch.where(is_best, -torch.inf, r)
    second = torch.full_like(top, -torch.inf).scatter_reduce(0, inv, others, "amax")
    gap = torch.where(torch.isfinite(second), top - second, torch.zeros_like(top))[inv]
    if scale_by_std:
        _, _, std = _group_stats(r, group_ids)
        gap = gap / (std + eps)
    return torch.where(is_best, gap, torch.zeros_like(gap)).to(rewards.dtype)


@torch.no_grad()
def zero_variance_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """`[B]` bool: the row's group has one sample or all-equal rewards (no signal for group baselines)."""
    count, _, std = _group_stats(rewards.to(torch.float64), group_ids)
    return (count < 2) | (std == 0)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """`[B, T]` mask -> `[B]` long index of each row's last response token; every row needs one."""
    valid = mask.bool()
    if not bool(valid.any(dim=-1).all()):
        rows = (~valid.any(dim=-1)).nonzero().flatten().tolist()
        raise ValueError(f"mask rows {rows[:8]} have no response token; drop empty completions before the learner")
    pos = torch.arange(mask.shape[-1], device=mask.device).expand_as(valid)
    return torch.where(valid, pos, -1).argmax(dim=-1)


@torch.no_grad()
def outcome_token_rewards(
    rewards: torch.Tensor, mask: torch.Tensor, token_rewards: torch.Tensor | None = None
) -> torch.Tensor:
    """`[B]` outcome rewards placed on each row's last response token, plus optional `[B, T]` token rewards."""
    out = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    if token_rewards is not None:
        out = _sanitise(token_rewards.to(rewards.dtype), mask)
    return out.scatter_add(1, last_token_index(mask)[:, None], rewards[:, None])


@torch.no_grad()
def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`[B, T]` -> zero mean, unit (unbiased) variance over the response tokens of the whole batch."""
    m = mask.bool()
    vals = x[m]
    if vals.numel() < 2:
        return _sanitise(x - vals.mean(), mask) if vals.numel() else torch.zeros_like(x)
    return _sanitise((x - vals.mean()) * torch.rsqrt(vals.var() + eps), mask)


@torch.no_grad()
def returns_to_go(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{k >= t, valid} gamma^(#valid steps between) r_k, per row; `[B, T] -> [B, T]`."""
    r, m = _sanitise(token_rewards, mask), mask.bool()
    out, running = torch.zeros_like(r), torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        running = torch.where(m[:, t], r[:, t] + gamma * running, running)
        out[:, t] = running
    return _sanitise(out, mask)


@torch.no_grad()
def reinforce_pp_advantages(
    token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, group_ids: torch.Tensor | None = None
):
    """REINFORCE++ (Hu, 2025): returns-to-go whitened over the batch's tokens; returns (adv, returns) `[B, T]`.

    With `group_ids` this is "REINFORCE++-baseline": each row's total reward is first reduced by its
    group's mean total (placed on the last token), then returns-to-go and batch whitening as usual.
    """
    r = _sanitise(token_rewards, mask)
    if group_ids is not None:
        _, mean, _ = _group_stats(r.sum(dim=-1), group_ids)
        r = r.scatter_add(1, last_token_index(mask)[:, None], -mean[:, None].to(r.dtype))
    returns = returns_to_go(r, mask, gamma)
    return masked_whiten(returns, mask), returns


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al., 2016); returns (advantages, returns), `[B, T]`.

    Args: `rewards [B, T]` per-token rewards, `values [B, T]` V(s_t) of the state before token t, `mask`.
    The value after a row's last response token is 0 (terminal). Advantages are *not* whitened here.
    """
    r, v, m = _sanitise(rewards, mask), _sanitise(values.detach(), mask), mask.bool()
    adv = torch.zeros_like(r)
    next_v, next_a = torch.zeros_like(r[:, 0]), torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_v - v[:, t]
        a_t = delta + gamma * lam * next_a
        next_a = torch.where(m[:, t], a_t, next_a)
        next_v = torch.where(m[:, t], v[:, t], next_v)
        adv[:, t] = a_t
    adv = _sanitise(adv, mask)
    return adv, _sanitise(adv + v, mask)


@torch.no_grad()
def vtrace(
    rewards: torch.Tensor,
    values: torch.Tensor,
    log_rhos: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    rho_bar: float = 1.0,
    c_bar: float = 1.0,
):
    """V-trace (Espeholt et al., 2018, IMPALA eq. 1); returns (pg_advantages, value targets vs), `[B, T]`.

    vs_t = V_t + rho_t d_t + gamma c_t (vs_{t+1} - V_{t+1}), d_t = r_t + gamma V_{t+1} - V_t,
    rho_t = min(rho_bar, pi/mu), c_t = min(c_bar, pi/mu), `log_rhos = log pi - log mu`.
    The policy-gradient advantage is r_t + gamma vs_{t+1} - V_t *without* rho_t: the loss applies
    the truncated weight (`losses.vtrace_policy_loss`). Terminal after the last response token.
    """
    r, v, m = _sanitise(rewards, mask), _sanitise(values.detach(), mask), mask.bool()
    rho = torch.exp(_sanitise(log_rhos.detach(), mask).clamp(-20.0, 20.0))
    rho_c, cs = rho.clamp(max=rho_bar), rho.clamp(max=c_bar)
    pg, vs = torch.zeros_like(r), torch.zeros_like(r)
    next_v, next_vs, acc = (torch.zeros_like(r[:, 0]) for _ in range(3))
    for t in reversed(range(r.shape[1])):
        acc_t = rho_c[:, t] * (r[:, t] + gamma * next_v - v[:, t]) + gamma * cs[:, t] * acc
        pg[:, t] = r[:, t] + gamma * next_vs - v[:, t]
        vs[:, t] = v[:, t] + acc_t
        acc = torch.where(m[:, t], acc_t, acc)
        next_v = torch.where(m[:, t], v[:, t], next_v)
        next_vs = torch.where(m[:, t], vs[:, t], next_vs)
    return _sanitise(pg, mask), _sanitise(vs, mask)
