"""The registered advantage estimators: each is one config (`kind` + its own knobs) and one function.

Contract: an estimator is `fn(cfg, x: AdvantageInputs) -> (advantages [B, T], returns [B, T] | None)`, computed
without grad, 0 at positions outside `x.mask`. `returns` are value targets for a critic (tag "critic"), or the
undiscounted returns an estimator derives on the way (REINFORCE++), else None. Register one with
`@ADVANTAGES.register(Config, requires=..., tags=...)`; `objective.advantage` then accepts its kind.

Tags (what the rest of the system may rely on):
- "critic": trains a value model beside the policy (a head on its trunk, or `learner.critic`); `returns` are its
  targets; the config has `value_coef`.
- "zero_on_uniform_groups": every member of a group whose rewards are all equal gets advantage 0, so such
  groups may be dropped before training (rollout.drop_uniform_groups).
- "outcome_only": scores a sample by its outcome reward alone (correct or not), so a KL shaped into the
  reward would be lost.
The math lives in `learner.advantages`; this module only adapts each estimator to the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from learner import advantages as adv_lib
from learner.variants import Registry

ADVANTAGES: Registry = Registry(
    "advantage estimator", "objective.advantage", tags=("critic", "zero_on_uniform_groups", "outcome_only")
)
_FROZEN = ConfigDict(frozen=True, extra="forbid")

Gamma = Annotated[
    float,
    Field(
        ge=0,
        le=1,
        description="per-token discount; 1 for outcome rewards, 0 = each token's own reward (per-token advantages, "
        "e.g. on-policy distillation's -(log pi - log teacher) with kl_teacher.placement='reward')",
    ),
]
ValueCoef = Annotated[float, Field(ge=0, description="weight of the value head's loss (value_coef * (V - target)^2/2)")]
Eps = Annotated[float, Field(gt=0, description="added to the group std before dividing (verl 1e-6, TRL 1e-4)")]


@dataclass(frozen=True)
class AdvantageInputs:
    """One rank's whole groups, as the estimators see them (no grad). Per-token tensors are `[B, T]`."""

    token_rewards: torch.Tensor  # outcome reward on each row's last response token + per-token rewards - reward KL
    mask: torch.Tensor  # bool, response tokens
    group_ids: torch.Tensor  # [B] long
    learner_logprobs: torch.Tensor  # the policy before this batch's first update (V-trace's rhos)
    behaviour_logprobs: torch.Tensor
    values: torch.Tensor | None  # V(s_t) from the value head, for "critic" estimators


def _per_sequence(x: AdvantageInputs, adv: torch.Tensor) -> tuple[torch.Tensor, None]:
    """A sequence advantage `[B]` on every response token of its row."""
    return torch.where(x.mask, adv[:, None].to(x.token_rewards.dtype).expand_as(x.token_rewards), 0.0), None


class GRPOAdvantage(BaseModel):
    """GRPO (Shao et al., 2024): (r - group mean) / (group std + eps)."""

    model_config = _FROZEN
    kind: Literal["grpo"] = Field("grpo", description="group-relative advantage (GRPO)")
    scale_by_std: bool = Field(
        True, description="divide by the group's reward std; false is Dr.GRPO-style centring only"
    )
    eps: Eps = 1e-6


@ADVANTAGES.register(GRPOAdvantage, tags=("zero_on_uniform_groups",))
def grpo(cfg: GRPOAdvantage, x: AdvantageInputs):
    return _per_sequence(x, adv_lib.grpo_advantages(x.token_rewards.sum(-1), x.group_ids, cfg.scale_by_std, cfg.eps))


class DrGRPOAdvantage(BaseModel):
    """Dr.GRPO (Liu et al., 2025): r - group mean, with a constant-length loss normaliser."""

    model_config = _FROZEN
    kind: Literal["dr_grpo"] = Field(
        "dr_grpo", description="r - group mean; needs objective.agg='seq-mean-token-sum-norm' (no length bias)"
    )


def _dr_grpo_problems(cfg: DrGRPOAdvantage, objective) -> list[str]:
    if objective.agg == "seq-mean-token-sum-norm":
        return []
    return [
        "objective.advantage='dr_grpo' drops length normalisation: set objective.agg='seq-mean-token-sum-norm' "
        "(and agg_norm_tokens), or use advantage: {kind: grpo, scale_by_std: false}"
    ]


@ADVANTAGES.register(DrGRPOAdvantage, tags=("zero_on_uniform_groups",), check=_dr_grpo_problems)
def dr_grpo(cfg: DrGRPOAdvantage, x: AdvantageInputs):
    return _per_sequence(x, adv_lib.grpo_advantages(x.token_rewards.sum(-1), x.group_ids, False))


class RLOOAdvantage(BaseModel):
    """RLOO (Ahmadian et al., 2024): r minus the mean of the other rewards of the group."""

    model_config = _FROZEN
    kind: Literal["rloo"] = Field("rloo", description="leave-one-out baseline (RLOO)")


@ADVANTAGES.register(RLOOAdvantage, tags=("zero_on_uniform_groups",))
def rloo(cfg: RLOOAdvantage, x: AdvantageInputs):
    return _per_sequence(x, adv_lib.rloo_advantages(x.token_rewards.sum(-1), x.group_ids))


