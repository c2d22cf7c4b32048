"""`LearnerCore` with a separate critic on one real DeepSpeed rank: the critic starts as the reward model, is
trained by the value loss at its own lr, never leaves the learner (published and saved weights are exactly the
policy's), and a checkpoint restores it."""

from __future__ import annotations

import pytest
import torch

from learner.config import LearnerConfig
from learner.reward_model import init_reward_model, save_reward_model
from tests.unit.learner.test_step_state import _batch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("dist_env")]


@pytest.fixture(scope="module")
def rm_dir(tiny_model_dir, tmp_path_factory):
    rm = init_reward_model(tiny_model_dir, seed=5)
    with torch.no_grad():
        rm.score.weight.normal_(0.0, 0.05)
    return save_reward_model(rm, tiny_model_dir, tmp_path_factory.mktemp("rm"))


def _core(model_dir, rm_dir, zero_stage: int = 1, critic_lr: float = 1e-4):
    from learner.step import LearnerCore

    cfg = LearnerConfig(
        zero_stage=zero_stage,
        lr=1e-3,
        critic={"path": str(rm_dir), "lr": critic_lr},
        objective={"advantage": {"kind": "gae", "gamma": 1.0, "lam": 0.95}, "kl_behaviour_coef": 0.0},
    )
    return LearnerCore(cfg, model_dir, 0, 1)


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _policy_names(model_dir) -> list[str]:
    from transformers import AutoModelForCausalLM

    return [n for n, _ in AutoModelForCausalLM.from_pretrained(model_dir).named_parameters()]


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_published_weights_are_exactly_the_policys_and_the_critic_trains(tiny_model_dir, rm_dir, zero_stage):
    core = _core(tiny_model_dir, rm_dir, zero_stage)
    assert core.engine.module.value_head is None and core.engine.module.critic is not None
    assert [g["lr"] for g in core.optimizer.param_groups] == [1e-3, 1e-4]
    published = [n for bucket in core.weight_buckets(2**16) for n, _ in bucket]
    assert sorted(published) == sorted(_policy_names(tiny_model_dir))
    diags = [core.train_step(_batch(seed=0)) for _ in range(8)]
    assert all(d["updates_applied"] == 1.0 for d in diags)
    # the critic fits the returns of this fixed batch (its rewards do not follow from the tokens: not to 0)
    assert diags[-1]["value_loss"] < 0.5 * diags[0]["value_loss"], [d["value_loss"] for d in diags]
    assert sorted(n for n, _ in core.named_weights()) == sorted(_policy_names(tiny_model_dir))


def test_first_values_are_the_reward_models_prefix_scores(tiny_model_dir, rm_dir):
    from transformers import AutoModelForSequenceClassification

    from learner.batch import collate
    from learner.critic import critic_values

    core = _core(tiny_model_dir, rm_dir)
    batch = _batch(seed=1)
    tb = collate(batch, core.pad_id)
    _, values = core._no_grad_pass(tb, "policy", {})
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    with torch.no_grad():
        expected = critic_values(rm, tb.tokens())
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-5)


def test_checkpoint_restores_the_critic_and_the_saved_model_is_the_policy_alone(tiny_model_dir, rm_dir, tmp_path):
    from safetensors.torch import load_file

    core = _core(tiny_model_dir, rm_dir)
    start = _params(core.engine.module)
    for seed in range(2):
        core.train_step(_batch(seed=seed))
    core.save_state(tmp_path / "ckpt")
    saved = _params(core.engine.module)
    moved = {n.split(".")[0] for n in saved if not torch.equal(saved[n], start[n])}
    assert moved == {"policy", "critic"}
    after_one = (core.train_step(_batch(seed=9)), _params(core.engine.module))

    fresh = _core(tiny_model_dir, rm_dir)
    assert fresh.load_state(tmp_path / "ckpt") == 2
    restored = _params(fresh.engine.module)
    assert all(torch.equal(restored[n], saved[n]) for n in saved)  # the critic too, not the RM it started from
    diag = fresh.train_step(_batch(seed=9))  # the critic's optimiser moments came back as well
    assert diag["value_loss"] == after_one[0]["value_loss"]
    assert all(torch.equal(p, after_one[1][n]) for n, p in _params(fresh.engine.module).items())

    out = core.save(tmp_path / "final", tiny_model_dir)
    assert sorted(load_file(out / "model.safetensors")) == sorted(
        load_file(tiny_model_dir / "model.safetensors")
    )  # no critic or score tensors in the policy rollout and users load
