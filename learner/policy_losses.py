"""The registered policy losses: each is one config (`kind` + its own knobs) and one function.

Contract: a policy loss is `fn(cfg, x: PolicyInputs) -> (scalar loss to minimise, dict[str, float] diagnostics)`;
it reads only `x.mask` positions and aggregates with `x.agg` (`losses.aggregate`). Register one with
`@POLICY_LOSSES.register(Config, requires=..., tags=...)`; `objective.policy_loss` then accepts its kind.

Tags: "kl_in_weight": the loss carries the loss-placed KL terms inside its own REINFORCE coefficient
(`x.kl_coef`, RPG), so the objective passes that coefficient and reports the KL terms without adding them.
The math lives in `learner.losses`; this module only adapts each loss to the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from learner import losses
from learner.variants import Registry

POLICY_LOSSES: Registry = Registry("policy loss", "objective.policy_loss", tags=("kl_in_weight",))
_FROZEN = ConfigDict(frozen=True, extra="forbid")

ClipLow = Annotated[float, Field(ge=0, lt=1, description="ratio clip below 1 - clip_low")]
ClipHigh = Annotated[
    float, Field(ge=0, description="ratio clip above 1 + clip_high; > clip_low is DAPO's clip-higher (e.g. 0.28)")
]
DualClip = Annotated[
    float | None,
    Field(
        gt=1,
        description="dual-clip PPO (Ye et al., 2020): bound the loss of negative-advantage tokens at "
        "this ratio (e.g. 3); null = off",
    ),
]


@dataclass(frozen=True)
class PolicyInputs:
    """What a policy loss sees. Per-token tensors are `[B, T]`; `learner_logprobs` carries grad."""

    learner_logprobs: torch.Tensor
    behaviour_logprobs: torch.Tensor  # detached, the policy that sampled the tokens
    proximal_logprobs: torch.Tensor | None  # the policy before this update (decoupled PPO)
    advantages: torch.Tensor
    mask: torch.Tensor  # bool: the tokens trained on
    agg: losses.AggMode
    norm_tokens: int | None
    kl_coef: torch.Tensor | None = None  # sum_j beta_j * kl_reinforce_coef_j, for "kl_in_weight" losses


def _dual_clip_problem(clip_high: float, dual_clip: float | None) -> None:
    if dual_clip is not None and dual_clip <= 1 + clip_high:
        raise ValueError(f"dual_clip={dual_clip} must exceed 1 + clip_high = {1 + clip_high}")


class PPOLoss(BaseModel):
    """PPO-clip (Schulman et al., 2017) against the behaviour policy, with DAPO's asymmetric clip."""

    model_config = _FROZEN
    kind: Literal["ppo"] = Field("ppo", description="PPO-clip against the policy that sampled the tokens")
    clip_low: ClipLow = 0.2
    clip_high: ClipHigh = 0.2
    dual_clip: DualClip = None

    @model_validator(mode="after")
    def _dual(self) -> PPOLoss:
        _dual_clip_problem(self.clip_high, self.dual_clip)
        return self


@POLICY_LOSSES.register(PPOLoss)
def ppo(cfg: PPOLoss, x: PolicyInputs):
    lp, mu = x.learner_logprobs, x.behaviour_logprobs
    return losses.policy_loss(
        lp,
        mu,
        x.advantages,
        x.mask,
        clip_low=cfg.clip_low,
        clip_high=cfg.clip_high,
        dual_clip=cfg.dual_clip,
        agg=x.agg,
        norm_tokens=x.norm_tokens,
    )


class DecoupledPPOLoss(BaseModel):
    """Decoupled PPO (AReaL, Fu et al., 2025): clip against the proximal policy, weight by proximal/behaviour."""

    model_config = _FROZEN
    kind: Literal["decoupled_ppo"] = Field(
        "decoupled_ppo", description="PPO-clip against the proximal policy, importance weight to the behaviour one"
    )
    clip_low: ClipLow = 0.2
    clip_high: ClipHigh = 0.2
    dual_clip: DualClip = None
    tis_cap: float | None = Field(
        None,
        gt=0,
        description="truncated importance sampling (Yao et al., 2025): cap the proximal/behaviour weight (null = off)",
    )
    tis_mode: Literal["truncate", "mask"] = Field(
        "truncate", description="tis_cap: clamp weights above the cap, or mask those tokens out"
    )

    @model_validator(mode="after")
    def _dual(self) -> DecoupledPPOLoss:
        _dual_clip_problem(self.clip_high, self.dual_clip)
        return self


