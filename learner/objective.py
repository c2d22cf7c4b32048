"""The learner's objective: config -> (scalar loss, diagnostics), composed from kl/advantages/losses.

Contract:
- `ObjectiveConfig` selects every piece by name and is validated as a whole at start-up.
- `requires(cfg)` names the optional `ObjectiveInputs` fields the learner must fill for `cfg`.
- `compute_objective(cfg, x)` returns the loss to minimise (attached to `x.learner_logprobs`, and to
  `x.values` / `x.entropy` when they are used) and `dict[str, float]` diagnostics. It never reads padded
  positions. It is `objective_loss(cfg, x, compute_targets(cfg, x))`: the targets (advantages, value
  targets, loss mask) come from the batch's whole groups, without grad.

Loss = policy term + sum_j beta_j * agg(kl_penalty_j)   [KL terms with `kl_*_in="loss"`]
       - entropy_coef * agg(entropy) + value_coef * agg((V - returns)^2 / 2)   [gae / vtrace only;
       the returns are GAE's A + V or V-trace's vs, from the detached values of this same call]
KL terms with `kl_*_in="reward"` are instead subtracted per token from the rewards before the
advantage estimator (token-level shaping; the outcome reward sits on the last response token).

KL naming: `kl_behaviour_*` is the KL between the learner and the behaviour policy mu that sampled the
tokens (always available); `kl_ref_*` to a frozen reference model (`ref_logprobs`, off when coef is 0).
Directions (see `learner.kl`): behaviour defaults to "forward" + k3 = UKL(mu || pi), exact under mu's
samples with no importance weight; reference defaults to "reverse" + k3 = UKL(pi || ref), the RLHF
penalty with RPG's importance weight pi/mu (GRPO's unweighted k3 is "reverse_unweighted").

Micro-batches and data parallelism: `compute_targets` runs once on a rank's whole groups (group
baselines exact; REINFORCE++/GAE whitening is rank-local), then `objective_loss` on any part of them
with `denominator` = the aggregation denominator (`losses.agg_denominator`) summed over every part of
the update on every rank. The learner multiplies each part's loss by the world size (DeepSpeed averages
gradients over ranks), so every `agg` mode gives exactly the whole-batch, all-ranks update: token-mean
weighs each token 1/N_total, seq modes each row 1/rows_total, "seq-mean-token-sum-norm" divides by
total rows x agg_norm_tokens. `compute_objective` is both on one part (the whole batch).
Diagnostics are per rank; `learner.diagnostics` declares how each key reduces across ranks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from learner import advantages as adv_lib
from learner import losses
from learner.kl import KLDirection, KLEstimator, kl_penalty, kl_reinforce_coef

AdvantageName = Literal[
    "grpo", "dr_grpo", "rloo", "pass_at_k", "best_of_group", "reinforce_pp", "reinforce_pp_baseline", "gae", "vtrace"
]
CRITIC_ADVANTAGES = ("gae", "vtrace")
# Zero for every member of a group whose rewards are all equal (not reinforce_pp_baseline: its batch
# whitening shifts them), so such groups may be dropped before training (rollout.drop_uniform_groups).
GROUP_BASELINE_ADVANTAGES = ("grpo", "dr_grpo", "rloo", "pass_at_k", "best_of_group")
PASS_AT_K_ADVANTAGES = ("pass_at_k", "best_of_group")  # defined on the outcome reward alone
PolicyLossName = Literal["ppo", "decoupled_ppo", "gspo", "vtrace", "rpg_surrogate", "rpg_reinforce"]
OPTIONAL_INPUTS = ("ref_logprobs", "proximal_logprobs", "token_rewards", "values", "entropy")


class ObjectiveConfig(BaseModel):
    """Every choice of the objective; defaults are GRPO + PPO-clip 0.2/0.2 + 0.01 * k3 KL to behaviour.

    Recipes: Dr.GRPO = advantage "dr_grpo" + agg "seq-mean-token-sum-norm"; DAPO = clip_high 0.28 +
    filter_zero_variance_groups + agg "token-mean"; GSPO = policy_loss "gspo" with clip_low/high ~3e-4/4e-4
    and agg "seq-mean-token-mean" (0.2 almost never clips a length-normalised sequence ratio);
    AReaL = "decoupled_ppo" (+ tis_cap); IMPALA = advantage "vtrace" + policy_loss "vtrace".
    Pass@k Training (Chen et al., 2025) = advantage "pass_at_k" with `pass_k`; verl's grpo_passk (best of
    the group) = advantage "best_of_group".
    RPG family (arXiv:2505.17508) = policy_loss "rpg_surrogate" (fully differentiable) or
    "rpg_reinforce" (REINFORCE-style, `rpg_clip` for RPG-style clip) x kl_*_direction reverse|forward
    x kl_*_estimator k1 (normalised KL) | k3 (unnormalised UKL); RPG's iteratively refreshed reference
    is `kl_behaviour` (the sampling policy) or a `kl_ref` model the learner refreshes.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    advantage: AdvantageName = Field(
        "grpo",
        description="advantage estimator: group baselines (grpo, dr_grpo, rloo), pass@k-aware (pass_at_k, "
        "best_of_group), batch-whitened REINFORCE++ (reinforce_pp, reinforce_pp_baseline) or critic-based (gae, "
        "vtrace: a value head is trained beside the policy)",
    )
    grpo_scale_by_std: bool = Field(
        True, description="advantage=grpo: divide by the group's reward std (false = Dr.GRPO-style centring only)"
    )
    grpo_eps: float = Field(1e-6, gt=0, description="added to the group std before dividing")
    gamma: float = Field(1.0, gt=0, le=1, description="per-token discount (reinforce_pp*, gae); 1 for outcome rewards")
    gae_lambda: float = Field(1.0, ge=0, le=1, description="advantage=gae: GAE's lambda (1 = Monte Carlo returns)")
    filter_zero_variance_groups: bool = Field(
        False,
        description="mask groups whose rewards are all equal out of the loss (DAPO dynamic sampling, learner side; "
        "rollout.drop_uniform_groups drops them before replay instead)",
    )
    pass_k: int = Field(
        4,
        ge=1,
        description=(
            "k that advantage='pass_at_k' optimises (Pass@k Training): larger k rewards exploring for any correct "
            "sample, k=1 is GRPO; needs rollout.group_size >= k"
        ),
    )
    best_of_group_scale_by_std: bool = Field(
        True,
        description=(
            "advantage='best_of_group': divide the best sample's margin over the runner-up by the group's std "
            "(+ grpo_eps), as verl's grpo_passk does; false keeps the raw margin"
        ),
    )

    policy_loss: PolicyLossName = Field(
        "ppo",
        description="ppo (clip against the behaviour policy), decoupled_ppo (AReaL: clip against the proximal "
        "policy, importance weight to the behaviour one), gspo (sequence-level ratio), vtrace, rpg_surrogate or "
        "rpg_reinforce (Regularized Policy Gradient)",
    )
    clip_low: float = Field(0.2, ge=0, lt=1, description="ratio clip below 1 - clip_low")
    clip_high: float = Field(
        0.2, ge=0, description="ratio clip above 1 + clip_high; > clip_low is DAPO's clip-higher (e.g. 0.28)"
    )
    dual_clip: float | None = Field(
        None, gt=1, description="dual-clip PPO: bound the loss of negative-advantage tokens at this ratio (e.g. 3)"
    )
    tis_cap: float | None = Field(
        None, gt=0, description="truncated importance sampling: cap the behaviour importance weight (null = off)"
    )
    tis_mode: Literal["truncate", "mask"] = Field(
        "truncate", description="tis_cap: clamp weights above the cap, or mask those tokens out"
    )
    vtrace_rho_bar: float = Field(
        1.0, gt=0, description="V-trace's rho-bar: importance-weight truncation of the policy term and targets"
    )
    vtrace_c_bar: float = Field(1.0, gt=0, description="advantage=vtrace: V-trace's c-bar (trace cutting)")
    rpg_clip: bool = Field(
        False, description="policy_loss=rpg_reinforce: clip the weight as PPO does (clip_low/clip_high/dual_clip)"
    )

    agg: losses.AggMode = Field(
        "token-mean",
        description="how token losses become one number: over all tokens, per sequence then over sequences, or "
        "sequence sums (normalised by agg_norm_tokens: Dr.GRPO)",
    )
    agg_norm_tokens: int | None = Field(
        None, ge=1, description="agg=seq-mean-token-sum-norm: the constant divisor (e.g. the max completion length)"
    )

    kl_behaviour_coef: float = Field(
        0.01, ge=0, description="weight of the KL between the learner and the policy that sampled the tokens"
    )
    kl_behaviour_estimator: KLEstimator = Field("k3", description="k1, k2 or k3 estimator (Schulman) of that KL")
    kl_behaviour_direction: KLDirection = Field(
        "forward", description="forward = KL(behaviour || learner), exact under the behaviour samples; or reverse"
    )
    kl_behaviour_in: Literal["loss", "reward"] = Field(
        "loss", description="add the KL to the loss, or subtract it per token from the rewards (reward shaping)"
    )
    kl_ref_coef: float = Field(
        0.0, ge=0, description="weight of the KL to a frozen reference model (learner.reference); 0 = no reference"
    )
    kl_ref_estimator: KLEstimator = Field("k3", description="k1, k2 or k3 estimator of the reference KL")
    kl_ref_direction: KLDirection = Field(
        "reverse", description="reverse = KL(learner || reference), the RLHF penalty; or forward"
    )
    kl_ref_in: Literal["loss", "reward"] = Field(
        "loss", description="add the reference KL to the loss, or subtract it per token from the rewards"
    )

    entropy_coef: float = Field(
        0.0, ge=0, description="entropy bonus weight (with its gradient); > 0 slows entropy collapse"
    )
    value_coef: float = Field(0.5, ge=0, description="advantage=gae|vtrace: weight of the value head's loss")

    @model_validator(mode="after")
    def _consistent(self) -> ObjectiveConfig:
        for problem in _config_problems(self):
            raise ValueError(problem)
        return self


