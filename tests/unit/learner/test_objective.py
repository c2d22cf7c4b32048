"""compute_objective end to end: defaults, validation, hand values, masking and group invariances."""

from __future__ import annotations

import dataclasses
import math

import pydantic
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner import advantages as A
from learner.objective import ObjectiveConfig, ObjectiveInputs, compute_objective, requires

F64 = torch.float64


def _batch(seed=0, b=6, t=5, drift=0.1, **extra) -> ObjectiveInputs:
    g = torch.Generator().manual_seed(seed)
    mu = -torch.rand(b, t, generator=g, dtype=F64) - 0.05
    lp = (mu + drift * torch.randn(b, t, generator=g, dtype=F64)).requires_grad_()
    mask = torch.ones(b, t, dtype=F64)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=F64)[:b]
    gids = torch.tensor([3, 3, 3, 7, 7, 7])[:b]
    return ObjectiveInputs(lp, mu, mask, rewards, gids, **extra)


def test_defaults_are_the_documented_ones():
    c = ObjectiveConfig()
    adv, pl = c.advantage, c.policy_loss
    assert (adv.kind, adv.scale_by_std, pl.kind, pl.clip_low, pl.clip_high, c.agg) == (
        "grpo",
        True,
        "ppo",
        0.2,
        0.2,
        "token-mean",
    )
    assert (c.kl_behaviour_coef, c.kl_behaviour_estimator, c.kl_behaviour_in, c.kl_ref_coef) == (
        0.01,
        "k3",
        "loss",
        0.0,
    )
    assert requires(c) == set()


def test_config_is_frozen_and_forbids_unknown_fields():
    with pytest.raises(pydantic.ValidationError, match="extra"):
        ObjectiveConfig(clip_ratio=0.2)
    with pytest.raises(pydantic.ValidationError):
        ObjectiveConfig().agg = "seq-mean-token-mean"
    with pytest.raises(pydantic.ValidationError):
        ObjectiveConfig().policy_loss.clip_low = 0.3
    with pytest.raises(pydantic.ValidationError, match="advantage"):
        ObjectiveConfig(advantage="ppo")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(advantage="dr_grpo"), "objective.agg"),
        (dict(agg="seq-mean-token-sum-norm"), "objective.agg_norm_tokens"),
        (dict(policy_loss=dict(kind="ppo", tis_cap=2.0)), "policy_loss.tis_cap"),  # only decoupled_ppo has it
        (dict(policy_loss=dict(kind="vtrace", dual_clip=3.0)), "policy_loss.dual_clip"),
        (dict(policy_loss=dict(kind="ppo", dual_clip=1.1)), "dual_clip=1.1 must exceed"),
        (dict(policy_loss=dict(kind="ppo", clip=True)), "policy_loss.clip"),
        (dict(advantage="pass_at_k", kl_behaviour_in="reward"), "kl_behaviour_in"),
        (dict(advantage="best_of_group", kl_ref_coef=0.1, kl_ref_in="reward"), "kl_ref_in"),
        (dict(kl_ref_target=0.5), "objective.kl_ref_target adapts kl_ref_coef"),  # from 0: nothing to adapt
    ],
)
def test_cross_field_validation_names_the_field(kwargs, field):
    with pytest.raises(pydantic.ValidationError, match=field.replace(".", r"\.")):
        ObjectiveConfig(**kwargs)


def test_requires_lists_what_each_choice_needs():
    cfg = ObjectiveConfig(advantage="gae", policy_loss="decoupled_ppo", kl_ref_coef=0.1, entropy_coef=0.01)
    assert requires(ObjectiveConfig(advantage="vtrace", policy_loss="vtrace")) == {"values"}
    assert requires(cfg) == {"values", "proximal_logprobs", "ref_logprobs", "entropy"}


