"""Advantage estimators by value, with hypothesis invariants (group sums, permutation, masking)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner import advantages as A

F64 = torch.float64


def test_grpo_hand_case_with_singleton_group():
    r = torch.tensor([1.0, 0.0, 1.0, 5.0], dtype=F64)
    gid = torch.tensor([5, 5, 5, 9])
    s = math.sqrt(1 / 3)  # unbiased std of [1, 0, 1]
    torch.testing.assert_close(
        A.grpo_advantages(r, gid, eps=0.0), torch.tensor([1 / 3 / s, -2 / 3 / s, 1 / 3 / s, 0.0], dtype=F64)
    )
    torch.testing.assert_close(
        A.grpo_advantages(r, gid, scale_by_std=False), torch.tensor([1 / 3, -2 / 3, 1 / 3, 0.0], dtype=F64)
    )


def test_rloo_hand_case():
    r = torch.tensor([1.0, 0.0, 1.0, 5.0], dtype=F64)
    torch.testing.assert_close(
        A.rloo_advantages(r, torch.tensor([5, 5, 5, 9])), torch.tensor([0.5, -1.0, 0.5, 0.0], dtype=F64)
    )


def test_zero_variance_group_is_exactly_zero_and_flagged():
    r, gid = torch.tensor([2.0, 2.0, 2.0, 1.0, 0.0]), torch.tensor([0, 0, 0, 1, 1])
    assert torch.all(A.grpo_advantages(r, gid)[:3] == 0) and torch.all(A.rloo_advantages(r, gid)[:3] == 0)
    assert A.zero_variance_groups(r, gid).tolist() == [True, True, True, False, False]
    assert A.zero_variance_groups(torch.tensor([1.0]), torch.tensor([4])).tolist() == [True]


def test_float_group_ids_are_rejected():
    with pytest.raises(ValueError, match="group_ids must be an integer tensor"):
        A.grpo_advantages(torch.ones(2), torch.zeros(2))


groups = st.lists(st.tuples(st.integers(-50, 50), st.floats(-10, 10, allow_nan=False)), min_size=1, max_size=24)


@settings(max_examples=60, deadline=None)
@given(groups, st.randoms(use_true_random=False))
def test_group_sums_zero_and_permutation_invariance(rows, rnd):
    gid = torch.tensor([g for g, _ in rows])
    r = torch.tensor([x for _, x in rows], dtype=F64)
    perm = list(range(len(rows)))
    rnd.shuffle(perm)
    perm = torch.tensor(perm)
    for fn in (A.grpo_advantages, A.rloo_advantages):
        adv = fn(r, gid)
        sums = torch.zeros(101, dtype=F64).index_add_(0, gid + 50, adv)
        assert torch.allclose(sums, torch.zeros_like(sums), atol=1e-6)
        torch.testing.assert_close(fn(r[perm], gid[perm] * 7 + 3), adv[perm])  # order and labels don't matter


def test_last_token_index_and_outcome_placement():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]])  # second row has a hole (e.g. tool output)
    assert A.last_token_index(mask).tolist() == [1, 2]
    tok = torch.where(mask.bool(), 0.5, float("nan"))  # per-token rewards, garbage in padding
    out = A.outcome_token_rewards(torch.tensor([3.0, 4.0]), mask, tok)
    torch.testing.assert_close(out, torch.tensor([[0.5, 3.5, 0, 0], [0.5, 0, 4.5, 0]]))
    with pytest.raises(ValueError, match=r"mask rows \[1\]"):
        A.last_token_index(torch.tensor([[1, 0], [0, 0]]))


def test_returns_to_go_skip_masked_positions():
    r = torch.tensor([[1.0, 2.0, 3.0, float("nan")], [1.0, 100.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 0]])
    g = A.returns_to_go(r, mask, gamma=0.5)
    torch.testing.assert_close(
        g, torch.tensor([[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0, 0.0], [1 + 0.5 * 2, 0.0, 2.0, 0.0]])
    )


def test_returns_to_go_at_gamma_zero_are_each_tokens_own_reward():
    r = torch.tensor([[1.0, -2.0, 3.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1, 0]])
    torch.testing.assert_close(A.returns_to_go(r, mask, gamma=0.0), torch.tensor([[1.0, -2.0, 3.0, 0.0]]))


def test_gae_hand_case():
    r = torch.tensor([[0.0, 0.0, 1.0]], dtype=F64)
    v = torch.tensor([[0.5, 0.6, 0.7]], dtype=F64)
    gamma, lam = 0.9, 0.8
    d2 = 1.0 - 0.7
    d1 = 0.0 + gamma * 0.7 - 0.6
    d0 = 0.0 + gamma * 0.6 - 0.5
    a2, a1 = d2, d1 + gamma * lam * d2
    a0 = d0 + gamma * lam * a1
    adv, ret = A.gae(r, v, torch.ones(1, 3), gamma, lam)
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2]], dtype=F64))
    torch.testing.assert_close(ret, adv + v)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.integers(0, 10_000), st.floats(0.5, 1.0), st.floats(0.0, 1.0))
def test_gae_special_cases_and_masking(t, seed, gamma, lam):
    g = torch.Generator().manual_seed(seed)
    r, v = torch.randn(2, t, generator=g, dtype=F64), torch.randn(2, t, generator=g, dtype=F64)
    ones = torch.ones(2, t)
    # lambda = 1: advantage = discounted return - V; lambda = 0: one-step TD error
    adv1, _ = A.gae(r, v, ones, gamma, 1.0)
    torch.testing.assert_close(adv1, A.returns_to_go(r, ones, gamma) - v)
    adv0, _ = A.gae(r, v, ones, gamma, 0.0)
    next_v = torch.cat([v[:, 1:], torch.zeros(2, 1, dtype=F64)], 1)
    torch.testing.assert_close(adv0, r + gamma * next_v - v)
    # interleaving NaN-filled masked columns is the same as removing them
    pad = torch.full((2, t), float("nan"), dtype=F64)
    mask = torch.stack([ones, torch.zeros(2, t)], -1).reshape(2, 2 * t)
    wide = lambda x: torch.stack([x, pad], -1).reshape(2, 2 * t)  # noqa: E731
    adv_w, ret_w = A.gae(wide(r), wide(v), mask, gamma, lam)
    adv, ret = A.gae(r, v, ones, gamma, lam)
    torch.testing.assert_close(adv_w[:, ::2], adv)
    assert torch.all(adv_w[:, 1::2] == 0) and torch.all(ret_w[:, 1::2] == 0)


def test_reinforce_pp_whitens_over_valid_tokens():
    r = torch.tensor([[0.0, 1.0, float("nan")], [0.0, 0.0, 2.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv, ret = A.reinforce_pp_advantages(r, mask)
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 2.0]], dtype=F64))
    vals = adv[mask.bool()]
    assert vals.mean().item() == pytest.approx(0.0, abs=1e-9) and vals.std().item() == pytest.approx(1.0, abs=1e-6)
    assert adv[0, 2] == 0


def test_reinforce_pp_baseline_subtracts_group_mean_first():
    r = torch.tensor([[0.0, 1.0], [0.0, 3.0], [0.0, 10.0]], dtype=F64)
    mask = torch.ones(3, 2)
    _, ret = A.reinforce_pp_advantages(r, mask, group_ids=torch.tensor([0, 0, 1]))
    torch.testing.assert_close(ret, torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]], dtype=F64))


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(0, 10_000), st.floats(0.5, 1.0))
def test_vtrace_on_policy_is_the_discounted_return(t, seed, gamma):
    g = torch.Generator().manual_seed(seed)
    r, v = torch.randn(2, t, generator=g, dtype=F64), torch.randn(2, t, generator=g, dtype=F64)
    ones = torch.ones(2, t)
    pg, vs = A.vtrace(r, v, torch.zeros(2, t, dtype=F64), ones, gamma)
    torch.testing.assert_close(vs, A.returns_to_go(r, ones, gamma))
    torch.testing.assert_close(pg, vs - v)


def test_vtrace_truncation_hand_case():
    r, v = torch.tensor([[0.0, 1.0, 7.0]], dtype=F64), torch.tensor([[0.5, 0.2, float("nan")]], dtype=F64)
    log_rhos = torch.tensor([[math.log(2.0), math.log(0.5), 0.0]], dtype=F64)
    pg, vs = A.vtrace(r, v, log_rhos, torch.tensor([[1, 1, 0]]), gamma=1.0)
    # t=1: rho 0.5 -> vs = 0.2 + 0.5 * (1 - 0.2) = 0.6; t=0: rho, c clipped to 1 -> vs = 0.5 + (0.2 - 0.5) + 0.4
    torch.testing.assert_close(vs, torch.tensor([[0.6, 0.6, 0.0]], dtype=F64))
    torch.testing.assert_close(pg, torch.tensor([[0.6 - 0.5, 1.0 - 0.2, 0.0]], dtype=F64))


# ---- pass@k-aware estimators ------------------------------------------------------------------------------
def _brute_pass_at_k_advantages(rewards: list[float], k: int) -> list[float]:
    """Enumerate every k-subset: reward = max, advantage = (reward - mean) / population std over subsets,
    a sample's advantage = mean over the subsets holding it (Pass@k Training's full-sampling definition)."""
    import itertools

    subsets = list(itertools.combinations(range(len(rewards)), k))
    sub_r = [max(rewards[i] for i in s) for s in subsets]
    mean = sum(sub_r) / len(sub_r)
    std = math.sqrt(sum((x - mean) ** 2 for x in sub_r) / len(sub_r))
    sub_a = [0.0 if std == 0 else (x - mean) / std for x in sub_r]
    return [
        sum(a for s, a in zip(subsets, sub_a) if i in s) / sum(1 for s in subsets if i in s)
        for i in range(len(rewards))
    ]


def test_pass_at_k_advantage_hand_case():
    # G=4, c=1, k=2: R = 1 - C(3,2)/C(4,2) = 1/2, sigma = 1/2; wrong: C(2,1)/C(3,1) = 2/3 of its subsets are all-wrong
    r, gid = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64), torch.zeros(4, dtype=torch.long)
    torch.testing.assert_close(
        A.pass_at_k_advantages(r, gid, k=2), torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3], dtype=F64)
    )


@pytest.mark.parametrize("G", [2, 3, 4, 6, 8])
def test_pass_at_k_advantage_equals_brute_force_over_k_subsets(G):
    for c in range(G + 1):
        rewards = [1.0] * c + [0.0] * (G - c)
        for k in range(1, G + 1):
            got = A.pass_at_k_advantages(torch.tensor(rewards, dtype=F64), torch.zeros(G, dtype=torch.long), k)
            torch.testing.assert_close(got, torch.tensor(_brute_pass_at_k_advantages(rewards, k), dtype=F64))


def test_pass_at_1_is_grpo_with_population_std():
    r, gid = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0], dtype=F64), torch.zeros(5, dtype=torch.long)
    mean, pop_std = r.mean(), r.std(unbiased=False)
    torch.testing.assert_close(A.pass_at_k_advantages(r, gid, k=1), (r - mean) / pop_std)


def test_pass_at_k_group_pass_rate_is_the_evaluation_estimator():
    from rollout.passk import pass_at_k

    # a correct sample's advantage is (1 - R) / sqrt(R (1 - R)) with R the group's unbiased pass@k
    for G, c, k in [(8, 1, 4), (8, 3, 2), (16, 2, 8)]:
        R = pass_at_k(G, c, k)
        adv = A.pass_at_k_advantages(torch.tensor([1.0] * c + [0.0] * (G - c), dtype=F64), torch.zeros(G).long(), k)
        assert adv[0].item() == pytest.approx((1 - R) / math.sqrt(R * (1 - R)))


def test_pass_at_k_uniform_and_saturated_groups_get_zero():
    gid = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    r = torch.tensor([1.0] * 4 + [0.0] * 4 + [1.0, 1.0, 1.0, 0.0])  # all right, all wrong, c=3 > G-k=2
    assert torch.all(A.pass_at_k_advantages(r, gid, k=2) == 0)
    assert torch.all(A.pass_at_k_advantages(r[:8], gid[:8], k=4) == 0)


def test_pass_at_k_needs_groups_of_at_least_k():
    with pytest.raises(ValueError, match="groups of at least k=4"):
        A.pass_at_k_advantages(torch.tensor([1.0, 0.0, 0.0]), torch.zeros(3, dtype=torch.long), k=4)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.lists(st.sampled_from([0.0, 1.0]), min_size=4, max_size=10), min_size=1, max_size=5),
    st.integers(1, 4),
    st.randoms(use_true_random=False),
)
def test_pass_at_k_advantages_sum_to_zero_and_ignore_order(groups, k, rnd):
    rewards = torch.tensor([r for g in groups for r in g], dtype=F64)
    gid = torch.tensor([i for i, g in enumerate(groups) for _ in g])
    adv = A.pass_at_k_advantages(rewards, gid, k)
    sums = torch.zeros(len(groups), dtype=F64).index_add_(0, gid, adv)
    torch.testing.assert_close(sums, torch.zeros_like(sums), atol=1e-9, rtol=0)
    perm = list(range(len(rewards)))
    rnd.shuffle(perm)
    perm = torch.tensor(perm)
    torch.testing.assert_close(A.pass_at_k_advantages(rewards[perm], gid[perm], k), adv[perm])
    # correct samples never get less than wrong ones of their group
    for g in range(len(groups)):
        rows = gid == g
        right, wrong = adv[rows & (rewards == 1)], adv[rows & (rewards == 0)]
        if right.numel() and wrong.numel():
            assert right.min() >= wrong.max() - 1e-12


def test_best_of_group_hand_cases():
    r = torch.tensor([0.2, 0.9, 0.5, 1.0, 1.0, 0.0, 0.3, 0.3, 7.0], dtype=F64)
    gid = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3])
    got = A.best_of_group_advantages(r, gid, scale_by_std=False)
    # group 0: only the 0.9 gets 0.9 - 0.5; group 1: tied best -> 0; group 2: uniform -> 0; singleton -> 0
    torch.testing.assert_close(got, torch.tensor([0.0, 0.4, 0.0, 0, 0, 0, 0, 0, 0], dtype=F64))
    std = torch.tensor([0.2, 0.9, 0.5], dtype=F64).std()
    scaled = A.best_of_group_advantages(r, gid, scale_by_std=True, eps=1e-6)
    assert scaled[1].item() == pytest.approx(0.4 / (std.item() + 1e-6))
    assert torch.count_nonzero(scaled) == 1


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.floats(0, 1), min_size=2, max_size=8), min_size=1, max_size=5))
def test_best_of_group_credits_one_best_sample_by_its_margin(groups):
    rewards = torch.tensor([r for g in groups for r in g], dtype=F64)
    gid = torch.tensor([i for i, g in enumerate(groups) for _ in g])
    adv = A.best_of_group_advantages(rewards, gid, scale_by_std=False)
    for g, vals in enumerate(groups):
        a = adv[gid == g]
        top = sorted(vals, reverse=True)
        assert a.max().item() == pytest.approx(top[0] - top[1]) and a.min().item() >= 0
        assert torch.count_nonzero(a) <= 1
        if torch.count_nonzero(a):
            assert vals[int(a.argmax())] == top[0]
