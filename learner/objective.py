"""The learner's objective: config -> (scalar loss, diagnostics), composed from kl/advantages/losses.

Contract:
- `ObjectiveConfig` selects every piece and is validated as a whole at start-up. The advantage estimator
  and the policy loss are registered variants, each with its own small config (`learner.advantage_estimators`,
  `learner.policy_losses`): a new one is registered in one place, and validation, `requires` and the config
  reference follow from the registry. Flat keys that moved into a variant's config fail with the new spelling.
- `requires(cfg)` names the optional `ObjectiveInputs` fields the learner must fill for `cfg` (the variants
  declare theirs when they register).
- `compute_objective(cfg, x)` returns the loss to minimise (attached to `x.learner_logprobs`, and to
  `x.values` / `x.entropy` when they are used) and `dict[str, float]` diagnostics. It never reads padded
  positions. It is `objective_loss(cfg, x, compute_targets(cfg, x))`: the targets (advantages, value
  targets, loss mask) come from the batch's whole groups, without grad.

Loss = policy term + sum_j beta_j * agg(kl_penalty_j)   [KL terms with `kl_*_in="loss"`]
       - entropy_coef * agg(entropy) + value_coef * agg((V - returns)^2 / 2)   [critic advantages only
       (gae, vtrace); the returns are GAE's A + V or V-trace's vs, from the detached values of this same call]
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
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from learner import advantages as adv_lib
from learner import losses
from learner.advantage_estimators import ADVANTAGES, AdvantageInputs, GRPOAdvantage
from learner.kl import KLDirection, KLEstimator, kl_penalty, kl_reinforce_coef
from learner.kl_terms import PrevKLConfig, TeacherKLConfig, extra_kl_terms, reward_kl_inputs
from learner.policy_losses import POLICY_LOSSES, PolicyInputs, PPOLoss

OPTIONAL_INPUTS = (
    "ref_logprobs",
    "prev_logprobs",
    "teacher_logprobs",
    "proximal_logprobs",
    "token_rewards",
    "values",
    "entropy",
)

# Keys of the flat objective config that now live in a variant's own config: old key -> (section, new key,
# kinds that have it, the first being the one to suggest when the config names none of them).
MOVED_KEYS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "grpo_scale_by_std": ("advantage", "scale_by_std", ("grpo",)),
    "grpo_eps": ("advantage", "eps", ("grpo", "best_of_group")),
    "best_of_group_scale_by_std": ("advantage", "scale_by_std", ("best_of_group",)),
    "pass_k": ("advantage", "k", ("pass_at_k",)),
    "gamma": ("advantage", "gamma", ("gae", "vtrace", "reinforce_pp", "reinforce_pp_baseline")),
    "gae_lambda": ("advantage", "lam", ("gae",)),
    "value_coef": ("advantage", "value_coef", ("gae", "vtrace")),
    "vtrace_c_bar": ("advantage", "c_bar", ("vtrace",)),
    "vtrace_rho_bar": ("advantage", "rho_bar", ("vtrace",)),  # and policy_loss.rho_bar (`_moved_keys`)
    "clip_low": ("policy_loss", "clip_low", ("ppo", "decoupled_ppo", "gspo", "rpg_reinforce")),
    "clip_high": ("policy_loss", "clip_high", ("ppo", "decoupled_ppo", "gspo", "rpg_reinforce")),
    "dual_clip": ("policy_loss", "dual_clip", ("ppo", "decoupled_ppo", "gspo", "rpg_reinforce")),
    "tis_cap": ("policy_loss", "tis_cap", ("decoupled_ppo",)),
    "tis_mode": ("policy_loss", "tis_mode", ("decoupled_ppo",)),
    "rpg_clip": ("policy_loss", "clip", ("rpg_reinforce",)),
}


class ObjectiveConfig(BaseModel):
    """Every choice of the objective; defaults are GRPO + PPO-clip 0.2/0.2 + 0.01 * k3 KL to behaviour.

    `advantage` and `policy_loss` are registered variants (`learner.advantage_estimators`,
    `learner.policy_losses`), each with its own config: a bare kind (`advantage: rloo`) takes its defaults,
    a mapping sets its knobs (`policy_loss: {kind: ppo, clip_high: 0.28}`).
    Recipes: Dr.GRPO = advantage "dr_grpo" + agg "seq-mean-token-sum-norm"; DAPO = policy_loss
    {kind: ppo, clip_high: 0.28} + filter_zero_variance_groups + agg "token-mean"; GSPO = policy_loss "gspo"
    (clip 3e-4/4e-4) + agg "seq-mean-token-mean"; AReaL = policy_loss "decoupled_ppo" (+ tis_cap);
    IMPALA = advantage "vtrace" + policy_loss "vtrace". Pass@k Training (Chen et al., 2025) = advantage
    {kind: pass_at_k, k: ...}; verl's grpo_passk (best of the group) = advantage "best_of_group".
    RPG family (arXiv:2505.17508) = policy_loss "rpg_surrogate" (fully differentiable) or
    "rpg_reinforce" (REINFORCE-style, `clip: true` for RPG-style clip) x kl_*_direction reverse|forward
    x kl_*_estimator k1 (normalised KL) | k3 (unnormalised UKL); RPG's iteratively refreshed reference
    is `kl_behaviour` (the sampling policy) or a `kl_ref` model the learner refreshes.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    advantage: Annotated[BaseModel, ADVANTAGES] = Field(
        default_factory=GRPOAdvantage,
        description="advantage estimator, a kind or {kind: ..., its fields}: group baselines (grpo, dr_grpo, rloo), "
        "pass@k-aware (pass_at_k, best_of_group), batch-whitened REINFORCE++ (reinforce_pp, reinforce_pp_baseline) "
        "or critic-based (gae, vtrace: a value head on the policy's trunk, or learner.critic, trains beside it)",
    )
    filter_zero_variance_groups: bool = Field(
        False,
        description="mask groups whose rewards are all equal out of the loss (DAPO dynamic sampling, learner side; "
        "rollout.drop_uniform_groups drops them before replay instead)",
    )
    policy_loss: Annotated[BaseModel, POLICY_LOSSES] = Field(
        default_factory=PPOLoss,
        description="policy loss, a kind or {kind: ..., its fields}: ppo (clip against the behaviour policy), "
        "decoupled_ppo (AReaL: clip against the proximal policy, importance weight to the behaviour one), gspo "
        "(sequence-level ratio), vtrace, rpg_surrogate or rpg_reinforce (Regularized Policy Gradient)",
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
    kl_ref_target: float | None = Field(
        None,
        gt=0,
        description="adaptive KL control (Ziegler et al. 2019, as TRL's and OpenRLHF's kl_target): kl_ref_coef is the "
        "starting coefficient, and after each step it is multiplied by 1 + clip(KL / target - 1, -0.2, 0.2) * "
        "min(1, sequences / kl_ref_horizon), KL being the step's per-token KL to the reference; None = a fixed "
        "coefficient. Set it to hold the policy near a KL budget where a learned reward is still trustworthy",
    )
    kl_ref_horizon: int = Field(
        10000, ge=1, description="sequences over which the adaptive coefficient may change by up to 20% (kl_ref_target)"
    )
    kl_prev: PrevKLConfig = Field(
        default_factory=PrevKLConfig,
        description="a KL term to the learner's own earlier policy (mirror descent, Kimi k1.5); off at coef 0",
    )
    kl_teacher: TeacherKLConfig = Field(
        default_factory=TeacherKLConfig,
        description="on-policy distillation: a KL term to a frozen teacher's log-probs (learner.teacher); 0 = off",
    )
    task_reward_coef: float = Field(
        1.0,
        ge=0,
        description="scales the task's rewards (outcome and per-step) before the advantage estimator; 0 trains on "
        "the KL terms alone (pure on-policy distillation with kl_teacher)",
    )

    entropy_coef: float = Field(
        0.0, ge=0, description="entropy bonus weight (with its gradient); > 0 slows entropy collapse"
    )

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and (message := _moved_keys(data)):
            raise ValueError(message)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ObjectiveConfig:
        for problem in _config_problems(self):
            raise ValueError(problem)
        return self


def _yaml_inline(fields: dict[str, Any]) -> str:
    def text(v: Any) -> str:
        return {True: "true", False: "false", None: "null"}.get(v, str(v)) if isinstance(v, bool | None) else str(v)

    return "{" + ", ".join(f"{k}: {text(v)}" for k, v in fields.items()) + "}"


def _moved_keys(data: dict) -> str | None:
    """The start-up error for flat keys that moved into a variant's config, with the new spelling."""
    old = [k for k in data if k in MOVED_KEYS]
    if not old:
        return None
    new: dict[str, dict[str, Any]] = {}
    for key in old:
        section, name, kinds = MOVED_KEYS[key]
        current = data.get(section)
        current = current.get("kind") if isinstance(current, dict) else current
        kind = current if current in kinds else kinds[0]
        new.setdefault(section, {"kind": kind})[name] = data[key]
        if key == "vtrace_rho_bar":  # one knob before, now the targets' and the policy gradient's own
            new.setdefault("policy_loss", {"kind": "vtrace"})["rho_bar"] = data[key]
    spelled = "; ".join(f"{section}: {_yaml_inline(fields)}" for section, fields in new.items())
    return (
        f"objective.{', objective.'.join(old)} moved into the variant's own config: write {spelled} "
        "(see deploy/configs/REFERENCE.md)"
    )


def _config_problems(c: ObjectiveConfig) -> list[str]:
    p = ADVANTAGES.of(c.advantage).problems(c.advantage, c) + POLICY_LOSSES.of(c.policy_loss).problems(c.policy_loss, c)
    if c.agg == "seq-mean-token-sum-norm" and c.agg_norm_tokens is None:
        p.append(
            "objective.agg='seq-mean-token-sum-norm' needs objective.agg_norm_tokens (e.g. the max response length)"
        )
    if c.kl_ref_target is not None and c.kl_ref_coef == 0:
        p.append(
            "objective.kl_ref_target adapts kl_ref_coef from its starting value, which is 0 (no reference): set "
            "kl_ref_coef > 0 (e.g. 0.05) as the starting coefficient"
        )
    if c.task_reward_coef == 0 and c.filter_zero_variance_groups:
        p.append(
            "objective.task_reward_coef=0 makes every group's task reward 0, so filter_zero_variance_groups would "
            "mask every group: set filter_zero_variance_groups=false (distillation alone learns from kl_teacher)"
        )
    reward_kl = "reward" in (c.kl_behaviour_in, c.kl_ref_in) or reward_kl_inputs(c.kl_prev, c.kl_teacher)
    if "outcome_only" in ADVANTAGES.of(c.advantage).tags and reward_kl:
        p.append(
            f"objective.advantage='{c.advantage.kind}' scores samples by their outcome (correct or not), so a KL "
            "shaped into the reward would be lost: set kl_behaviour_in / kl_ref_in / kl_prev.placement / "
            "kl_teacher.placement to 'loss'"
        )
    return p


def requires(cfg: ObjectiveConfig) -> set[str]:
    """Optional `ObjectiveInputs` fields `cfg` needs (token_rewards is always optional)."""
    need = set(ADVANTAGES.of(cfg.advantage).requires | POLICY_LOSSES.of(cfg.policy_loss).requires)
    if cfg.kl_ref_coef > 0:
        need.add("ref_logprobs")
    if cfg.kl_prev.coef > 0:
        need.add("prev_logprobs")
    if cfg.kl_teacher.coef > 0:
        need.add("teacher_logprobs")
    if cfg.entropy_coef > 0:
        need.add("entropy")
    return need


def trains_value_head(cfg: ObjectiveConfig) -> bool:
    """The advantage estimator is critic-based: the learner trains a value head beside the policy."""
    return "critic" in ADVANTAGES.of(cfg.advantage).tags


def zero_on_uniform_groups(cfg: ObjectiveConfig) -> bool:
    """Groups whose rewards are all equal get advantage 0, so dropping them before training changes nothing."""
    return "zero_on_uniform_groups" in ADVANTAGES.of(cfg.advantage).tags


def min_group_size(cfg: ObjectiveConfig) -> int:
    """Samples per group the advantage estimator needs (pass@k: k)."""
    return ADVANTAGES.of(cfg.advantage).group_size_needed(cfg.advantage)


@dataclass
class ObjectiveInputs:
    """One rank's batch of whole groups. Per-token tensors are `[B, T]`, aligned with `mask`."""

    learner_logprobs: torch.Tensor  # [B, T], requires grad
    behaviour_logprobs: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] float/bool, 1 = response token
    rewards: torch.Tensor  # [B]
    group_ids: torch.Tensor  # [B] long
    ref_logprobs: torch.Tensor | None = None  # [B, T]
    prev_logprobs: torch.Tensor | None = None  # [B, T], the learner's earlier policy (kl_prev)
    teacher_logprobs: torch.Tensor | None = None  # [B, T], a frozen teacher's (kl_teacher)
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
    return terms + extra_kl_terms(cfg.kl_prev, cfg.kl_teacher, x.prev_logprobs, x.teacher_logprobs)