def test_missing_required_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\['ref_logprobs'\]"):
        compute_objective(ObjectiveConfig(kl_ref_coef=0.1), _batch())
    bad = _batch()
    bad.rewards = bad.rewards[:3]
    with pytest.raises(ValueError, match="rewards has shape"):
        compute_objective(ObjectiveConfig(), bad)
    empty = _batch()
    empty.mask[1] = 0
    with pytest.raises(ValueError, match=r"mask rows \[1\]"):
        compute_objective(ObjectiveConfig(), empty)


def test_on_policy_default_loss_and_gradient_by_hand():
    x = _batch(drift=0.0)
    loss, d = compute_objective(ObjectiveConfig(), x)
    # GRPO, group [1, 0, 1]: mean 2/3, unbiased std sqrt(1/3); group [1, 0, 0]: mean 1/3, same std.
    s = math.sqrt(1 / 3) + 1e-6
    a = torch.tensor([1 / 3, -2 / 3, 1 / 3, 2 / 3, -1 / 3, -1 / 3], dtype=F64) / s
    n_tok = x.mask.sum()
    expected = -(a[:, None] * x.mask).sum() / n_tok  # ratio 1: no clip; k3 KL(mu||pi) = 0 with zero gradient
    assert loss.item() == pytest.approx(expected.item())
    assert d["kl_behaviour"] == 0.0 and d["clip_frac_high"] == 0.0 and d["ess_token"] == pytest.approx(1.0)
    assert d["masked_token_frac"] == pytest.approx(1 - n_tok.item() / 30)
    loss.backward()
    torch.testing.assert_close(x.learner_logprobs.grad, -(a[:, None] * x.mask) / n_tok)


def test_behaviour_kl_adds_coef_times_k3_by_hand():
    mu = torch.tensor([[-1.0]], dtype=F64)
    x = ObjectiveInputs(
        (mu + 0.5).requires_grad_(), mu, torch.ones(1, 1), torch.ones(1, dtype=F64), torch.zeros(1, dtype=torch.long)
    )
    loss, d = compute_objective(ObjectiveConfig(kl_behaviour_coef=0.1), x)  # singleton group: advantage 0
    k3 = math.exp(0.5) - 0.5 - 1  # forward UKL(mu||pi) per token: pi/mu - 1 - log(pi/mu)
    assert d["kl_behaviour"] == pytest.approx(k3) and loss.item() == pytest.approx(0.1 * k3)
    assert d["kl_loss"] == pytest.approx(0.1 * k3) and d["pg_loss"] == 0.0


@pytest.mark.parametrize(
    "cfg, adv_fn",
    [
        (dict(advantage=dict(kind="pass_at_k", k=2)), lambda r, g: A.pass_at_k_advantages(r, g, 2)),
        (dict(advantage="best_of_group"), lambda r, g: A.best_of_group_advantages(r, g, True, 1e-6)),
        (
            dict(advantage=dict(kind="best_of_group", scale_by_std=False)),
            lambda r, g: A.best_of_group_advantages(r, g, False),
        ),
    ],
)
def test_pass_at_k_estimators_feed_the_policy_gradient(cfg, adv_fn):
    x = _batch(drift=0.0)
    loss, d = compute_objective(ObjectiveConfig(kl_behaviour_coef=0.0, **cfg), x)
    a = adv_fn(x.rewards, x.group_ids)
    assert torch.count_nonzero(a) > 0  # the hand batch has signal under each estimator
    loss.backward()  # on-policy PPO: d loss / d logprob = -A / n_tokens on every response token
    torch.testing.assert_close(x.learner_logprobs.grad, -(a[:, None] * x.mask) / x.mask.sum())
    assert d["adv_mean"] == pytest.approx((a[:, None] * x.mask).sum().item() / x.mask.sum().item())


