import math

import torch

from learner.advantages import gae, outcome_token_rewards
from learner.preference_losses import bradley_terry_loss, dpo_loss, pairwise_accuracy


def _t(*xs):
    return torch.tensor(xs, dtype=torch.float64, requires_grad=True)


def test_bradley_terry_hand_computed_value_and_gradient():
    r_c, r_r = _t(1.0), _t(0.0)
    loss = bradley_terry_loss(r_c, r_r)
    assert math.isclose(loss.item(), math.log1p(math.exp(-1.0)), rel_tol=1e-12)  # -log sigmoid(1) = 0.31326
    loss.backward()
    sig = 1 / (1 + math.exp(-1.0))
    assert math.isclose(r_c.grad.item(), -(1 - sig), rel_tol=1e-12)
    assert math.isclose(r_r.grad.item(), 1 - sig, rel_tol=1e-12)


def test_bradley_terry_margin_and_magnitude_regulariser():
    assert math.isclose(bradley_terry_loss(_t(1.0), _t(0.0), margin=1.0).item(), math.log(2.0), rel_tol=1e-12)
    per_pair_margin = bradley_terry_loss(_t(1.0, 3.0), _t(0.0, 0.0), margin=torch.tensor([1.0, 3.0]))
    assert math.isclose(per_pair_margin.item(), math.log(2.0), rel_tol=1e-12)
    # 0.1 * (1^2 + 0^2) / 2 = 0.05 on top of the plain loss
    reg = bradley_terry_loss(_t(1.0), _t(0.0), magnitude_coef=0.1).item()
    assert math.isclose(reg, math.log1p(math.exp(-1.0)) + 0.05, rel_tol=1e-12)
    # shifting both rewards changes only the regulariser: BT sees differences alone
    assert math.isclose(bradley_terry_loss(_t(11.0), _t(10.0)).item(), math.log1p(math.exp(-1.0)), rel_tol=1e-12)


def test_bradley_terry_gradcheck():
    r_c, r_r = _t(0.3, -1.2, 2.0), _t(0.1, 0.5, -0.7)
    assert torch.autograd.gradcheck(lambda a, b: bradley_terry_loss(a, b, 0.2, 0.05), (r_c, r_r))


def test_dpo_hand_computed_value_and_gradient():
    pc, pr, rc, rr = _t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0)
    loss, chosen_reward, rejected_reward = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # h = (-1 - -2) - (-3 - -2) = 2; beta*h = 1
    assert math.isclose(loss.item(), math.log1p(math.exp(-1.0)), rel_tol=1e-12)
    loss.backward()
    sig = 1 / (1 + math.exp(-1.0))
    assert math.isclose(pc.grad.item(), -0.5 * (1 - sig), rel_tol=1e-12)
    assert math.isclose(pr.grad.item(), 0.5 * (1 - sig), rel_tol=1e-12)
    assert math.isclose(rc.grad.item(), 0.5 * (1 - sig), rel_tol=1e-12)
    assert chosen_reward.item() == 0.5 and rejected_reward.item() == -0.5


def test_dpo_equal_to_reference_is_log2():
    x = _t(-2.0, -5.0)
    loss, *_ = dpo_loss(x, x * 2, x, x * 2, beta=0.1)
    assert math.isclose(loss.item(), math.log(2.0), rel_tol=1e-12)


def test_conservative_dpo_label_smoothing():
    loss, *_ = dpo_loss(_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0), beta=0.5, kind="cdpo", label_smoothing=0.1)
    expected = 0.9 * math.log1p(math.exp(-1.0)) + 0.1 * math.log1p(math.exp(1.0))
    assert math.isclose(loss.item(), expected, rel_tol=1e-12)
    # "dpo" ignores label_smoothing; cdpo with eps=0 is dpo
    plain, *_ = dpo_loss(_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0), beta=0.5, kind="dpo", label_smoothing=0.1)
    assert math.isclose(plain.item(), math.log1p(math.exp(-1.0)), rel_tol=1e-12)


def test_ipo_hand_computed_value_and_gradient():
    pc = _t(-1.0)
    loss, *_ = dpo_loss(pc, _t(-3.0), _t(-2.0), _t(-2.0), beta=0.5, kind="ipo")
    assert math.isclose(loss.item(), 1.0, rel_tol=1e-12)  # (h - 1/(2*0.5))^2 = (2 - 1)^2
    loss.backward()
    assert math.isclose(pc.grad.item(), 2.0, rel_tol=1e-12)
    at_target, *_ = dpo_loss(_t(0.0), _t(-1.0), _t(0.0), _t(0.0), beta=0.5, kind="ipo")
    assert at_target.item() == 0.0  # h = 1 = 1/(2 beta): IPO's fixed point, unlike DPO's unbounded push


def test_dpo_gradcheck_all_kinds():
    args = _t(-1.0, -4.0), _t(-2.0, -1.5), _t(-1.5, -3.0), _t(-2.5, -2.0)
    for kind in ("dpo", "ipo", "cdpo"):
        assert torch.autograd.gradcheck(lambda *a, k=kind: dpo_loss(*a, 0.3, k, 0.2)[0], args)


def test_rlhf_shaping_puts_the_score_on_the_last_response_token_only():
    # InstructGPT shaping: r_t = -beta * KL_t on every response token, plus the RM score on the last one
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    kl = torch.tensor([[0.5, 0.2, 0.1, 9.0], [0.3, 9.0, 9.0, 9.0], [0.0, 0.1, 0.0, 0.4]])
    beta, scores = 0.1, torch.tensor([2.0, -1.0, 0.5])
    shaped = outcome_token_rewards(scores, mask, -beta * kl * mask)
    expected = torch.tensor(
        [[-0.05, -0.02, 2.0 - 0.01, 0.0], [-1.0 - 0.03, 0.0, 0.0, 0.0], [0.0, -0.01, 0.0, 0.5 - 0.04]]
    )
    torch.testing.assert_close(shaped, expected)
    no_kl = outcome_token_rewards(scores, mask)
    assert torch.equal(no_kl.nonzero(), torch.tensor([[0, 2], [1, 0], [2, 3]]))
    # GAE with a zero critic, gamma = lambda = 1: every token's advantage is the shaped return-to-go
    adv, returns = gae(shaped, torch.zeros_like(shaped), mask, 1.0, 1.0)
    torch.testing.assert_close(adv[0, :3], torch.tensor([1.92, 1.97, 1.99]))
    torch.testing.assert_close(returns[1, 0], torch.tensor(-1.03))


def test_pairwise_accuracy_counts_ties_half():
    assert pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0, 1.0]), torch.tensor([0.0, 1.0, 2.0, -1.0])) == 0.625
