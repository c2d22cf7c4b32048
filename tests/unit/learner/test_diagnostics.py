"""`learner.diagnostics`: each key's declared reduction, applied by hand-computed cases; every key the
objective emits (over its variants) is declared."""

from __future__ import annotations

import math

import pytest
import torch

from learner.diagnostics import REDUCTIONS, reduce_diagnostics, reduction
from learner.objective import ObjectiveConfig, ObjectiveInputs, compute_objective


def test_reductions_by_hand():
    parts = [
        {"tokens": 10.0, "loss": 1.0, "ratio_min": 0.8, "ratio_max": 1.1, "sequences": 4.0, "step_s": 2.0},
        {"tokens": 30.0, "loss": 3.0, "ratio_min": 0.9, "ratio_max": 1.5, "sequences": 6.0, "step_s": 3.0},
    ]
    out = reduce_diagnostics(parts)
    assert out["loss"] == pytest.approx((10 * 1.0 + 30 * 3.0) / 40)  # token-weighted mean
    assert out["ratio_min"] == 0.8 and out["ratio_max"] == 1.5
    assert out["tokens"] == 40.0 and out["sequences"] == 10.0
    assert out["step_s"] == 3.0  # the slowest rank sets the step's time


def test_nan_means_no_data_and_is_skipped_unless_everywhere():
    parts = [{"tokens": 5.0, "ratio_min": float("nan")}, {"tokens": 5.0, "ratio_min": 0.7}]
    assert reduce_diagnostics(parts)["ratio_min"] == 0.7
    assert math.isnan(reduce_diagnostics([{"tokens": 1.0, "ratio_min": float("nan")}])["ratio_min"])


def test_undeclared_keys_fall_back_to_their_suffix():
    assert reduction("new_thing_max") == "max" and reduction("x_min") == "min" and reduction("y_count") == "sum"
    assert reduction("brand_new") == "mean"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(policy_loss=dict(kind="decoupled_ppo", tis_cap=2.0)),
        dict(policy_loss="gspo", agg="seq-mean-token-mean"),
        dict(policy_loss="vtrace", advantage="vtrace"),
        dict(policy_loss=dict(kind="rpg_reinforce", clip=True), kl_ref_coef=0.1),
        dict(policy_loss="rpg_surrogate"),
        dict(advantage="gae", entropy_coef=0.01, policy_loss=dict(kind="ppo", dual_clip=3.0)),
    ],
)
def test_every_objective_diagnostic_is_declared(kwargs):
    g = torch.Generator().manual_seed(0)
    mu = -torch.rand(4, 3, generator=g) - 0.1
    x = ObjectiveInputs(
        learner_logprobs=mu + 0.1,
        behaviour_logprobs=mu,
        mask=torch.ones(4, 3),
        rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]),
        group_ids=torch.tensor([0, 0, 1, 1]),
        ref_logprobs=mu - 0.1,
        proximal_logprobs=mu + 0.05,
        values=torch.zeros(4, 3),
        entropy=torch.ones(4, 3),
    )
    _, diag = compute_objective(ObjectiveConfig(**kwargs), x)
    assert set(diag) <= set(REDUCTIONS), sorted(set(diag) - set(REDUCTIONS))


def test_step_record_declares_each_reduction_and_reads_as_the_metric_names():
    from learner.diagnostics import StepDiagnostics, reduce_step_diagnostics

    ranks = [
        StepDiagnostics.from_mapping({"tokens": 10.0, "loss": 1.0, "ratio_min": 0.8, "step_s": 2.0, "toy_max": 1.0}),
        StepDiagnostics(tokens=30.0, loss=3.0, ratio_min=0.9, step_s=3.0, skipped_nonfinite=0.0),
    ]
    merged = reduce_step_diagnostics(ranks)
    assert (merged.loss, merged.ratio_min, merged.tokens, merged.step_s) == (pytest.approx(2.5), 0.8, 40.0, 3.0)
    assert merged.extra == {"toy_max": 1.0} and merged["toy_max"] == 1.0  # a variant's key, reduced by suffix
    assert merged.kl_ref is None and "kl_ref" not in merged and merged.get("kl_ref") is None
    want = {"loss": 2.5, "ratio_min": 0.8, "tokens": 40.0, "step_s": 3.0, "skipped_nonfinite": 0.0, "toy_max": 1.0}
    assert dict(merged) == want
    with pytest.raises(KeyError):
        merged["kl_ref"]
    assert REDUCTIONS["skipped_nonfinite"] == "max" and REDUCTIONS["tokens"] == "sum" and len(REDUCTIONS) == 50
