"""The separate critic: initialised from a reward model its values are the RM's scores of each prefix; the policy
loss trains only the policy and the value loss only the critic; its config and checkpoint are validated."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from learner.config import LearnerConfig
from learner.critic import check_critic, critic_values, load_critic, optimizer_groups
from learner.logprobs import CompletionModel, run_completion_model
from learner.objective import ObjectiveConfig, ObjectiveInputs, compute_targets, objective_loss
from learner.pair_training import pack_sequences
from learner.reward_model import init_reward_model, save_reward_model

PROMPTS = [[3, 5, 6, 7], [4, 4]]
COMPLETIONS = [[8, 9, 10], [11, 12, 13, 14, 9]]


@pytest.fixture(scope="module")
def rm_dir(tiny_model_dir, tmp_path_factory):
    """A reward-model checkpoint from the tiny policy with a non-zero random score head (as before RM training)."""
    rm = init_reward_model(tiny_model_dir, seed=3)
    with torch.no_grad():
        rm.score.weight.normal_(0.0, 0.5)
    return save_reward_model(rm, tiny_model_dir, tmp_path_factory.mktemp("rm"))


def _tokens():
    return pack_sequences(PROMPTS, COMPLETIONS, pad_id=0)


def test_critic_values_are_the_reward_models_scores_of_each_prefix(tiny_model_dir, rm_dir):
    from transformers import AutoModelForSequenceClassification

    critic = load_critic(tiny_model_dir, rm_dir).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    tb = _tokens()
    with torch.no_grad():
        values = critic_values(critic, tb)
        assert values.shape == (2, 5)
        for row, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
            # V(s_t) is the RM's score of prompt + completion[:t], t = 0 .. T-1 (unpadded, alone in its batch)
            expected = [
                rm(input_ids=torch.tensor([prompt + completion[:t]])).logits.item() for t in range(len(completion))
            ]
            torch.testing.assert_close(values[row, : len(completion)], torch.tensor(expected), atol=1e-5, rtol=1e-5)
            # the value at the last completion token is the score of the whole sequence but its final token
            whole_but_last = rm(input_ids=torch.tensor([prompt + completion[:-1]])).logits.item()
            assert values[row, len(completion) - 1].item() == pytest.approx(whole_but_last, abs=1e-5)
    assert values.abs().max() > 1e-3  # a non-trivial head: the comparison above is not 0 == 0


def _model(tiny_model_dir, rm_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return CompletionModel(policy, value_head=False, critic=load_critic(tiny_model_dir, rm_dir))


def _losses(model):
    """(policy loss, value loss, diagnostics) of one GAE objective pass, both from the same forward graph."""
    tb = _tokens()
    logp, _, values = run_completion_model(model, tb, 1.0)
    x = ObjectiveInputs(
        learner_logprobs=logp,
        behaviour_logprobs=logp.detach() - 0.1,
        mask=tb.mask,
        rewards=torch.tensor([1.0, -0.5]),
        group_ids=torch.tensor([0, 0]),
        values=values,
    )
    cfg, no_value = (
        ObjectiveConfig(advantage={"kind": "gae", "value_coef": coef}, kl_behaviour_coef=0.0) for coef in (0.5, 0.0)
    )
    targets = compute_targets(cfg, dataclasses.replace(x, learner_logprobs=logp.detach(), values=values.detach()))
    total, diag = objective_loss(cfg, x, targets)
    pg, _ = objective_loss(no_value, x, targets)
    return pg, total - pg, diag


def _grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def test_policy_loss_reaches_only_the_policy_and_value_loss_only_the_critic(tiny_model_dir, rm_dir):
    model = _model(tiny_model_dir, rm_dir)
    tb = _tokens()
    logp, _, values = run_completion_model(model, tb, 1.0)
    policy_only = _grads(model, logp.sum())
    value_only = _grads(model, values.sum())
    policy_names = {n for n in policy_only if n.startswith("policy.")}
    critic_names = {n for n in policy_only if n.startswith("critic.")}
    assert policy_names and critic_names and policy_names | critic_names == set(policy_only)
    assert all(policy_only[n].abs().sum() == 0 for n in critic_names)
    assert any(policy_only[n].abs().sum() > 0 for n in policy_names)
    assert all(value_only[n].abs().sum() == 0 for n in policy_names)
    assert any(value_only[n].abs().sum() > 0 for n in critic_names)
    assert value_only["critic.score.weight"].abs().sum() > 0  # the scalar head itself is trained


@pytest.mark.parametrize("which", ["value", "policy"])
def test_an_objective_step_of_one_loss_moves_only_its_model(tiny_model_dir, rm_dir, which):
    model = _model(tiny_model_dir, rm_dir)
    optimizer = torch.optim.AdamW(optimizer_groups(model, lr=1e-3, critic_lr=5e-3), weight_decay=0.0)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 5e-3]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pg, value, diag = _losses(model)
    assert diag["value_loss"] > 0 and value.item() == pytest.approx(0.5 * diag["value_loss"], rel=1e-4)
    optimizer.zero_grad(set_to_none=True)
    (value if which == "value" else pg).backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    trained, frozen = ("critic.", "policy.") if which == "value" else ("policy.", "critic.")
    assert moved and all(n.startswith(trained) for n in moved)
    assert not any(n.startswith(frozen) for n in moved)


def test_optimizer_groups_put_every_parameter_in_exactly_one_group(tiny_model_dir, rm_dir):
    model = _model(tiny_model_dir, rm_dir)
    groups = optimizer_groups(model, lr=1e-3, critic_lr=None)
    assert len(groups) == 2 and groups[1]["lr"] == 1e-3  # None = learner.lr
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.critic.parameters()}
    plain = CompletionModel(model.policy, value_head=True)
    assert len(optimizer_groups(plain, 1e-3, None)) == 1


def test_a_value_head_and_a_critic_are_exclusive(tiny_model_dir, rm_dir):
    model = _model(tiny_model_dir, rm_dir)
    assert model.value_head is None
    with pytest.raises(ValueError, match="not both"):
        CompletionModel(model.policy, value_head=True, critic=model.critic)


def test_config_needs_a_critic_based_estimator_and_a_value_loss():
    with pytest.raises(ValueError, match=r"learner\.critic\.path.*advantage\.kind='grpo'.*gae or vtrace"):
        LearnerConfig(critic={"path": "/rm"})
    with pytest.raises(ValueError, match=r"learner\.critic\.path.*value_coef=0"):
        LearnerConfig(critic={"path": "/rm"}, objective={"advantage": {"kind": "gae", "value_coef": 0.0}})
    with pytest.raises(ValueError, match="extra"):
        LearnerConfig(critic={"path": "/rm", "learning_rate": 1e-5}, objective={"advantage": "gae"})
    cfg = LearnerConfig(critic={"path": "/rm", "lr": 3e-4}, objective={"advantage": "vtrace"})
    assert cfg.critic.path == "/rm" and cfg.critic.lr == 3e-4 and LearnerConfig().critic is None


def test_check_critic_rejects_a_causal_lm_and_a_different_tokenizer(tiny_model_dir, bpe_model_dir, rm_dir, tmp_path):
    check_critic(tiny_model_dir, rm_dir)  # the RM of the same base passes
    with pytest.raises(ValueError, match=r"num_labels=1"):
        check_critic(tiny_model_dir, tiny_model_dir)
    two = init_reward_model(tiny_model_dir)
    two.config.num_labels = 2
    with pytest.raises(ValueError, match=r"2 label"):
        check_critic(tiny_model_dir, save_reward_model(two, tiny_model_dir, tmp_path / "two"))
    with pytest.raises(ValueError, match="different tokenizer"):
        check_critic(bpe_model_dir, rm_dir)
