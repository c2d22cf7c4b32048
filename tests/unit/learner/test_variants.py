"""Registered objective variants: pinned numbers, a toy variant end to end, bare kinds, moved keys, errors."""

from __future__ import annotations

from typing import Literal

import pydantic
import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from learner.advantage_estimators import ADVANTAGES, GRPOAdvantage
from learner.objective import ObjectiveConfig, ObjectiveInputs, compute_objective, requires, trains_value_head
from learner.policy_losses import POLICY_LOSSES, PPOLoss
from services.config import ConfigError, load_config

F64 = torch.float64


def _batch(drift=0.3, rewards=(1.0, 0.25, 1.0, 0.5, 0.0, 0.0)) -> ObjectiveInputs:
    g = torch.Generator().manual_seed(0)
    mu = -torch.rand(6, 5, generator=g, dtype=F64) - 0.05
    lp = (mu + drift * torch.randn(6, 5, generator=g, dtype=F64)).requires_grad_()
    mask = torch.ones(6, 5, dtype=F64)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    values = (0.1 * torch.randn(6, 5, generator=g, dtype=F64)).requires_grad_()
    prox = mu + 0.05 * torch.randn(6, 5, generator=g, dtype=F64)
    gids = torch.tensor([3, 3, 3, 7, 7, 7])
    return ObjectiveInputs(lp, mu, mask, torch.tensor(rewards, dtype=F64), gids, values=values, proximal_logprobs=prox)


