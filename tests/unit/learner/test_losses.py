"""Policy losses by value: hand-computed clip cases, aggregation, masking, gradients, RPG equivalences."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner import losses
from learner.kl import kl_penalty, kl_reinforce_coef

F64 = torch.float64


def _leaf(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64).requires_grad_()


def test_ratio_one_means_no_clipping_and_loss_is_minus_mean_advantage():
    lp = _leaf([[-1.0, -2.0, -0.5]])
    adv = torch.tensor([[1.0, -2.0, 0.5]], dtype=F64)
    loss, d = losses.policy_loss(lp, lp.detach().clone(), adv, torch.ones(1, 3), dual_clip=3.0)
    assert loss.item() == pytest.approx(-(1.0 - 2.0 + 0.5) / 3)
    assert d["clip_frac_low"] == d["clip_frac_high"] == d["clip_frac_dual"] == 0.0
    assert d["ratio_mean"] == d["ratio_min"] == d["ratio_max"] == pytest.approx(1.0)
    loss.backward()
    torch.testing.assert_close(lp.grad, -adv / 3)


def test_clip_higher_hand_case():
    old = torch.zeros(1, 2, dtype=F64)
    lp = _leaf([[math.log(1.5), math.log(0.5)]])
    adv = torch.tensor([[1.0, -1.0]], dtype=F64)
    loss, d = losses.policy_loss(lp, old, adv, torch.ones(1, 2), clip_low=0.2, clip_high=0.28)
    # token 0: min(1.5, 1.28) * 1 -> -1.28; token 1: min(-0.5, -0.8) -> +0.8; mean -0.24
    assert loss.item() == pytest.approx(-0.24)
    assert d["clip_frac_high"] == 0.5 and d["clip_frac_low"] == 0.5
    loss.backward()
    assert torch.all(lp.grad == 0)  # both tokens are clipped: no gradient


def test_unclipped_side_keeps_gradient():
    # r = 1.5 with A < 0 is not clipped by PPO (pessimistic side): gradient -A * r / n
    lp = _leaf([[math.log(1.5)]])
    loss, _ = losses.policy_loss(lp, torch.zeros(1, 1, dtype=F64), -torch.ones(1, 1, dtype=F64), torch.ones(1, 1))
    loss.backward()
    assert loss.item() == pytest.approx(1.5) and lp.grad.item() == pytest.approx(1.5)


def test_dual_clip_bounds_negative_advantage():
    lp = _leaf([[math.log(5.0), math.log(2.0)]])
    adv = -torch.ones(1, 2, dtype=F64)
    loss, d = losses.policy_loss(lp, torch.zeros(1, 2, dtype=F64), adv, torch.ones(1, 2), dual_clip=3.0)
    assert loss.item() == pytest.approx((3.0 + 2.0) / 2)
    assert d["clip_frac_dual"] == 0.5
    loss.backward()
    assert lp.grad[0, 0].item() == 0.0 and lp.grad[0, 1].item() == pytest.approx(1.0)


def test_aggregation_modes_hand_case():
    x = torch.tensor([[1.0, 2.0, 99.0], [3.0, 99.0, 99.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert losses.aggregate(x, m, "token-mean").item() == pytest.approx(2.0)
    assert losses.aggregate(x, m, "seq-mean-token-mean").item() == pytest.approx(2.25)
    assert losses.aggregate(x, m, "seq-mean-token-sum").item() == pytest.approx(3.0)
    assert losses.aggregate(x, m, "seq-mean-token-sum-norm", norm_tokens=4).item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="norm_tokens"):
        losses.aggregate(x, m, "seq-mean-token-sum-norm")


def test_empty_mask_gives_zero_loss_still_attached_to_graph():
    lp = _leaf([[-1.0, -1.0]])
    loss, _ = losses.policy_loss(lp, lp.detach(), torch.ones(1, 2, dtype=F64), torch.zeros(1, 2))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(lp.grad == 0)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(2, 6),
    st.integers(0, 10_000),
    st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]),
)
def test_padding_garbage_never_read(b, t, seed, agg):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(b, t, generator=g) < 0.7).to(F64)
    mask[:, 0] = 1
    lp, old = -torch.rand(b, t, generator=g, dtype=F64), -torch.rand(b, t, generator=g, dtype=F64)
    adv = torch.randn(b, t, generator=g, dtype=F64)
    pad = mask == 0

    def run(fill):
        leaf = torch.where(pad, fill, lp).requires_grad_()
        args = [torch.where(pad, fill, v) for v in (old, adv)]
        loss, d = losses.policy_loss(
            leaf, *args, mask, agg=agg, dual_clip=3.0, behaviour_logprobs=torch.where(pad, fill, old - 0.1), tis_cap=2.0
        )
        loss.backward()
        return loss.detach(), leaf.grad, d

    clean, dirty = run(torch.tensor(0.0, dtype=F64)), run(torch.tensor(float("nan"), dtype=F64))
    assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1])
    assert clean[2] == dirty[2] and torch.all(dirty[1][pad] == 0)


def test_gradcheck_policy_loss_float64():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(2, 3, generator=g, dtype=F64)
    lp = (old + 0.05 * torch.randn(2, 3, generator=g, dtype=F64)).requires_grad_()
    # row-constant advantages: GSPO-token's gradient equals the gradient of its value only then
    adv, mask = torch.randn(2, 1, generator=g, dtype=F64).expand(2, 3), torch.tensor([[1, 1, 1], [1, 1, 0]])
    for level in ("token", "sequence"):
        assert torch.autograd.gradcheck(
            lambda x, level=level: losses.policy_loss(x, old, adv, mask, ratio_level=level, agg="seq-mean-token-mean")[
                0
            ],
            (lp,),
        )


def test_decoupled_ppo_weights_by_proximal_over_behaviour_and_tis():
    lp = _leaf([[0.0, 0.0]])
    prox = torch.zeros(1, 2, dtype=F64)
    behaviour = torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=F64)  # weights 2 and 4
    adv = torch.ones(1, 2, dtype=F64)
    loss, d = losses.policy_loss(lp, prox, adv, torch.ones(1, 2), behaviour_logprobs=behaviour)
    assert loss.item() == pytest.approx(-(2 + 4) / 2) and d["behaviour_weight_max"] == pytest.approx(4.0)
    loss, d = losses.policy_loss(lp, prox, adv, torch.ones(1, 2), behaviour_logprobs=behaviour, tis_cap=3.0)
    assert loss.item() == pytest.approx(-(2 + 3) / 2) and d["tis_frac"] == 0.5
    loss, _ = losses.policy_loss(
        lp, prox, adv, torch.ones(1, 2), behaviour_logprobs=behaviour, tis_cap=3.0, tis_mode="mask"
    )
    assert loss.item() == pytest.approx(-(2 + 0) / 2)  # masked token still counts in the denominator


def test_decoupled_trust_region_is_around_proximal_not_behaviour():
    # learner == proximal, behaviour far away: ratio 1, nothing clipped, weight only scales.
    lp = _leaf([[-1.0]])
    _, d = losses.policy_loss(
        lp,
        lp.detach(),
        torch.ones(1, 1, dtype=F64),
        torch.ones(1, 1),
        behaviour_logprobs=torch.tensor([[-3.0]], dtype=F64),
    )
    assert d["clip_frac_high"] == 0 and d["ratio_max"] == pytest.approx(1.0)
    assert d["behaviour_weight_mean"] == pytest.approx(math.exp(2.0))


def test_gspo_sequence_ratio_and_gradient():
    old = torch.zeros(1, 2, dtype=F64)
    lp = _leaf([[0.02, -0.04]])
    loss, d = losses.policy_loss(
        lp,
        old,
        torch.ones(1, 2, dtype=F64),
        torch.ones(1, 2),
        ratio_level="sequence",
        agg="seq-mean-token-mean",
        clip_low=0.1,
        clip_high=0.1,
    )
    s = math.exp(-0.01)  # exp(mean log-ratio)
    assert loss.item() == pytest.approx(-s) and d["ratio_mean"] == pytest.approx(s)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.full((1, 2), -s / 2, dtype=F64))  # d s / d lp_t = s / |y|


def test_vtrace_truncates_rho():
    lp = _leaf([[math.log(3.0), math.log(0.5)]])
    loss, d = losses.vtrace_policy_loss(
        lp, torch.zeros(1, 2, dtype=F64), torch.ones(1, 2, dtype=F64), torch.ones(1, 2), rho_bar=1.0
    )
    assert loss.item() == pytest.approx(-(1.0 + 0.5) / 2) and d["rho_clip_frac"] == 0.5
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.5, -0.25]], dtype=F64))


def test_ess_equal_weights_is_one_and_dominant_weight_is_one_over_n():
    mu = torch.zeros(1, 4)
    assert losses.importance_diagnostics(torch.full((1, 4), 0.3), mu, torch.ones(1, 4))["ess_token"] == pytest.approx(
        1.0
    )
    d = losses.importance_diagnostics(torch.tensor([[15.0, 0.0, 0.0, 0.0]]), mu, torch.ones(1, 4))
    assert d["ess_token"] == pytest.approx(0.25, rel=1e-4) and d["is_ratio_max"] == pytest.approx(
        math.exp(15), rel=1e-5
    )


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("direction", ["reverse", "forward", "reverse_unweighted"])
def test_rpg_reinforce_gradient_equals_surrogate_gradient(estimator, direction):
    """RPG: REINFORCE-style loss with sg weights is gradient-equivalent to the differentiable surrogate."""
    g = torch.Generator().manual_seed(1)
    mu = -torch.rand(3, 4, generator=g, dtype=F64) - 0.1
    ref = mu + 0.3 * torch.randn(3, 4, generator=g, dtype=F64)
    base = mu + 0.3 * torch.randn(3, 4, generator=g, dtype=F64)
    adv, mask, beta = torch.randn(3, 4, generator=g, dtype=F64), torch.tensor([[1, 1, 1, 0]] * 3), 0.7
    lp1, lp2 = base.clone().requires_grad_(), base.clone().requires_grad_()
    surrogate = losses.is_surrogate_loss(lp1, mu, adv, mask)[0] + beta * losses.aggregate(
        kl_penalty(lp1, ref, mu, estimator, direction, mask), mask, "token-mean"
    )
    surrogate.backward()
    coef = beta * kl_reinforce_coef(lp2, ref, mu, estimator, direction, mask)
    losses.rpg_reinforce_loss(lp2, mu, adv, mask, kl_coef=coef)[0].backward()
    torch.testing.assert_close(lp1.grad, lp2.grad)


def test_rpg_clip_weight_hand_case():
    w = torch.tensor([0.5, 1.5, 5.0, 0.5, 1.5, 5.0])
    a = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    out = losses.rpg_clip_weight(w, a, 0.2, 0.28, 3.0)
    torch.testing.assert_close(out, torch.tensor([0.8, 1.28, 1.28, 0.8, 1.5, 3.0]))
    torch.testing.assert_close(losses.rpg_clip_weight(w, a, None, None, None), w)