def test_padding_garbage_does_not_change_anything():
    cfg = ObjectiveConfig(kl_ref_coef=0.05, entropy_coef=0.01, advantage="reinforce_pp_baseline")
    results = []
    for fill in (0.0, float("nan")):
        x = _batch(
            ref_logprobs=torch.zeros(6, 5, dtype=F64) - 1.0,
            entropy=torch.full((6, 5), 0.7, dtype=F64),
            token_rewards=torch.full((6, 5), 0.1, dtype=F64),
        )
        pad = x.mask == 0
        for name in ("behaviour_logprobs", "ref_logprobs", "entropy", "token_rewards"):
            setattr(x, name, torch.where(pad, fill, getattr(x, name)))
        x.learner_logprobs = torch.where(pad, fill, x.learner_logprobs.detach()).requires_grad_()
        loss, d = compute_objective(cfg, x)
        loss.backward()
        results.append((loss.detach(), x.learner_logprobs.grad, d))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert results[0][2] == results[1][2]


def test_group_permutation_and_relabelling_invariance():
    x = _batch()
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    y = ObjectiveInputs(
        x.learner_logprobs.detach()[perm].requires_grad_(),
        x.behaviour_logprobs[perm],
        x.mask[perm],
        x.rewards[perm],
        (x.group_ids * 1000 - 5)[perm],
    )
    lx, dx = compute_objective(ObjectiveConfig(), x)
    ly, dy = compute_objective(ObjectiveConfig(), y)
    lx.backward()
    ly.backward()
    assert lx.item() == pytest.approx(ly.item())
    torch.testing.assert_close(x.learner_logprobs.grad[perm], y.learner_logprobs.grad)


def test_zero_variance_groups_are_filtered_from_the_loss():
    x = _batch()
    x.rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0], dtype=F64)  # group 3 has no signal
    loss, d = compute_objective(ObjectiveConfig(filter_zero_variance_groups=True), x)
    loss.backward()
    assert torch.all(x.learner_logprobs.grad[:3] == 0) and torch.any(x.learner_logprobs.grad[3:] != 0)
    assert d["filtered_token_frac"] == pytest.approx(x.mask[:3].sum().item() / x.mask.sum().item())


def test_kl_in_reward_shapes_advantages_not_loss():
    x = _batch(drift=0.3)
    _, in_loss = compute_objective(ObjectiveConfig(kl_behaviour_coef=0.5), x)
    _, in_reward = compute_objective(ObjectiveConfig(kl_behaviour_coef=0.5, kl_behaviour_in="reward"), x)
    assert in_loss["kl_behaviour"] == pytest.approx(in_reward["kl_behaviour"])
    assert in_loss["adv_mean"] != pytest.approx(in_reward["adv_mean"])  # shaped rewards moved the advantages


def test_decoupled_with_proximal_equal_behaviour_matches_coupled_ppo():
    x = _batch(drift=0.3)
    coupled, _ = compute_objective(ObjectiveConfig(), x)
    x.proximal_logprobs = x.behaviour_logprobs.clone()
    decoupled, d = compute_objective(ObjectiveConfig(policy_loss={"kind": "decoupled_ppo", "tis_cap": 2.0}), x)
    assert coupled.item() == pytest.approx(decoupled.item()) and d["behaviour_weight_mean"] == pytest.approx(1.0)


def test_gae_value_loss_trains_the_value_head():
    x = _batch(values=torch.full((6, 5), 0.2, dtype=F64, requires_grad=True))
    loss, d = compute_objective(ObjectiveConfig(advantage={"kind": "gae", "gamma": 1.0, "lam": 1.0}), x)
    loss.backward()
    assert d["value_loss"] > 0 and torch.any(x.values.grad != 0)
    assert torch.all(x.values.grad[x.mask == 0] == 0)


