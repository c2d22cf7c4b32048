"""KL estimators by value: hand cases, exact expectations on a small vocabulary, gradients, clamping."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.kl import LOG_RATIO_CLAMP, adaptive_kl_coef, kl_estimate, kl_penalty, kl_reinforce_coef

F64 = torch.float64
ESTIMATORS = ("k1", "k2", "k3")
finite_logp = st.floats(-30.0, 0.0, allow_nan=False)


def test_hand_values():
    logp, logq = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    # r = log(q/p) = -log 2
    assert kl_estimate(logp, logq, "k1").item() == pytest.approx(math.log(2))
    assert kl_estimate(logp, logq, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_estimate(logp, logq, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))


@settings(max_examples=50, deadline=None)
@given(st.lists(finite_logp, min_size=1, max_size=8), st.sampled_from(ESTIMATORS))
def test_kl_of_p_with_itself_is_zero(logps, estimator):
    lp = torch.tensor([logps], dtype=F64)
    assert torch.all(kl_estimate(lp, lp, estimator) == 0)


@settings(max_examples=50, deadline=None)
@given(finite_logp, finite_logp)
def test_k2_k3_non_negative_and_finite(a, b):
    lp, lq = torch.tensor([[a]], dtype=F64), torch.tensor([[b]], dtype=F64)
    for est in ("k2", "k3"):
        v = kl_estimate(lp, lq, est)
        assert torch.isfinite(v).all() and v.item() >= 0


def test_unknown_estimator_is_a_clear_error():
    with pytest.raises(ValueError, match="'k4'"):
        kl_estimate(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


def test_log_ratio_is_clamped():
    v = kl_estimate(torch.tensor([[-1000.0]]), torch.tensor([[0.0]]), "k3")
    assert v.item() == pytest.approx(math.expm1(LOG_RATIO_CLAMP) - LOG_RATIO_CLAMP)


def test_mask_hides_nan_padding_in_value_and_gradient():
    lp = torch.tensor([[-1.0, float("nan")]], requires_grad=True)
    lq = torch.tensor([[-2.0, float("inf")]])
    mask = torch.tensor([[1.0, 0.0]])
    for est in ESTIMATORS:
        v = kl_estimate(lp, lq, est, mask)
        v.sum().backward()
        assert torch.isfinite(v).all() and v[0, 1] == 0 and lp.grad[0, 1] == 0
        lp.grad = None


def _dists(seed, v=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.log_softmax(torch.randn(v, generator=g, dtype=F64) * 1.5, 0) for _ in range(3)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_expectation_of_k1_k3_is_kl(seed):
    """Sum over the whole vocabulary weighted by p: no Monte-Carlo noise."""
    logp, logq, _ = _dists(seed)
    exact = (logp.exp() * (logp - logq)).sum()
    for est in ("k1", "k3"):
        assert (logp.exp() * kl_estimate(logp, logq, est)).sum().item() == pytest.approx(exact.item())


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_penalty_expectation_and_gradient_under_behaviour_are_exact_kl(estimator, direction):
    """E_mu[kl_penalty] is the KL and its gradient is the KL's gradient (RPG's off-policy weighting)."""
    logits = torch.randn(6, generator=torch.Generator().manual_seed(3), dtype=F64).requires_grad_()
    _, logq, logmu = _dists(4)
    logpi = torch.log_softmax(logits, 0)
    value = (logmu.exp() * kl_penalty(logpi, logq, logmu, estimator, direction)).sum()
    (grad,) = torch.autograd.grad(value, logits)
    logpi = torch.log_softmax(logits, 0)
    p, q = logpi.exp(), logq.exp()
    exact = (p * (logpi - logq)).sum() if direction == "reverse" else (q * (logq - logpi)).sum()
    (exact_grad,) = torch.autograd.grad(exact, logits)
    assert value.item() == pytest.approx(exact.item())
    torch.testing.assert_close(grad, exact_grad)


def test_unweighted_k3_under_stale_samples_is_not_the_kl():
    """GRPO's unweighted k3 on tokens from mu != pi misses RPG's importance weight."""
    logpi, logq, logmu = _dists(5)
    unweighted = (logmu.exp() * kl_penalty(logpi, logq, logmu, "k3", "reverse_unweighted")).sum()
    exact = (logpi.exp() * (logpi - logq)).sum()
    assert abs(unweighted.item() - exact.item()) > 1e-3


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("direction", ["reverse", "forward", "reverse_unweighted"])
def test_reinforce_coef_is_the_penalty_gradient(estimator, direction):
    g = torch.Generator().manual_seed(6)
    mu = -torch.rand(2, 5, generator=g, dtype=F64)
    q = mu + 0.5 * torch.randn(2, 5, generator=g, dtype=F64)
    lp = (mu + 0.5 * torch.randn(2, 5, generator=g, dtype=F64)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    (grad,) = torch.autograd.grad(kl_penalty(lp, q, mu, estimator, direction, mask).sum(), lp)
    torch.testing.assert_close(kl_reinforce_coef(lp, q, mu, estimator, direction, mask), grad)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_gradcheck_float64(estimator, direction):
    g = torch.Generator().manual_seed(7)
    mu, q = -torch.rand(2, 3, generator=g, dtype=F64), -torch.rand(2, 3, generator=g, dtype=F64)
    lp = (-torch.rand(2, 3, generator=g, dtype=F64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: kl_penalty(x, q, mu, estimator, direction), (lp,))
    assert torch.autograd.gradcheck(lambda x: kl_estimate(x, q, estimator), (lp,))


def test_forward_k3_to_behaviour_needs_no_weight_and_is_zero_on_policy():
    mu = torch.tensor([[-0.7, -2.0]], dtype=F64)
    lp = mu.clone().requires_grad_()
    v = kl_penalty(lp, mu, mu, "k3", "forward")
    v.sum().backward()
    assert torch.all(v == 0) and torch.all(lp.grad == 0)


@pytest.mark.parametrize("direction", ["reverse", "forward", "reverse_unweighted"])
def test_bad_names_in_penalty_and_coef_are_clear_errors(direction):
    z = torch.zeros(1, 1)
    for fn in (kl_penalty, kl_reinforce_coef):
        with pytest.raises(ValueError, match="'k9'"):
            fn(z, z, z, "k9", direction)
        with pytest.raises(ValueError, match="'sideways'"):
            fn(z, z, z, "k3", "sideways")


@pytest.mark.parametrize(
    ("kl", "sequences", "expected"),
    [
        (0.5, 256, 0.1 * (1 + 0.2 * 256 / 1000)),  # 5x the target: the error clips at +0.2
        (0.11, 256, 0.1 * (1 + 0.1 * 256 / 1000)),  # 10% above: proportional
        (0.0, 500, 0.1 * (1 - 0.2 * 0.5)),  # no KL at all: the error clips at -0.2
        (0.1, 256, 0.1),  # on target: unchanged
        (0.5, 5000, 0.1 * 1.2),  # a step larger than the horizon moves it by 20% at most
        (math.nan, 256, 0.1),  # no measurement (a skipped step): unchanged
    ],
)
def test_adaptive_kl_coef_hand_values(kl, sequences, expected):
    # Ziegler et al. 2019: beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon); target 0.1, horizon 1000
    assert adaptive_kl_coef(0.1, kl, 0.1, sequences, 1000) == pytest.approx(expected, rel=1e-12)
