"""kl_prev / kl_teacher terms and task_reward_coef, checked by value on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from learner.config import LearnerConfig
from learner.objective import ObjectiveConfig, ObjectiveInputs, compute_objective, requires

F64 = torch.float64


def _x(**extra) -> ObjectiveInputs:
    # one group of two rows, equal rewards: GRPO's advantage is 0, so the loss is the KL term alone
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -1.0]], dtype=F64, requires_grad=True)
    mask = torch.ones(2, 2, dtype=F64)
    return ObjectiveInputs(lp, lp.detach().clone(), mask, torch.ones(2, dtype=F64), torch.tensor([0, 0]), **extra)


TARGET = torch.tensor([[-1.5, -2.0], [-0.5, -0.25]], dtype=F64)


def _k3(r: float) -> float:
    return math.exp(r) - r - 1


@pytest.mark.parametrize("term", ["kl_prev", "kl_teacher"])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_reverse_kl_term_in_the_loss_by_value(term, estimator):
    # behaviour == learner, so w = pi/mu = 1 and the penalty is the plain estimate of KL(pi || target)
    r = [-0.5, 0.0, 0.0, 0.75]  # log target - log pi per token
    est = {"k1": lambda v: -v, "k2": lambda v: v * v / 2, "k3": _k3}[estimator]
    expected = sum(est(v) for v in r) / 4  # token-mean
    sub = {"coef": 0.5, "estimator": estimator, "direction": "reverse", "placement": "loss"}
    cfg = ObjectiveConfig(kl_behaviour_coef=0.0, **{term: sub})
    name = "prev_logprobs" if term == "kl_prev" else "teacher_logprobs"
    assert requires(cfg) == {name}
    loss, d = compute_objective(cfg, _x(**{name: TARGET}))
    assert d[term] == pytest.approx(expected, abs=1e-12)
    assert loss.item() == pytest.approx(0.5 * expected, abs=1e-12)


def test_k3_reverse_gradient_is_the_kl_gradient():
    # d/dlp of w * k3(lp, q) at w = 1: (exp(r) - 1) * -1 ... plus w' * k3 = k3; total = k3 + 1 - exp(r)
    cfg = ObjectiveConfig(kl_behaviour_coef=0.0, kl_prev={"coef": 1.0, "direction": "reverse"})
    x = _x(prev_logprobs=TARGET)
    loss, _ = compute_objective(cfg, x)
    loss.backward()
    r = TARGET - x.learner_logprobs.detach()
    expected = (torch.expm1(r) - r + 1 - torch.exp(r)) / 4
    assert torch.allclose(x.learner_logprobs.grad, expected, atol=1e-12)


def test_kl_to_itself_is_zero():
    x = _x()
    cfg = ObjectiveConfig(kl_behaviour_coef=0.0, kl_prev={"coef": 1.0}, kl_teacher={"coef": 1.0, "placement": "loss"})
    loss, d = compute_objective(
        cfg, _x(prev_logprobs=x.learner_logprobs.detach(), teacher_logprobs=x.behaviour_logprobs)
    )
    assert d["kl_prev"] == 0.0 and d["kl_teacher"] == 0.0 and loss.item() == 0.0


def test_teacher_kl_in_the_reward_gives_per_token_advantages():
    # reinforce_pp, gamma 0: returns are the per-token rewards -coef * (log pi - log teacher), then whitened
    cfg = ObjectiveConfig(
        advantage={"kind": "reinforce_pp", "gamma": 0.0},
        kl_behaviour_coef=0.0,
        task_reward_coef=0.0,
        kl_teacher={"coef": 1.0},
    )
    x = _x(teacher_logprobs=TARGET)
    from learner.objective import compute_targets

    adv = compute_targets(cfg, x).advantages
    raw = TARGET - x.learner_logprobs.detach()  # -(log pi - log teacher), the k1 sample negated
    white = (raw - raw.mean()) / raw.flatten().std()
    assert torch.allclose(adv, white, atol=1e-6)


def test_task_reward_coef_scales_outcome_and_step_rewards():
    tok = torch.tensor([[0.5, 0.0], [0.0, 0.0]], dtype=F64)
    cfg = ObjectiveConfig(advantage="rloo", kl_behaviour_coef=0.0, task_reward_coef=0.5)
    x = _x(token_rewards=tok)
    x.rewards = torch.tensor([1.0, 0.0], dtype=F64)
    _, d = compute_objective(cfg, x)
    assert d["reward_mean"] == pytest.approx((0.5 * 1.5 + 0.0) / 2)


def test_config_refuses_previous_with_one_update_and_teacher_without_path():
    with pytest.raises(ValueError, match="updates_per_batch"):
        LearnerConfig(objective={"kl_prev": {"coef": 0.1}})
    LearnerConfig(objective={"kl_prev": {"coef": 0.1}}, updates_per_batch=2)
    LearnerConfig(objective={"kl_prev": {"coef": 0.1, "source": "snapshot"}})
    with pytest.raises(ValueError, match="teacher.path"):
        LearnerConfig(objective={"kl_teacher": {"coef": 0.1}})
    with pytest.raises(ValueError, match="teacher.path"):
        LearnerConfig(teacher={"path": "/x"})
    with pytest.raises(ValueError, match="pass_at_k"):
        ObjectiveConfig(advantage="pass_at_k", kl_teacher={"coef": 0.1})


def test_distillation_alone_refuses_the_task_reward_filters():
    with pytest.raises(ValueError, match="filter_zero_variance_groups"):
        ObjectiveConfig(task_reward_coef=0.0, filter_zero_variance_groups=True)
    from services.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="drop_uniform_groups"):
        load_config(None, ["learner.objective.task_reward_coef=0", "rollout.drop_uniform_groups=true"])