# (config, loss, sum |d loss / d learner_logprobs|, adv_mean), taken from the flat-config objective (if-chains)
# on this batch before the variants were registered; each old flat spelling is in the comment.
PINNED = {
    "grpo": ({}, 0.15006108060259918, 0.5662520374359884, -0.14433723396484288),
    "grpo_nostd": (  # grpo_scale_by_std=False, grpo_eps=1e-3
        dict(advantage=dict(kind="grpo", scale_by_std=False, eps=1e-3)),
        0.0612004728700766,
        0.18435424964646577,
        -0.0625,
    ),
    "dr_grpo": (
        dict(advantage="dr_grpo", agg="seq-mean-token-sum-norm", agg_norm_tokens=5),
        0.04896037829606128,
        0.14748339971717261,
        -0.0625,
    ),
    "rloo": (dict(advantage="rloo"), 0.0915328127434708, 0.275578578412846, -0.09375),
    "best_of_group": (  # grpo_eps=1e-3
        dict(advantage=dict(kind="best_of_group", eps=1e-3)),
        -0.3565050983748007,
        0.27313589953378353,
        0.3595982334223171,
    ),
    "best_of_group_raw": (  # best_of_group_scale_by_std=False
        dict(advantage=dict(kind="best_of_group", scale_by_std=False)),
        -0.10289007517727265,
        0.08082445235761158,
        0.10416666666666667,
    ),
    "reinforce_pp": (dict(advantage=dict(kind="reinforce_pp", gamma=0.9)), 0.027391005654691342, 0.64344628981034, 0),
    "reinforce_pp_baseline": (dict(advantage="reinforce_pp_baseline"), -0.011425450254337534, 0.5447490926782761, 0),
    "gae": (  # gamma=0.95, gae_lambda=0.9, value_coef=0.3
        dict(advantage=dict(kind="gae", gamma=0.95, lam=0.9, value_coef=0.3)),
        0.032280214397894365,
        0.6154021130936401,
        0,
    ),
    "vtrace": (  # gamma=0.97, vtrace_rho_bar=0.9, vtrace_c_bar=0.8
        dict(
            advantage=dict(kind="vtrace", gamma=0.97, rho_bar=0.9, c_bar=0.8),
            policy_loss=dict(kind="vtrace", rho_bar=0.9),
        ),
        -0.18522118245539249,
        0.24941590769968072,
        0.2601207110551509,
    ),
    "ppo_dual": (  # clip_low=0.1, clip_high=0.28, dual_clip=3.0
        dict(policy_loss=dict(kind="ppo", clip_low=0.1, clip_high=0.28, dual_clip=3.0)),
        0.17020648195978566,
        0.5550488941452384,
        -0.14433723396484288,
    ),
    "decoupled": (  # tis_cap=1.05, tis_mode="mask"
        dict(policy_loss=dict(kind="decoupled_ppo", tis_cap=1.05, tis_mode="mask")),
        -0.060437002850792794,
        0.3753165115129312,
        -0.14433723396484288,
    ),
    "gspo": (  # clip_low=3e-4, clip_high=4e-4: now GSPO's own defaults
        dict(policy_loss="gspo", agg="seq-mean-token-mean"),
        0.010395992993160458,
        0.1947375339842593,
        -0.14433723396484288,
    ),
    "rpg_surrogate": (dict(policy_loss="rpg_surrogate"), 0.10543425882024021, 0.797447202595069, -0.14433723396484288),
    "rpg_reinforce": (  # rpg_clip=True, clip_low=0.1, dual_clip=2.0
        dict(policy_loss=dict(kind="rpg_reinforce", clip=True, clip_low=0.1, dual_clip=2.0)),
        0.16062027013096272,
        0.8603544234177565,
        -0.14433723396484288,
    ),
    "rpg_reinforce_noclip": (
        dict(policy_loss="rpg_reinforce"),
        0.10488286977038803,
        0.797447202595069,
        -0.14433723396484288,
    ),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_each_variant_gives_the_numbers_of_the_flat_config(name):
    kwargs, loss_want, grad_want, adv_want = PINNED[name]
    x = _batch()
    loss, d = compute_objective(ObjectiveConfig(**kwargs), x)
    loss.backward()
    assert loss.item() == pytest.approx(loss_want, rel=1e-12, abs=1e-15)
    assert x.learner_logprobs.grad.abs().sum().item() == pytest.approx(grad_want, rel=1e-12)
    assert d["adv_mean"] == pytest.approx(adv_want, rel=1e-9, abs=1e-15)


def test_pass_at_k_gives_the_numbers_of_the_flat_config():  # pass_k=2, binary rewards
    x = _batch(rewards=(1.0, 0.0, 1.0, 1.0, 0.0, 0.0))
    loss, _ = compute_objective(ObjectiveConfig(advantage={"kind": "pass_at_k", "k": 2}), x)
    loss.backward()
    assert loss.item() == pytest.approx(0.01785354240626528, rel=1e-12)
    assert x.learner_logprobs.grad.abs().sum().item() == pytest.approx(0.2647561087312599, rel=1e-12)


def test_every_registered_kind_is_covered_by_a_pinned_case():
    pinned_adv = {ObjectiveConfig(**kw).advantage.kind for kw, *_ in PINNED.values()} | {"pass_at_k"}
    pinned_pl = {ObjectiveConfig(**kw).policy_loss.kind for kw, *_ in PINNED.values()}
    assert pinned_adv == set(ADVANTAGES.kinds()) and pinned_pl == set(POLICY_LOSSES.kinds())


class _SignAdvantage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["toy_sign"] = Field("toy_sign", description="sign of (reward - 0.5) on every token")
    scale: float = Field(1.0, description="multiplies the sign")


class _LinearLoss(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["toy_linear"] = Field("toy_linear", description="-A * log pi, token mean")


@pytest.fixture
def toy_variants():
    @ADVANTAGES.register(_SignAdvantage, tags=("zero_on_uniform_groups",))
    def toy_sign(cfg, x):
        a = cfg.scale * torch.sign(x.token_rewards.sum(-1) - 0.5)
        return torch.where(x.mask, a[:, None].expand_as(x.token_rewards), 0.0), None

    @POLICY_LOSSES.register(_LinearLoss, requires=("proximal_logprobs",))
    def toy_linear(cfg, x):
        m = x.mask
        return -(torch.where(m, x.advantages * x.learner_logprobs, 0.0)).sum() / m.sum(), {"toy_seen": 1.0}

    yield
    ADVANTAGES.unregister("toy_sign")
    POLICY_LOSSES.unregister("toy_linear")


def test_a_new_variant_registered_in_one_place_runs_end_to_end(toy_variants):
    cfg = ObjectiveConfig(advantage={"kind": "toy_sign", "scale": 2.0}, policy_loss="toy_linear", kl_behaviour_coef=0.0)
    assert requires(cfg) == {"proximal_logprobs"} and not trains_value_head(cfg)
    x = _batch(rewards=(1.0, 0.0, 1.0, 1.0, 0.0, 0.0))
    loss, d = compute_objective(cfg, x)
    loss.backward()
    a = 2.0 * torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, -1.0], dtype=F64)[:, None] * x.mask
    n = x.mask.sum()
    assert loss.item() == pytest.approx(-(a * x.learner_logprobs.detach()).sum().item() / n.item())
    torch.testing.assert_close(x.learner_logprobs.grad, -a / n)
    assert d["toy_seen"] == 1.0 and d["adv_mean"] == pytest.approx(a.sum().item() / n.item())
    with pytest.raises(ValueError, match="proximal_logprobs"):  # what the loss declared is enforced
        compute_objective(
            cfg, ObjectiveInputs(x.learner_logprobs, x.behaviour_logprobs, x.mask, x.rewards, x.group_ids)
        )


