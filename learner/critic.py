"""A separate critic (value model) initialised from a reward model, trained beside the policy.

Contract:
- `CriticConfig` is `learner.critic`: an HF sequence-classification checkpoint with `num_labels=1` (typically
  the run's reward model, as InstructGPT, OpenRLHF and verl initialise the critic) and its own learning rate.
  Without it, GAE/V-trace use a value head on the policy's trunk (`learner.logprobs.CompletionModel`).
- `check_critic(policy_dir, critic_dir)` raises `ValueError` unless the checkpoint has `num_labels=1` and the
  policy's tokenizer (same vocabulary and special ids): the critic reads the policy's token ids.
- `critic_values(critic, tb)` `[B, T]`: the critic's score head on its trunk's hidden state at the positions
  that precede each completion token, so column t is V(s_t) of the prefix prompt + completion[:t] (the same
  convention as the value head; OpenRLHF's and verl's critics read the same positions). Before training,
  V(s_t) equals the reward model's score of that prefix.
- `optimizer_groups(model, lr, critic_lr)`: the policy's parameters (and value head) in group 0, the critic's
  in group 1 with its own learning rate; both follow the learner's schedule (a multiplier of each group's lr).
The critic's parameters never reach rollout or the saved policy: the learner exports `CompletionModel.policy`
only. The value loss reads only the critic's values and the policy loss only the policy's log-probs, so each
gradient stays in its own model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from learner.batch import Tokens


class CriticConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str = Field(
        description="an HF sequence-classification checkpoint (num_labels=1) with the policy's tokenizer, e.g. "
        "runs/<name>/reward_model written by python -m services.train_rm; the critic starts as this model, so "
        "its first values are the reward model's scores of each prefix"
    )
    lr: float | None = Field(
        None,
        gt=0,
        description="the critic's learning rate (after warm-up, same schedule as the policy); None = learner.lr. "
        "OpenRLHF and verl PPO examples give the critic a larger lr than the actor (9e-6 vs 5e-7, 1e-5 vs 1e-6); "
        "a tiny model whose whole critic trunk learns from scratch needs a small one (1e-4 where 1e-3 diverged)",
    )


def check_critic(policy_dir: str | Path, critic_dir: str | Path) -> None:
    """Raise `ValueError` unless `critic_dir` is a one-label checkpoint tokenising exactly like the policy."""
    from learner.auxiliary import check_same_tokenizer  # auxiliary -> logprobs -> critic: imported here

    config = json.loads((Path(critic_dir) / "config.json").read_text())
    labels = len(config.get("id2label") or {"0": "LABEL_0", "1": "LABEL_1"})  # transformers' default: 2 labels
    kinds = config.get("architectures") or []
    if labels != 1 or not any(k.endswith("ForSequenceClassification") for k in kinds):
        raise ValueError(
            f"learner.critic.path={str(critic_dir)!r} is {kinds or 'a model'} with {labels} label(s); the critic "
            "needs a sequence-classification checkpoint with a scalar head (num_labels=1), e.g. a reward model "
            "written by python -m services.train_rm"
        )
    check_same_tokenizer(
        policy_dir,
        critic_dir,
        field="learner.critic.path",
        policy="policy's",
        why="the critic scores the policy's token ids",
        fix="Use a reward model trained from the policy's base model",
    )


def load_critic(policy_dir: str | Path, critic_dir: str | Path, activation_checkpointing: bool = False):
    """The critic as an fp32 `AutoModelForSequenceClassification` (checked by `check_critic`)."""
    from transformers import AutoModelForSequenceClassification

    check_critic(policy_dir, critic_dir)
    critic = AutoModelForSequenceClassification.from_pretrained(str(critic_dir), dtype=torch.float32)
    if activation_checkpointing:
        critic.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return critic


def critic_values(critic: torch.nn.Module, tb: Tokens) -> torch.Tensor:
    """V(s_t) `[B, T]` for every completion column t of `tb` (module docstring)."""
    trunk = getattr(critic, critic.base_model_prefix)  # called as a module: ZeRO-3 gathers fire
    hidden = trunk(
        input_ids=tb.input_ids, attention_mask=tb.attention_mask, position_ids=tb.position_ids, use_cache=False
    ).last_hidden_state
    width = tb.completion_ids.shape[1]
    hidden = hidden[:, tb.prompt_len - 1 : tb.prompt_len - 1 + width]
    return critic.score(hidden.to(critic.score.weight.dtype)).squeeze(-1).float()


def optimizer_groups(model: torch.nn.Module, lr: float, critic_lr: float | None) -> list[dict]:
    """Parameter groups of a `CompletionModel`: everything but the critic, then the critic at `critic_lr`."""
    critic = getattr(model, "critic", None)
    if critic is None:
        return [{"params": list(model.parameters())}]
    own = {id(p) for p in critic.parameters()}
    rest = [p for p in model.parameters() if id(p) not in own]
    return [{"params": rest}, {"params": list(critic.parameters()), "lr": critic_lr or lr}]
