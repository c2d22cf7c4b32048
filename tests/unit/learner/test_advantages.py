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