def test_rpg_reinforce_matches_rpg_surrogate_gradient_through_the_objective():
    base = _batch(drift=0.3, ref_logprobs=torch.full((6, 5), -0.6, dtype=F64))
    grads = []
    for name in ("rpg_surrogate", "rpg_reinforce"):
        x = _batch(drift=0.3, ref_logprobs=base.ref_logprobs)
        loss, _ = compute_objective(ObjectiveConfig(policy_loss=name, kl_ref_coef=0.2, kl_behaviour_coef=0.3), x)
        loss.backward()
        grads.append(x.learner_logprobs.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(policy_loss="gspo", agg="seq-mean-token-mean"),
        dict(policy_loss="vtrace"),
        dict(advantage="rloo", agg="seq-mean-token-sum"),
        dict(advantage="dr_grpo", agg="seq-mean-token-sum-norm", agg_norm_tokens=8),
        dict(advantage=dict(kind="reinforce_pp", gamma=0.99)),
        dict(policy_loss=dict(kind="rpg_reinforce", clip=True, dual_clip=3.0)),
        dict(advantage="vtrace", policy_loss="vtrace", kl_ref_coef=0.1, kl_ref_in="reward"),
        dict(advantage=dict(kind="pass_at_k", k=2)),
        dict(advantage=dict(kind="best_of_group", scale_by_std=False)),
    ],
)
def test_every_variant_runs_and_gives_finite_loss_and_gradient(kwargs):
    x = _batch(
        drift=0.3,
        values=torch.zeros(6, 5, dtype=F64, requires_grad=True),
        ref_logprobs=torch.full((6, 5), -0.5, dtype=F64),
    )
    loss, d = compute_objective(ObjectiveConfig(**kwargs), x)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(x.learner_logprobs.grad).all()
    assert all(math.isfinite(v) for v in d.values())


def test_all_groups_filtered_gives_zero_loss_that_still_backpropagates():
    x = _batch()
    x.rewards = torch.ones(6, dtype=F64)
    loss, d = compute_objective(ObjectiveConfig(filter_zero_variance_groups=True, kl_behaviour_coef=0.0), x)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x.learner_logprobs.grad == 0)
    assert d["filtered_token_frac"] == 1.0 and math.isnan(d["ratio_max"])  # no data, not a fake 1.0


def test_bf16_inputs_are_upcast_and_gradient_reaches_the_bf16_leaf():
    x = _batch(drift=0.2)
    ref, _ = compute_objective(ObjectiveConfig(), _batch(drift=0.2))
    x.learner_logprobs = x.learner_logprobs.detach().to(torch.bfloat16).requires_grad_()
    x.behaviour_logprobs = x.behaviour_logprobs.to(torch.bfloat16)
    loss, _ = compute_objective(ObjectiveConfig(), x)
    loss.backward()
    assert loss.dtype == torch.float32 and x.learner_logprobs.grad.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(ref.item(), abs=0.05)  # only the bf16 rounding of the inputs differs


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(policy_loss="rpg_surrogate", kl_ref_coef=0.3),
        dict(policy_loss="decoupled_ppo", kl_behaviour_direction="reverse"),
    ],
)
def test_gradcheck_whole_objective_float64(kwargs):
    base = _batch(drift=0.05, ref_logprobs=torch.full((6, 5), -0.5, dtype=F64))
    base.proximal_logprobs = base.behaviour_logprobs + 0.01
    cfg = ObjectiveConfig(**kwargs)

    def f(lp):
        return compute_objective(cfg, dataclasses.replace(base, learner_logprobs=lp))[0]

    assert torch.autograd.gradcheck(f, (base.learner_logprobs.detach().clone().requires_grad_(),))


