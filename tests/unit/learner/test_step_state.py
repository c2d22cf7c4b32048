"""`LearnerCore` on one real DeepSpeed rank: NaN/inf steps are skipped without touching the weights or
the optimiser, and `save_state` / `load_state` restore weights, optimiser, scheduler, step and RNG."""

from __future__ import annotations

import math
import random

import pytest
import torch

from learner.config import LearnerConfig
from replay.schema import Trace, traces_to_batch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("dist_env")]


def _batch(reward: float = 1.0, seed: int = 0):
    rng = random.Random(seed)
    traces = []
    for g in range(2):
        for i in range(4):
            completion = tuple(rng.randint(3, 15) for _ in range(3))
            traces.append(
                Trace(
                    group_id=f"g{seed}-{g}",
                    prompt_ids=(1, 5, 6, 7),
                    completion_ids=completion,
                    behaviour_logprobs=(-1.0, -1.0, -1.0),
                    reward=reward if i == 0 else float(i % 2),
                    policy_version=0,
                )
            )
    return traces_to_batch(traces)


def _core(model_dir, zero_stage: int):
    from learner.step import LearnerCore

    return LearnerCore(LearnerConfig(zero_stage=zero_stage, lr=1e-3, warmup_steps=3), model_dir, 0, 1)


def _weights(core) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in core.engine.module.named_parameters()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_nan_loss_step_is_skipped_and_changes_nothing(tiny_model_dir, zero_stage):
    core = _core(tiny_model_dir, zero_stage)
    core.train_step(_batch(seed=1))
    before, lr_before = _weights(core), core.optimizer.param_groups[0]["lr"]
    diag = core.train_step(_batch(reward=float("nan"), seed=2))  # NaN reward -> NaN advantages -> NaN loss
    assert diag["skipped_nonfinite"] == 1.0 and diag["nonfinite_in_gradient"] == 0.0 and math.isnan(diag["loss"])
    assert _same(before, _weights(core)) and core.steps == 1
    assert core.optimizer.param_groups[0]["lr"] == lr_before  # the scheduler did not advance
    diag = core.train_step(_batch(seed=3))  # the engine is still usable and trains
    assert diag["skipped_nonfinite"] == 0.0 and core.steps == 2
    assert not _same(before, _weights(core))


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_nan_gradient_with_finite_loss_is_skipped(tiny_model_dir, zero_stage):
    core = _core(tiny_model_dir, zero_stage)
    before = _weights(core)
    param = next(core.engine.module.parameters())
    handle = param.register_hook(lambda g: g * float("nan"))
    diag = core.train_step(_batch(seed=4))
    handle.remove()
    assert diag["skipped_nonfinite"] == 1.0 and diag["nonfinite_in_gradient"] == 1.0 and math.isfinite(diag["loss"])
    assert _same(before, _weights(core)) and core.steps == 0
    assert core.train_step(_batch(seed=5))["skipped_nonfinite"] == 0.0
    assert all(torch.isfinite(w).all() for w in _weights(core).values())


def test_save_and_load_state_restore_weights_optimiser_step_and_rng(tiny_model_dir, tmp_path):
    core = _core(tiny_model_dir, 1)
    for seed in range(2):
        core.train_step(_batch(seed=seed))
    core.save_state(tmp_path)
    saved, lr_saved = _weights(core), core.optimizer.param_groups[0]["lr"]
    draws = (random.random(), torch.rand(3))
    after_one = (core.train_step(_batch(seed=9)), _weights(core))

    fresh = _core(tiny_model_dir, 1)
    assert fresh.load_state(tmp_path) == 2 and fresh.steps == 2
    assert _same(saved, _weights(fresh)) and fresh.optimizer.param_groups[0]["lr"] == lr_saved
    assert random.random() == draws[0] and torch.equal(torch.rand(3), draws[1])  # RNG continues where it was saved
    diag = fresh.train_step(_batch(seed=9))  # same optimiser moments -> the same next step, bit for bit
    assert _same(after_one[1], _weights(fresh)) and diag["loss"] == after_one[0]["loss"]