def _config_problems(c: ObjectiveConfig) -> list[str]:
    p = []
    if c.advantage == "dr_grpo" and c.agg != "seq-mean-token-sum-norm":
        p.append(
            "objective.advantage='dr_grpo' drops length normalisation: set objective.agg="
            "'seq-mean-token-sum-norm' (and agg_norm_tokens), or use advantage='grpo' with "
            "grpo_scale_by_std=false"
        )
    if c.agg == "seq-mean-token-sum-norm" and c.agg_norm_tokens is None:
        p.append(
            "objective.agg='seq-mean-token-sum-norm' needs objective.agg_norm_tokens (e.g. the max response length)"
        )
    if c.tis_cap is not None and c.policy_loss != "decoupled_ppo":
        p.append(
            "objective.tis_cap caps the proximal/behaviour weight, which only objective.policy_loss="
            "'decoupled_ppo' has; use vtrace_rho_bar for 'vtrace' or unset tis_cap"
        )
    if c.dual_clip is not None and c.policy_loss in ("vtrace", "rpg_surrogate"):
        p.append(f"objective.dual_clip does not apply to policy_loss='{c.policy_loss}'; unset it")
    if c.dual_clip is not None and c.dual_clip <= 1 + c.clip_high and c.policy_loss != "rpg_reinforce":
        p.append(f"objective.dual_clip={c.dual_clip} must exceed 1 + clip_high = {1 + c.clip_high}")
    if c.rpg_clip and c.policy_loss != "rpg_reinforce":
        p.append("objective.rpg_clip applies to policy_loss='rpg_reinforce' only")
    if c.advantage in PASS_AT_K_ADVANTAGES and "reward" in (c.kl_behaviour_in, c.kl_ref_in):
        p.append(
            f"objective.advantage='{c.advantage}' scores samples by their outcome (correct or not), so a KL "
            "shaped into the reward would be lost: set kl_behaviour_in / kl_ref_in to 'loss'"
        )
    return p