def test_a_variant_shows_up_in_the_run_config_and_its_reference(toy_variants):
    from services.config_reference import render

    cfg = load_config(None, ["learner.objective.advantage=toy_sign", "learner.objective.advantage.scale=3"])
    assert cfg.learner.objective.advantage == _SignAdvantage(scale=3.0)
    assert "`learner.objective.advantage (kind: toy_sign).scale`" in render()


def test_bare_kind_means_that_variant_with_its_defaults():
    assert ObjectiveConfig(advantage="grpo", policy_loss="ppo") == ObjectiveConfig()
    assert ObjectiveConfig(advantage="grpo").advantage == GRPOAdvantage()
    assert ObjectiveConfig(policy_loss={"kind": "ppo"}).policy_loss == PPOLoss()
    dumped = ObjectiveConfig(advantage={"kind": "pass_at_k", "k": 2}).model_dump(mode="json")
    assert dumped["advantage"] == {"kind": "pass_at_k", "k": 2, "solved_at": 1.0}
    assert ObjectiveConfig.model_validate(dumped) == ObjectiveConfig(advantage={"kind": "pass_at_k", "k": 2})


@pytest.mark.parametrize(
    "flat, spelled",
    [
        (dict(grpo_scale_by_std=False), "advantage: {kind: grpo, scale_by_std: false}"),
        (dict(advantage="gae", gamma=1.0, gae_lambda=0.95), "advantage: {kind: gae, gamma: 1.0, lam: 0.95}"),
        (dict(advantage="pass_at_k", pass_k=8), "advantage: {kind: pass_at_k, k: 8}"),
        (dict(policy_loss="decoupled_ppo", tis_cap=2.0), "policy_loss: {kind: decoupled_ppo, tis_cap: 2.0}"),
        (dict(clip_high=0.28), "policy_loss: {kind: ppo, clip_high: 0.28}"),
        (dict(policy_loss="rpg_reinforce", rpg_clip=True), "policy_loss: {kind: rpg_reinforce, clip: true}"),
        (dict(vtrace_rho_bar=0.9), "advantage: {kind: vtrace, rho_bar: 0.9}; policy_loss: {kind: vtrace, rho_bar"),
    ],
)
def test_a_moved_flat_key_is_a_start_up_error_naming_the_new_spelling(flat, spelled):
    with pytest.raises(pydantic.ValidationError, match="moved into the variant's own config") as e:
        ObjectiveConfig(**flat)
    assert spelled in str(e.value)


def test_moved_key_in_a_run_config_fails_at_load_naming_the_field(tmp_path):
    p = tmp_path / "old.yaml"
    p.write_text("learner:\n  objective:\n    advantage: gae\n    gae_lambda: 0.95\n")
    with pytest.raises(ConfigError, match=r"learner\.objective.*gae_lambda.*advantage: \{kind: gae, lam: 0.95\}"):
        load_config(p)


@pytest.mark.parametrize(
    "value, message",
    [
        ("ppo", "unknown advantage estimator 'ppo' in objective.advantage; registered: grpo, dr_grpo"),
        ({"scale_by_std": False}, "must be a kind name or a mapping with `kind`"),
        ({"kind": "grpo", "k": 2}, "advantage.k\n  Extra inputs are not permitted"),
        ({"kind": "pass_at_k", "k": 0}, "advantage.k\n  Input should be greater than or equal to 1"),
    ],
)
def test_bad_variant_configs_say_what_is_wrong(value, message):
    with pytest.raises(pydantic.ValidationError) as e:
        ObjectiveConfig(advantage=value)
    assert message in str(e.value)


def test_cross_field_rules_still_hold_at_start_up():
    with pytest.raises(ConfigError, match="drop_uniform_groups"):
        load_config(None, ["rollout.drop_uniform_groups=true", "learner.objective.advantage=gae"])
    with pytest.raises(ConfigError, match="needs groups of at least 8 samples"):
        load_config(None, ["rollout.group_size=4", "learner.objective.advantage={kind: pass_at_k, k: 8}"])
    assert requires(ObjectiveConfig(policy_loss="decoupled_ppo")) == {"proximal_logprobs"}
    assert requires(ObjectiveConfig(advantage="gae")) == {"values"} and trains_value_head(
        ObjectiveConfig(advantage="gae")
    )