def test_adaptive_kl_coefficient_moves_with_the_measured_kl_is_used_in_the_loss_and_resumes(tiny_model_dir, tmp_path):
    from learner.kl import adaptive_kl_coef
    from learner.step import LearnerCore

    objective = {"kl_behaviour_coef": 0.0, "kl_ref_coef": 0.1, "kl_ref_target": 1e-4, "kl_ref_horizon": 16}
    cfg = LearnerConfig(lr=1e-2, objective=objective)
    core = LearnerCore(cfg, tiny_model_dir, 0, 1)
    diags = [core.train_step(_batch(seed=s)) for s in range(4)]
    coef = 0.1
    for d in diags:  # each step used the coefficient the previous step's KL set (8 sequences: n / horizon = 0.5)
        assert d["kl_ref_coef"] == pytest.approx(coef, rel=1e-12)
        assert d["kl_loss"] == pytest.approx(coef * d["kl_ref"], rel=1e-5)  # ... in the loss, not only the log
        coef = adaptive_kl_coef(coef, d["kl_ref"], 1e-4, 8, 16)
    assert diags[0]["kl_ref"] == pytest.approx(0.0, abs=1e-7)  # the policy is the reference: the coef falls 10%
    assert diags[1]["kl_ref_coef"] == pytest.approx(0.09) and diags[-1]["kl_ref_coef"] > diags[1]["kl_ref_coef"]
    assert core.kl_ref_coef == pytest.approx(coef, rel=1e-12)
    core.save_state(tmp_path)
    fresh = LearnerCore(cfg, tiny_model_dir, 0, 1)
    fresh.load_state(tmp_path)
    assert fresh.kl_ref_coef == core.kl_ref_coef != 0.1


def _uneven_batch():
    """Two groups whose completions differ in length, so GRPO's token-mean policy loss is not 0."""
    traces = []
    for g in range(2):
        for i in range(4):
            n = 2 + i + g
            traces.append(
                Trace(
                    group_id=f"w{g}",
                    prompt_ids=(1, 5, 6, 7),
                    completion_ids=tuple(3 + (i + k) % 12 for k in range(n)),
                    behaviour_logprobs=(-1.0,) * n,
                    reward=float(i % 2),
                    policy_version=0,
                )
            )
    return traces_to_batch(traces)


def test_replay_weights_change_the_loss_and_priorities_move_replay(tiny_model_dir):
    from learner.step import LearnerCore
    from replay.config import ReplayConfig
    from replay.table import ReplayTable

    core = LearnerCore(LearnerConfig(lr=1e-12), tiny_model_dir, 0, 1)  # lr ~0: the policy stays put between calls
    batch = _uneven_batch()
    full = core.train_step(batch)
    per = core.train_step(batch, (0.5, 0.5))  # prioritized replay's importance weights
    assert abs(full["pg_loss"]) > 1e-4 and per["pg_loss"] == pytest.approx(0.5 * full["pg_loss"], rel=1e-4)
    stale = core.train_step(batch, (1.0, 0.125))  # downweight: group w1 three versions past max_staleness
    assert stale["sample_weight_mean"] == pytest.approx((4 * 1.0 + 4 * 0.125) / 8)
    assert abs(stale["pg_loss"] - full["pg_loss"]) > 1e-5 and abs(stale["pg_loss"] - per["pg_loss"]) > 1e-5

    gids, priorities = core.last_priorities
    assert gids == ("w0", "w1") and all(p > 0 for p in priorities)
    table = ReplayTable(ReplayConfig(sampler="prioritized", max_times_sampled=None))
    table.insert(batch)
    before = [g.priority for g in table._groups.values()]
    assert table.update_priorities(list(gids), list(priorities)) == 2
    after = [g.priority for g in table._groups.values()]
    assert after == pytest.approx(list(priorities)) and after != pytest.approx(before)