def requires(cfg: ObjectiveConfig) -> set[str]:
    """Optional `ObjectiveInputs` fields `cfg` needs (token_rewards is always optional)."""
    need = set()
    if cfg.kl_ref_coef > 0:
        need.add("ref_logprobs")
    if cfg.policy_loss == "decoupled_ppo":
        need.add("proximal_logprobs")
    if cfg.advantage in CRITIC_ADVANTAGES:
        need.add("values")
    if cfg.entropy_coef > 0:
        need.add("entropy")
    return need


@dataclass
class ObjectiveInputs:
    """One rank's batch of whole groups. Per-token tensors are `[B, T]`, aligned with `mask`."""

    learner_logprobs: torch.Tensor  # [B, T], requires grad
    behaviour_logprobs: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] float/bool, 1 = response token
    rewards: torch.Tensor  # [B]
    group_ids: torch.Tensor  # [B] long
    ref_logprobs: torch.Tensor | None = None  # [B, T]
    proximal_logprobs: torch.Tensor | None = None  # [B, T]
    token_rewards: torch.Tensor | None = None  # [B, T], added to the outcome reward
    values: torch.Tensor | None = None  # [B, T], V(s_t) from the value head (grad -> value loss)
    entropy: torch.Tensor | None = None  # [B, T], learner's per-token entropy