@settings(max_examples=15, deadline=None)
@given(
    st.integers(0, 10_000),
    st.sampled_from(
        [
            dict(),
            dict(advantage="rloo", agg="seq-mean-token-mean"),
            dict(advantage="gae", kl_behaviour_in="reward"),
            dict(policy_loss="gspo"),
            dict(policy_loss=dict(kind="rpg_reinforce", clip=True), kl_ref_coef=0.1),
        ]
    ),
)
def test_random_masks_padding_never_read(seed, kwargs):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(6, 5, generator=g) < 0.6).to(F64)
    mask[:, torch.randint(0, 5, (1,), generator=g)] = 1
    outs = []
    for fill in (0.0, float("nan")):
        x = _batch(
            seed=seed,
            drift=0.3,
            values=torch.full((6, 5), 0.1, dtype=F64),
            ref_logprobs=torch.full((6, 5), -0.5, dtype=F64),
        )
        x.mask = mask
        for name in ("behaviour_logprobs", "values", "ref_logprobs"):
            setattr(x, name, torch.where(mask == 0, fill, getattr(x, name)))
        x.learner_logprobs = torch.where(mask == 0, fill, x.learner_logprobs.detach()).requires_grad_()
        loss, d = compute_objective(ObjectiveConfig(**kwargs), x)
        loss.backward()
        outs.append((loss.detach(), x.learner_logprobs.grad, d))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]) and outs[0][2] == outs[1][2]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(agg="token-mean"),
        dict(agg="seq-mean-token-mean"),
        dict(agg="seq-mean-token-sum", entropy_coef=0.05),
        dict(agg="seq-mean-token-sum-norm", agg_norm_tokens=7, advantage="dr_grpo"),
        dict(agg="token-mean", advantage="gae", policy_loss="decoupled_ppo", kl_ref_coef=0.1),
        dict(agg="seq-mean-token-mean", filter_zero_variance_groups=True),
    ],
)
def test_parts_with_the_whole_denominator_add_up_to_the_whole_batch_gradient(kwargs):
    # what the learner's micro-batches do: targets from the whole batch, each part's loss over the summed
    # denominator; the parts' gradients must add up to the whole batch's (float64, atol 1e-12)
    from learner.losses import agg_denominator
    from learner.objective import compute_targets, objective_loss

    cfg = ObjectiveConfig(**kwargs)
    g = torch.Generator().manual_seed(3)
    extra = dict(
        ref_logprobs=-torch.rand(6, 5, generator=g, dtype=F64),
        proximal_logprobs=-torch.rand(6, 5, generator=g, dtype=F64),
        entropy=torch.rand(6, 5, generator=g, dtype=F64).requires_grad_(),
        values=torch.rand(6, 5, generator=g, dtype=F64).requires_grad_(),
    )
    whole = _batch(drift=0.3, **extra)
    whole.rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0], dtype=F64)  # group 7 has no spread
    loss, _ = compute_objective(cfg, whole)
    want = torch.autograd.grad(loss, [whole.learner_logprobs, whole.entropy, whole.values], allow_unused=True)

    targets = compute_targets(cfg, whole)
    parts = [torch.tensor([0, 4]), torch.tensor([1]), torch.tensor([2, 3, 5])]
    denominator = sum(agg_denominator(targets.select(r, 5).loss_mask, cfg.agg, cfg.agg_norm_tokens) for r in parts)
    leaves = [whole.learner_logprobs, whole.entropy, whole.values]
    got = [torch.zeros_like(t) for t in leaves]
    for rows in parts:
        part = ObjectiveInputs(
            **{
                f.name: (getattr(whole, f.name)[rows] if getattr(whole, f.name) is not None else None)
                for f in dataclasses.fields(whole)
            }
        )
        part_loss, _ = objective_loss(cfg, part, targets.select(rows, 5), denominator)
        for acc, g_part in zip(got, torch.autograd.grad(part_loss, leaves, allow_unused=True)):
            if g_part is not None:
                acc += g_part
    for w, g_sum in zip(want, got):
        torch.testing.assert_close(g_sum, torch.zeros_like(g_sum) if w is None else w, atol=1e-12, rtol=0)


def test_entropy_bonus_gradient_is_minus_coef_times_the_aggregated_entropy_gradient():
    entropy = torch.rand(6, 5, dtype=F64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    x = _batch(entropy=entropy)
    loss_with, _ = compute_objective(ObjectiveConfig(entropy_coef=0.2), x)
    (g,) = torch.autograd.grad(loss_with, [entropy])
    m = x.mask.bool()
    torch.testing.assert_close(g, torch.where(m, -0.2 / m.sum(), 0.0).to(F64))