def _advantages(cfg: ObjectiveConfig, x: ObjectiveInputs, m: torch.Tensor, reward_kl: torch.Tensor):
    """Per-token advantages `[B, T]` (no grad), returns `[B, T]` or None, and the outcome rewards `[B]`."""
    task_tok = None if x.token_rewards is None else x.token_rewards * cfg.task_reward_coef
    outcome = adv_lib.outcome_token_rewards(x.rewards.to(reward_kl.dtype) * cfg.task_reward_coef, m, task_tok)
    lp = x.learner_logprobs.detach()
    inputs = AdvantageInputs(outcome - reward_kl, m, x.group_ids, lp, x.behaviour_logprobs, x.values)
    a, returns = ADVANTAGES.of(cfg.advantage).fn(cfg.advantage, inputs)
    return a, returns, outcome.sum(-1)


def _policy_term(cfg: ObjectiveConfig, x: ObjectiveInputs, adv, m, kl_coef):
    inputs = PolicyInputs(
        x.learner_logprobs, x.behaviour_logprobs, x.proximal_logprobs, adv, m, cfg.agg, cfg.agg_norm_tokens, kl_coef
    )
    return POLICY_LOSSES.of(cfg.policy_loss).fn(cfg.policy_loss, inputs)


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
    reward_ref = {"ref_logprobs"} if cfg.kl_ref_coef > 0 and cfg.kl_ref_in == "reward" else set()
    _check_inputs(cfg, x, (requires(cfg) & {"values"}) | reward_ref | reward_kl_inputs(cfg.kl_prev, cfg.kl_teacher))
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
    kl_in_weight = "kl_in_weight" in POLICY_LOSSES.of(cfg.policy_loss).tags
    kl_coef = (
        sum((c * kl_reinforce_coef(lp, t, mu, est, d, lm) for _, c, t, est, d in loss_terms), zeros)
        if kl_in_weight
        else None
    )
    pg, diag = _policy_term(cfg, x, adv, lm, kl_coef)
    kl_loss = sum(
        (c * losses.aggregate(pens[n], lm, cfg.agg, cfg.agg_norm_tokens) for n, c, *_ in loss_terms),
        torch.zeros((), dtype=lp.dtype, device=lp.device),
    )
    # A "kl_in_weight" loss (RPG's REINFORCE form) already carries the KL terms in its coefficient: report, don't add.
    loss, extra = (pg if kl_in_weight else pg + kl_loss), {"pg_loss": pg.detach(), "kl_loss": kl_loss.detach()}
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
    if trains_value_head(cfg) and cfg.advantage.value_coef > 0:
        err = torch.where(lm, x.values - returns.to(x.values.dtype), 0.0)
        v_loss = losses.aggregate(0.5 * err * err, lm, cfg.agg, cfg.agg_norm_tokens)
        loss, extra["value_loss"] = loss + cfg.advantage.value_coef * v_loss, v_loss.detach()
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