class PassAtKAdvantage(BaseModel):
    """Pass@k Training (Chen et al., 2025): the analytical pass@k advantage of each sample."""

    model_config = _FROZEN
    kind: Literal["pass_at_k"] = Field("pass_at_k", description="optimise pass@k instead of pass@1")
    k: int = Field(
        4,
        ge=1,
        description="k to optimise: larger k rewards exploring for any correct sample, k=1 is GRPO; needs "
        "rollout.group_size >= k, and > k to learn (at k = group size every advantage is 0)",
    )
    solved_at: float = Field(1.0, description="a sample is correct when its reward is at least this")


@ADVANTAGES.register(PassAtKAdvantage, tags=("zero_on_uniform_groups", "outcome_only"), min_group_size=lambda c: c.k)
def pass_at_k(cfg: PassAtKAdvantage, x: AdvantageInputs):
    return _per_sequence(x, adv_lib.pass_at_k_advantages(x.token_rewards.sum(-1), x.group_ids, cfg.k, cfg.solved_at))


class BestOfGroupAdvantage(BaseModel):
    """verl's grpo_passk: only the group's best sample gets credit, its margin over the runner-up."""

    model_config = _FROZEN
    kind: Literal["best_of_group"] = Field("best_of_group", description="best-of-group (pass@G) advantage")
    scale_by_std: bool = Field(
        True, description="divide the margin by the group's std (+ eps) as verl does; false keeps the raw margin"
    )
    eps: Eps = 1e-6


@ADVANTAGES.register(BestOfGroupAdvantage, tags=("zero_on_uniform_groups", "outcome_only"))
def best_of_group(cfg: BestOfGroupAdvantage, x: AdvantageInputs):
    seq = adv_lib.best_of_group_advantages(x.token_rewards.sum(-1), x.group_ids, cfg.scale_by_std, cfg.eps)
    return _per_sequence(x, seq)


class ReinforcePPAdvantage(BaseModel):
    """REINFORCE++ (Hu, 2025): returns-to-go whitened over the batch's tokens."""

    model_config = _FROZEN
    kind: Literal["reinforce_pp"] = Field("reinforce_pp", description="REINFORCE++ (batch-whitened returns-to-go)")
    gamma: Gamma = 1.0


@ADVANTAGES.register(ReinforcePPAdvantage)
def reinforce_pp(cfg: ReinforcePPAdvantage, x: AdvantageInputs):
    return adv_lib.reinforce_pp_advantages(x.token_rewards, x.mask, cfg.gamma)


class ReinforcePPBaselineAdvantage(BaseModel):
    """REINFORCE++-baseline: the group's mean total reward subtracted first, then REINFORCE++."""

    model_config = _FROZEN
    kind: Literal["reinforce_pp_baseline"] = Field(
        "reinforce_pp_baseline", description="REINFORCE++ with a group-mean baseline (not zero on uniform groups)"
    )
    gamma: Gamma = 1.0


@ADVANTAGES.register(ReinforcePPBaselineAdvantage)
def reinforce_pp_baseline(cfg: ReinforcePPBaselineAdvantage, x: AdvantageInputs):
    return adv_lib.reinforce_pp_advantages(x.token_rewards, x.mask, cfg.gamma, x.group_ids)


class GAEAdvantage(BaseModel):
    """PPO's critic-based GAE (Schulman et al., 2016), whitened over the batch; trains a value model."""

    model_config = _FROZEN
    kind: Literal["gae"] = Field("gae", description="generalised advantage estimation with a learned value head")
    gamma: Gamma = 1.0
    lam: float = Field(1.0, ge=0, le=1, description="GAE's lambda (1 = Monte Carlo returns, lower = less variance)")
    value_coef: ValueCoef = 0.5


@ADVANTAGES.register(GAEAdvantage, requires=("values",), tags=("critic",))
def gae(cfg: GAEAdvantage, x: AdvantageInputs):
    a, ret = adv_lib.gae(x.token_rewards, x.values, x.mask, cfg.gamma, cfg.lam)
    # PPO implementations (verl, OpenRLHF) whiten GAE advantages over the batch.
    return adv_lib.masked_whiten(a, x.mask), ret


class VTraceAdvantage(BaseModel):
    """V-trace (Espeholt et al., 2018): off-policy-corrected value targets and advantages; trains a value model."""

    model_config = _FROZEN
    kind: Literal["vtrace"] = Field("vtrace", description="IMPALA's V-trace targets with a learned value head")
    gamma: Gamma = 1.0
    rho_bar: float = Field(1.0, gt=0, description="truncation of the importance weight inside the value targets")
    c_bar: float = Field(1.0, gt=0, description="trace cutting: truncation of the weight carried to earlier tokens")
    value_coef: ValueCoef = 0.5


@ADVANTAGES.register(VTraceAdvantage, requires=("values",), tags=("critic",))
def vtrace(cfg: VTraceAdvantage, x: AdvantageInputs):
    log_rhos = x.learner_logprobs - x.behaviour_logprobs
    return adv_lib.vtrace(x.token_rewards, x.values, log_rhos, x.mask, cfg.gamma, cfg.rho_bar, cfg.c_bar)