@POLICY_LOSSES.register(DecoupledPPOLoss, requires=("proximal_logprobs",))
def decoupled_ppo(cfg: DecoupledPPOLoss, x: PolicyInputs):
    return losses.policy_loss(
        x.learner_logprobs,
        x.proximal_logprobs,
        x.advantages,
        x.mask,
        clip_low=cfg.clip_low,
        clip_high=cfg.clip_high,
        dual_clip=cfg.dual_clip,
        behaviour_logprobs=x.behaviour_logprobs,
        tis_cap=cfg.tis_cap,
        tis_mode=cfg.tis_mode,
        agg=x.agg,
        norm_tokens=x.norm_tokens,
    )


class GSPOLoss(BaseModel):
    """GSPO (Zheng et al., 2025): the length-normalised sequence ratio, clipped; use agg 'seq-mean-token-mean'."""

    model_config = _FROZEN
    kind: Literal["gspo"] = Field("gspo", description="sequence-level importance ratio (GSPO-token form)")
    # A length-normalised sequence ratio moves far less than a token's: the paper clips at 3e-4 / 4e-4.
    clip_low: ClipLow = 3e-4
    clip_high: ClipHigh = 4e-4
    dual_clip: DualClip = None

    @model_validator(mode="after")
    def _dual(self) -> GSPOLoss:
        _dual_clip_problem(self.clip_high, self.dual_clip)
        return self


@POLICY_LOSSES.register(GSPOLoss)
def gspo(cfg: GSPOLoss, x: PolicyInputs):
    return losses.policy_loss(
        x.learner_logprobs,
        x.behaviour_logprobs,
        x.advantages,
        x.mask,
        clip_low=cfg.clip_low,
        clip_high=cfg.clip_high,
        dual_clip=cfg.dual_clip,
        ratio_level="sequence",
        agg=x.agg,
        norm_tokens=x.norm_tokens,
    )


class VTraceLoss(BaseModel):
    """IMPALA's policy gradient with the truncated importance weight min(pi/mu, rho_bar)."""

    model_config = _FROZEN
    kind: Literal["vtrace"] = Field("vtrace", description="V-trace policy gradient (pair with advantage vtrace)")
    rho_bar: float = Field(1.0, gt=0, description="truncation of the importance weight on the policy gradient")


@POLICY_LOSSES.register(VTraceLoss)
def vtrace(cfg: VTraceLoss, x: PolicyInputs):
    return losses.vtrace_policy_loss(
        x.learner_logprobs,
        x.behaviour_logprobs,
        x.advantages,
        x.mask,
        rho_bar=cfg.rho_bar,
        agg=x.agg,
        norm_tokens=x.norm_tokens,
    )


class RPGSurrogateLoss(BaseModel):
    """RPG's fully differentiable off-policy surrogate -w*A (arXiv:2505.17508); KL terms added as losses."""

    model_config = _FROZEN
    kind: Literal["rpg_surrogate"] = Field("rpg_surrogate", description="Regularized Policy Gradient, surrogate form")


@POLICY_LOSSES.register(RPGSurrogateLoss)
def rpg_surrogate(cfg: RPGSurrogateLoss, x: PolicyInputs):
    return losses.is_surrogate_loss(
        x.learner_logprobs, x.behaviour_logprobs, x.advantages, x.mask, agg=x.agg, norm_tokens=x.norm_tokens
    )


class RPGReinforceLoss(BaseModel):
    """RPG's REINFORCE-style estimator (arXiv:2505.17508), the KL terms inside its coefficient."""

    model_config = _FROZEN
    kind: Literal["rpg_reinforce"] = Field("rpg_reinforce", description="Regularized Policy Gradient, REINFORCE form")
    clip: bool = Field(False, description="RPG-style clip of the weight (clip_low / clip_high / dual_clip)")
    clip_low: ClipLow = 0.2
    clip_high: ClipHigh = 0.2
    dual_clip: float | None = Field(
        None, gt=1, description="with clip: cap the weight of tokens whose regularised advantage is negative"
    )


@POLICY_LOSSES.register(RPGReinforceLoss, tags=("kl_in_weight",))
def rpg_reinforce(cfg: RPGReinforceLoss, x: PolicyInputs):
    low, high, dual = (cfg.clip_low, cfg.clip_high, cfg.dual_clip) if cfg.clip else (None, None, None)
    return losses.rpg_reinforce_loss(
        x.learner_logprobs,
        x.behaviour_logprobs,
        x.advantages,
        x.mask,
        kl_coef=x.kl_coef,
        clip_low=low,
        clip_high=high,
        dual_clip=dual,
        agg=x.agg,
        norm_tokens=x.norm_tokens,
    )
