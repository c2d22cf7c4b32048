"""KL terms beyond behaviour/reference: to the learner's own earlier policy, and to a distillation teacher.

Contract: each term is a small frozen config (`coef`, `estimator`, `direction`, `placement`) and one entry
in `extra_kl_terms`, which returns the `(name, coef, target logprobs, estimator, direction, placement)`
tuples `learner.objective` sums like its built-in `kl_behaviour` / `kl_ref` terms (same estimators and
directions from `learner.kl`, same loss/reward placement). A term with `coef == 0` is off and its target
log-probs are neither needed nor read.

- `kl_prev`: regularise each update toward the learner's own earlier policy (mirror descent: Kimi k1.5,
  arXiv:2501.12599, sec. 2.3; RPG's "iteratively refreshed reference", arXiv:2505.17508). Its target is
  either the policy at the start of this sampled batch (`source="previous"`: the proximal point of the
  batch's `updates_per_batch` steps) or a snapshot of the policy the learner refreshes every
  `refresh_versions` policy versions (`source="snapshot"`: a lagged anchor, cheaper to move than a frozen
  reference and not as short-sighted as the previous step).
- `kl_teacher`: on-policy distillation (Agarwal et al., GKD, arXiv:2306.13649; Thinking Machines' "On-Policy
  Distillation", 2025): the student samples, a frozen teacher scores the sampled tokens, and the per-token
  reverse KL(pi || teacher) is the learning signal. With `placement="reward"` and advantage
  `reinforce_pp` at `gamma=0` it is their per-token advantage `-(log pi - log teacher)` (after REINFORCE++'s
  batch whitening); with
  `placement="loss"` it is RPG's differentiable reverse-KL surrogate. `objective.task_reward_coef` mixes in
  (or, at 0, turns off) the task reward.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from learner.kl import KLDirection, KLEstimator

Placement = Literal["loss", "reward"]


class PrevKLConfig(BaseModel):
    """KL to the learner's earlier policy (module docstring). Defaults: reverse k3 in the loss, like Kimi k1.5's
    mirror-descent regulariser tau * KL(pi || pi_old)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    coef: float = Field(
        0.0, ge=0, description="weight of the term (Kimi k1.5's tau); 0 = off. Raise it when updates overshoot"
    )
    source: Literal["previous", "snapshot"] = Field(
        "previous",
        description="'previous': the policy at the start of this sampled batch (needs learner.updates_per_batch "
        "> 1, else the term is identically zero); 'snapshot': a copy of the policy refreshed every "
        "refresh_versions versions, held by every learner rank (one more model in memory)",
    )
    refresh_versions: int = Field(
        10,
        ge=1,
        description="source='snapshot': policy versions between snapshot refreshes; larger = a slower-moving anchor",
    )
    estimator: KLEstimator = Field("k3", description="k1 | k2 | k3 (learner.kl); k3 is unbiased and non-negative")
    direction: KLDirection = Field(
        "reverse", description="reverse = KL(pi || old) as in mirror descent; forward = KL(old || pi)"
    )
    placement: Placement = Field("loss", description="'loss': a penalty term; 'reward': shaped into token rewards")
    offload: bool = Field(
        False, description="source='snapshot': keep the snapshot in CPU memory between passes (GPU memory short)"
    )


class TeacherKLConfig(BaseModel):
    """KL to a frozen teacher (on-policy distillation; `learner.teacher` names the model)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    coef: float = Field(
        0.0, ge=0, description="weight of the per-token KL to the teacher; 0 = off (needs learner.teacher.path)"
    )
    estimator: KLEstimator = Field(
        "k1", description="k1 (log pi - log teacher, the plain per-token reverse KL sample) | k2 | k3"
    )
    direction: KLDirection = Field(
        "reverse", description="reverse = KL(pi || teacher), mode-seeking, the on-policy distillation choice"
    )
    placement: Placement = Field(
        "reward",
        description="'reward': -coef * KL per token in the rewards (with advantage reinforce_pp and gamma 0, the "
        "per-token advantage of on-policy distillation); 'loss': a differentiable penalty term",
    )


def extra_kl_terms(
    prev: PrevKLConfig,
    teacher: TeacherKLConfig,
    prev_logprobs: torch.Tensor | None,
    teacher_logprobs: torch.Tensor | None,
) -> list[tuple[str, float, torch.Tensor | None, str, str, str]]:
    """The active terms, as `learner.objective._kl_terms` lists them (target log-probs `[B, T]`)."""
    terms = []
    if prev.coef > 0:
        terms.append(("kl_prev", prev.coef, prev_logprobs, prev.estimator, prev.direction, prev.placement))
    if teacher.coef > 0:
        terms.append(
            ("kl_teacher", teacher.coef, teacher_logprobs, teacher.estimator, teacher.direction, teacher.placement)
        )
    return terms


def reward_kl_inputs(prev: PrevKLConfig, teacher: TeacherKLConfig) -> set[str]:
    """The target inputs the advantage estimator reads (terms placed in the reward)."""
    need = set()
    if prev.coef > 0 and prev.placement == "reward":
        need.add("prev_logprobs")
    if teacher.coef > 0 and teacher.placement == "reward":
        need.add("teacher_logprobs")
    return need