def _check_inputs(cfg: ObjectiveConfig, x: ObjectiveInputs, needed: set[str] | None = None) -> None:
    shape = tuple(x.learner_logprobs.shape)
    if len(shape) != 2:
        raise ValueError(f"learner_logprobs must be [B, T]; got shape {shape}")
    for name in ("behaviour_logprobs", "mask", *OPTIONAL_INPUTS):
        t = getattr(x, name)
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {shape} like learner_logprobs")
    for name in ("rewards", "group_ids"):
        if tuple(getattr(x, name).shape) != shape[:1]:
            raise ValueError(f"{name} has shape {tuple(getattr(x, name).shape)}; expected ({shape[0]},)")
    missing = sorted(n for n in (requires(cfg) if needed is None else needed) if getattr(x, n) is None)
    if missing:
        raise ValueError(
            f"the objective config needs {missing} (see objective.requires(cfg)); compute them "
            "in the learner or change objective.kl_ref_coef / policy_loss / advantage / entropy_coef"
        )


def _kl_terms(cfg: ObjectiveConfig, x: ObjectiveInputs) -> list[tuple[str, float, torch.Tensor, str, str, str]]:
    """(name, coef, target logprobs, estimator, direction, placement) for each active KL term."""
    terms = []
    if cfg.kl_behaviour_coef > 0:
        terms.append(
            (
                "kl_behaviour",
                cfg.kl_behaviour_coef,
                x.behaviour_logprobs,
                cfg.kl_behaviour_estimator,
                cfg.kl_behaviour_direction,
                cfg.kl_behaviour_in,
            )
        )
    if cfg.kl_ref_coef > 0:
        terms.append(
            ("kl_ref", cfg.kl_ref_coef, x.ref_logprobs, cfg.kl_ref_estimator, cfg.kl_ref_direction, cfg.kl_ref_in)
        )
    return terms


def _advantages(cfg, x, m, reward_kl: torch.Tensor):
    """Per-token advantages `[B, T]` (no grad), returns `[B, T]` or None, and the outcome rewards `[B]`."""
    outcome = adv_lib.outcome_token_rewards(x.rewards.to(reward_kl.dtype), m, x.token_rewards)
    tok = outcome - reward_kl
    if cfg.advantage in GROUP_BASELINE_ADVANTAGES:
        a = _sequence_advantages(cfg, tok.sum(-1), x.group_ids)
        return torch.where(m, a[:, None].expand_as(tok), 0.0), None, outcome.sum(-1)
    if cfg.advantage in ("reinforce_pp", "reinforce_pp_baseline"):
        gids = x.group_ids if cfg.advantage == "reinforce_pp_baseline" else None
        a, ret = adv_lib.reinforce_pp_advantages(tok, m, cfg.gamma, gids)
        return a, ret, outcome.sum(-1)
    if cfg.advantage == "vtrace":
        log_rhos = x.learner_logprobs.detach() - x.behaviour_logprobs
        a, vs = adv_lib.vtrace(tok, x.values, log_rhos, m, cfg.gamma, cfg.vtrace_rho_bar, cfg.vtrace_c_bar)
        return a, vs, outcome.sum(-1)
    a, ret = adv_lib.gae(tok, x.values, m, cfg.gamma, cfg.gae_lambda)
    # PPO implementations (verl, OpenRLHF) whiten GAE advantages over the batch.
    return adv_lib.masked_whiten(a, m), ret, outcome.sum(-1)


