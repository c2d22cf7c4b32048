"""Replay weights scale each group's policy-gradient term; priorities are mean |advantage| per group."""

from __future__ import annotations

import torch

from learner.config import LearnerConfig
from learner.objective import ObjectiveInputs, compute_targets, objective_loss
from learner.sample_weights import group_priorities, row_weights, weighted_advantages


def test_row_weights_expand_per_group_and_ones_are_a_no_op():
    gids = torch.tensor([0, 0, 1, 1, 1])
    assert row_weights((0.5, 0.25), gids).tolist() == [0.5, 0.5, 0.25, 0.25, 0.25]
    assert row_weights((1.0, 1.0), gids) is None and row_weights(None, gids) is None


def test_group_priorities_hand_computed():
    adv = torch.tensor([[1.0, -3.0], [2.0, 0.0], [0.5, 0.5]])
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    # group 0: |1| + |-3| + |2| over 3 tokens = 2; group 1: 0.5
    assert group_priorities(adv, mask, torch.tensor([0, 0, 1])) == [2.0, 0.5]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    b, t = 4, 3
    mu = -torch.rand(b, t, generator=g)
    lp = (mu + 0.1 * torch.randn(b, t, generator=g)).requires_grad_()
    return ObjectiveInputs(
        learner_logprobs=lp,
        behaviour_logprobs=mu,
        mask=torch.ones(b, t),
        rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]),
        group_ids=torch.tensor([0, 0, 1, 1]),
    )


def test_weights_change_the_loss_by_exactly_the_group_weight():
    cfg = LearnerConfig().objective
    x = _inputs()
    targets = compute_targets(cfg, x)
    base_loss, base_diag = objective_loss(cfg, x, targets)
    base = torch.tensor(base_diag["pg_loss"])
    w = row_weights((0.5, 0.5), x.group_ids)
    halved = type(targets)(
        weighted_advantages(targets.advantages, w), targets.returns, targets.outcome, targets.loss_mask
    )
    loss, diag = objective_loss(cfg, x, halved)
    # the policy term is linear in a uniform positive weight (KL/entropy regularisers are not weighted)
    assert abs(diag["pg_loss"] - 0.5 * float(base)) < 1e-6 and float(loss) != float(base_loss)
    uneven = row_weights((1.0, 0.1), x.group_ids)
    t2 = type(targets)(
        weighted_advantages(targets.advantages, uneven), targets.returns, targets.outcome, targets.loss_mask
    )
    _, diag2 = objective_loss(cfg, x, t2)
    assert abs(diag2["pg_loss"] - float(base)) > 1e-5 and abs(diag2["pg_loss"] - 0.5 * float(base)) > 1e-5
