"""`LearnerCore` with the kl_prev snapshot, the distillation teacher and Schedule-Free AdamW, on one real
DeepSpeed rank: the snapshot starts at the initial weights and follows the policy every `refresh_versions`
steps (and survives a checkpoint), a teacher equal to the student gives zero KL while a different tokenizer
is refused, and Schedule-Free's exported weights (publish, save, checkpoint) are its averaged x, not the y
the gradients are taken at.
"""

from __future__ import annotations

import pytest
import torch

from learner.config import LearnerConfig
from learner.diagnostics import REDUCTIONS
from tests.unit.learner.test_step import _batch as step_batch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("dist_env")]


def _batch(seed: int = 0):
    return step_batch(seed, groups=2)


def _core(model_dir, **kwargs):
    from learner.step import LearnerCore

    return LearnerCore(LearnerConfig(**{"lr": 1e-2, "zero_stage": 0, **kwargs}), model_dir, 0, 1)


def _params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_snapshot_starts_at_initial_weights_refreshes_every_n_and_survives_checkpoint(tiny_model_dir, tmp_path):
    core = _core(tiny_model_dir, objective={"kl_prev": {"coef": 0.1, "source": "snapshot", "refresh_versions": 2}})
    snap = core.frozen["prev_logprobs"]
    start = _params(core.policy_module)
    assert _same(start, _params(snap.model))
    d1 = core.train_step(_batch(1))
    assert d1["kl_prev"] == pytest.approx(0.0, abs=1e-6)  # first update: the snapshot is the policy
    assert not _same(start, _params(core.policy_module)) and _same(start, _params(snap.model))
    d2 = core.train_step(_batch(2))
    assert d2["kl_prev"] > 1e-6 and "snapshot_refresh_s" in d2  # refreshed after its 2nd version
    assert set(d2) <= set(REDUCTIONS), sorted(set(d2) - set(REDUCTIONS))
    refreshed = _params(snap.model)
    assert _same(_params(core.policy_module), refreshed)
    core.save_state(tmp_path)
    core.train_step(_batch(3))
    snap.load_from((n, torch.zeros_like(p)) for n, p in snap.model.named_parameters())
    core.load_state(tmp_path)
    assert _same(refreshed, _params(snap.model))


def test_previous_source_anchors_to_the_batch_start(tiny_model_dir):
    core = _core(tiny_model_dir, updates_per_batch=2, objective={"kl_prev": {"coef": 0.1}})
    d = core.train_step(_batch(1))
    assert d["updates_applied"] == 2 and d["kl_prev"] > 0  # second update moved away from the anchor


def test_teacher_equal_to_student_gives_zero_kl_and_other_tokenizers_are_refused(tiny_model_dir, bpe_model_dir):
    teacher = {"coef": 1.0, "placement": "loss"}
    core = _core(tiny_model_dir, teacher={"path": str(tiny_model_dir)}, objective={"kl_teacher": teacher})
    d = core.train_step(_batch(1))
    assert d["kl_teacher"] == pytest.approx(0.0, abs=1e-6) and d["reference_s"] > 0
    assert set(d) <= set(REDUCTIONS), sorted(set(d) - set(REDUCTIONS))
    with pytest.raises(ValueError, match="different tokenizer"):
        _core(tiny_model_dir, teacher={"path": str(bpe_model_dir)}, objective={"kl_teacher": teacher})


def test_schedule_free_exports_its_averaged_weights(tiny_model_dir, tmp_path):
    core = _core(tiny_model_dir, optimizer="schedule_free_adamw", lr=3e-2)
    for seed in range(3):
        assert core.train_step(_batch(seed))["updates_applied"] == 1
    opt = core.optimizer
    y = _params(core.policy_module)
    beta1 = opt.param_groups[0]["betas"][0]
    named = dict(core.policy_module.named_parameters())
    # x = y + (1 - 1/beta1) (z - y): Schedule-Free's averaged iterate, computed here by hand
    x = {n: y[n] + (1 - 1 / beta1) * (opt.state[named[n]]["z"] - y[n]) for n in y}
    assert max(float((x[n] - y[n]).abs().max()) for n in y) > 1e-4  # the two sets really differ
    published = dict(core.named_weights())
    assert all(torch.allclose(published[n], x[n], atol=1e-6) for n in x)
    back = _params(core.policy_module)  # back to y after export (the lerp round trip is exact to rounding)
    assert all(torch.allclose(back[n], y[n], atol=1e-6) for n in y) and opt.param_groups[0]["train_mode"]
    saved = core.save(tmp_path / "model", tiny_model_dir)
    from safetensors.torch import load_file

    on_disk = load_file(str(saved / "model.safetensors"))
    assert all(torch.allclose(on_disk[n], x[n], atol=1e-6) for n in x if n in on_disk)
    core.save_state(tmp_path / "ckpt")
    core.train_step(_batch(7))
    core.load_state(tmp_path / "ckpt")
    assert opt.param_groups[0]["train_mode"]
    assert all(torch.allclose(p, y[n], atol=1e-6) for n, p in core.policy_module.named_parameters())


def test_schedule_free_is_refused_only_with_fp16():
    with pytest.raises(ValueError, match="precision='fp16'"):
        LearnerConfig(optimizer="schedule_free_adamw", zero_stage=1, precision="fp16")
    for stage in (0, 1, 2, 3):  # ZeRO-1/2/3 and bf16 master weights: tests/integration/test_schedule_free_zero.py
        LearnerConfig(optimizer="schedule_free_adamw", zero_stage=stage)
        if stage:
            LearnerConfig(optimizer="schedule_free_adamw", zero_stage=stage, precision="bf16")
    LearnerConfig(optimizer="schedule_free_adamw", zero_stage=0, precision="bf16", mixed_precision="autocast")