def _sequence_advantages(cfg: ObjectiveConfig, seq: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """One advantage per sequence `[B]` from its total reward `[B]`, for the group-baseline estimators."""
    if cfg.advantage == "rloo":
        return adv_lib.rloo_advantages(seq, group_ids)
    if cfg.advantage == "pass_at_k":
        return adv_lib.pass_at_k_advantages(seq, group_ids, cfg.pass_k)
    if cfg.advantage == "best_of_group":
        return adv_lib.best_of_group_advantages(seq, group_ids, cfg.best_of_group_scale_by_std, cfg.grpo_eps)
    return adv_lib.grpo_advantages(seq, group_ids, cfg.advantage == "grpo" and cfg.grpo_scale_by_std, cfg.grpo_eps)


def _policy_term(cfg, x, adv, m, kl_coef):
    common = {"agg": cfg.agg, "norm_tokens": cfg.agg_norm_tokens}
    lp, mu = x.learner_logprobs, x.behaviour_logprobs
    if cfg.policy_loss in ("ppo", "gspo", "decoupled_ppo"):
        decoupled = cfg.policy_loss == "decoupled_ppo"
        return losses.policy_loss(
            lp,
            x.proximal_logprobs if decoupled else mu,
            adv,
            m,
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
            dual_clip=cfg.dual_clip,
            ratio_level="sequence" if cfg.policy_loss == "gspo" else "token",
            behaviour_logprobs=mu if decoupled else None,
            tis_cap=cfg.tis_cap,
            tis_mode=cfg.tis_mode,
            **common,
        )
    if cfg.policy_loss == "vtrace":
        return losses.vtrace_policy_loss(lp, mu, adv, m, rho_bar=cfg.vtrace_rho_bar, **common)
    if cfg.policy_loss == "rpg_surrogate":
        return losses.is_surrogate_loss(lp, mu, adv, m, **common)
    clip = (cfg.clip_low, cfg.clip_high, cfg.dual_clip) if cfg.rpg_clip else (None, None, None)
    return losses.rpg_reinforce_loss(
        lp, mu, adv, m, kl_coef=kl_coef, clip_low=clip[0], clip_high=clip[1], dual_clip=clip[2], **common
    )


@dataclass(frozen=True)
class Targets:
    """What the objective derives from a whole rank batch once, before any update (no grad).

    Advantages need whole groups (and batch whitening), so micro- and minibatches take theirs from here.
    """

    advantages: torch.Tensor  # [B, T]
    returns: torch.Tensor | None  # [B, T] value targets (gae / vtrace), else None
    outcome: torch.Tensor  # [B] summed outcome rewards
    loss_mask: torch.Tensor  # [B, T] bool: response tokens of the groups that are trained on

    def select(self, rows: torch.Tensor, width: int) -> Targets:
        """The targets of `rows` (long `[b]`), cut to `width` completion columns (`TrainBatch.select`)."""
        return Targets(
            self.advantages[rows, :width],
            None if self.returns is None else self.returns[rows, :width],
            self.outcome[rows],
            self.loss_mask[rows, :width],
        )


@torch.no_grad()
def compute_targets(cfg: ObjectiveConfig, x: ObjectiveInputs) -> Targets:
    """Advantages, value targets and the loss mask of one rank's whole groups.

    `x.learner_logprobs` / `x.values` are the policy's before this batch's first update (they feed V-trace's
    rhos, GAE and reward-placed KL terms, as the old policy does in PPO's epochs).
    """
    reward_ref = cfg.kl_ref_coef > 0 and cfg.kl_ref_in == "reward"
    _check_inputs(cfg, x, (requires(cfg) & {"values"}) | ({"ref_logprobs"} if reward_ref else set()))
    x = _upcast(x)
    m = x.mask.bool()
    adv_lib.last_token_index(m)  # every row must have a response token
    lp, mu = x.learner_logprobs.detach(), x.behaviour_logprobs
    zeros = torch.zeros(m.shape, dtype=lp.dtype, device=lp.device)
    reward_kl = sum(
        (c * kl_penalty(lp, t, mu, est, d, m) for _, c, t, est, d, w in _kl_terms(cfg, x) if w == "reward"), zeros
    )
    adv, returns, outcome = _advantages(cfg, x, m, reward_kl)
    keep = ~adv_lib.zero_variance_groups(outcome, x.group_ids) if cfg.filter_zero_variance_groups else m.any(-1)
    return Targets(adv, returns, outcome, m & keep[:, None])


def objective_loss(
    cfg: ObjectiveConfig, x: ObjectiveInputs, targets: Targets, denominator: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of rows `x` given their `targets`, and diagnostics over those rows.

    `denominator`: the aggregation denominator of the whole update (`losses.agg_denominator` summed over
    its micro-batches and ranks); the loss is then this part's share of the whole-batch loss, so the
    gradients of the parts add up to the gradient of the whole. None: `x` is the whole update.
    """
    _check_inputs(cfg, x)
    x = _upcast(x)
    m, lm, adv = x.mask.bool(), targets.loss_mask, targets.advantages
    lp, mu = x.learner_logprobs, x.behaviour_logprobs.detach()
    terms = _kl_terms(cfg, x)
    pens = {n: kl_penalty(lp, t, mu, est, d, m) for n, _, t, est, d, _ in terms}
    zeros = torch.zeros(m.shape, dtype=lp.dtype, device=lp.device)
    loss_terms = [(n, c, t, est, d) for n, c, t, est, d, w in terms if w == "loss"]
    rpg = cfg.policy_loss == "rpg_reinforce"
    kl_coef = (
        sum((c * kl_reinforce_coef(lp, t, mu, est, d, lm) for _, c, t, est, d in loss_terms), zeros) if rpg else None
    )
    pg, diag = _policy_term(cfg, x, adv, lm, kl_coef)
    kl_loss = sum(
        (c * losses.aggregate(pens[n], lm, cfg.agg, cfg.agg_norm_tokens) for n, c, *_ in loss_terms),
        torch.zeros((), dtype=lp.dtype, device=lp.device),
    )
    # rpg_reinforce already carries the KL terms in its REINFORCE coefficient: report, don't add.
    loss, extra = (pg if rpg else pg + kl_loss), {"pg_loss": pg.detach(), "kl_loss": kl_loss.detach()}
    loss, extra = _entropy_and_value(cfg, x, lm, targets.returns, loss, extra)
    if denominator is not None:
        share = losses.agg_denominator(lm, cfg.agg, cfg.agg_norm_tokens).to(loss.dtype)
        loss = loss * (share / torch.as_tensor(denominator, dtype=loss.dtype, device=loss.device))
    extra |= {n: losses.masked_mean(p.detach(), m) for n, p in pens.items()}
    extra |= _batch_stats(adv, m, lm, targets.outcome)
    out = {"loss": float(loss.detach())} | losses.as_floats(extra) | diag
    return loss, out | losses.importance_diagnostics(lp.detach(), mu, m)


def compute_objective(cfg: ObjectiveConfig, x: ObjectiveInputs) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar loss to minimise and per-rank diagnostics for one batch of whole groups (module docstring)."""
    return objective_loss(cfg, x, compute_targets(cfg, x))


def _upcast(x: ObjectiveInputs) -> ObjectiveInputs:
    """Float tensors to at least float32 (bf16 ratios and advantages lose too much); grad flows through."""

    def up(t):
        return t if t is None or not t.is_floating_point() else t.to(torch.promote_types(t.dtype, torch.float32))

    return dataclasses.replace(
        x, **{f.name: up(getattr(x, f.name)) for f in dataclasses.fields(x) if f.name not in ("mask", "group_ids")}
    )


def _entropy_and_value(cfg, x, lm, returns, loss, extra):
    if x.entropy is not None:
        extra["entropy"] = losses.masked_mean(x.entropy.detach(), x.mask)
        if cfg.entropy_coef > 0:  # the bonus needs the entropy's own gradient (the learner computes it with grad)
            loss = loss - cfg.entropy_coef * losses.aggregate(x.entropy, lm, cfg.agg, cfg.agg_norm_tokens)
    if cfg.advantage in CRITIC_ADVANTAGES and cfg.value_coef > 0:
        err = torch.where(lm, x.values - returns.to(x.values.dtype), 0.0)
        v_loss = losses.aggregate(0.5 * err * err, lm, cfg.agg, cfg.agg_norm_tokens)
        loss, extra["value_loss"] = loss + cfg.value_coef * v_loss, v_loss.detach()
    return loss, extra


def _batch_stats(adv, m, lm, outcome):
    a = adv[lm].to(torch.float64)
    n_tok = m.sum().clamp(min=1)
    return {
        "adv_mean": a.mean() if a.numel() else torch.zeros(()),
        "adv_std": a.std() if a.numel() > 1 else torch.zeros(()),
        "reward_mean": outcome.to(torch.float64).mean(),
        "masked_token_frac": 1 - m.sum() / m.numel(),
        "filtered_token_frac": (m & ~lm).sum() / n_tok,
    }
