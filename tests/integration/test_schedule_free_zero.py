"""Schedule-Free AdamW under DeepSpeed ZeRO-1/2/3 and bf16 master weights, on 2 real ranks (gloo, CPU processes).

Each case runs `LearnerCore` on 2 ranks: 2 steps, each followed by a publish (`named_weights`), a checkpoint,
2 more steps, then the checkpoint is loaded and the same 2 steps are taken again. The reference is one process
at ZeRO-0 in fp32, where DeepSpeed hands `schedulefree.AdamWScheduleFree` (clipping subclass) the model's own
parameters, trained on both ranks' groups together (the learner's update equals the whole-batch update).

Checked: the published weights are Schedule-Free's x, both against x = y + (1 - 1/beta1)(z - y) from the run's
own fp32 master y and z (fp32: |diff| <= 1e-6; bf16: within one bf16 rounding, rel 2^-8) and, in fp32, against
the reference's x (`_close_to_reference`: summation order and DeepSpeed's clipping arithmetic differ); after a
publish the model holds y again (equal to its master copy, bit for bit) and the master y moved by at most fp32
rounding of the lerp round trip (1e-6); the later steps' y equal the reference's (same tolerance); a resume from the
checkpoint continues bit for bit. bf16 gradients differ from fp32 ones, so the bf16 case is compared with the
fp32 reference only loosely (its x is much closer to the reference's x than to the starting weights).
"""

from __future__ import annotations

import os
import socket

import pyarrow as pa
import pytest
import torch
import torch.multiprocessing as mp

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LR, CLIP, STEPS = 2e-2, 0.5, 4  # a checkpoint after step 2 of 4; clipping is active (gradient norms > 0.5)


def _batch(step: int, rank: int):
    from tests.unit.learner.test_step import _batch as step_batch

    return step_batch(100 * step + rank, groups=2)


def _full_master(core, with_z: bool = False) -> tuple[dict, dict | None]:
    """Every policy parameter's fp32 master y (and Schedule-Free's z), whole (collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    named = list(core.policy_module.named_parameters())
    if core.cfg.zero_stage == 0:
        state = core.optimizer.state
        return {n: p.detach().float().clone() for n, p in named}, {n: state[p]["z"].clone() for n, p in named}
    y = {n: safe_get_full_fp32_param(p).clone() for n, p in named}
    return y, {n: safe_get_full_optimizer_state(p, "z").clone() for n, p in named} if with_z else None


def _model_params(core) -> dict:
    """The model's own (model-dtype) parameters, whole; ZeRO-3 gathers them."""
    import deepspeed

    named = list(core.policy_module.named_parameters())
    if core.cfg.zero_stage != 3:
        return {n: p.detach().clone() for n, p in named}
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        return {n: p.detach().clone() for n, p in named}


def _train_and_publish(core, step: int, world: int, rec: dict, key: str) -> None:
    batches = [_batch(step, r) for r in range(2)]
    batch = pa.Table.from_batches(batches) if world == 1 else batches[core.rank]
    rec.setdefault("grad_norm", []).append(core.train_step(batch)["grad_norm"])
    if step == 1 and key == "x":
        rec["y_before_publish"], _ = _full_master(core)
    rec[f"{key}{step}"] = dict(core.named_weights())


def _worker(rank: int, world: int, port: int, stage: int, precision: str, model_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from learner.config import LearnerConfig
    from learner.step import LearnerCore

    cfg = LearnerConfig(optimizer="schedule_free_adamw", zero_stage=stage, precision=precision, lr=LR, grad_clip=CLIP)
    core = LearnerCore(cfg, model_dir, rank, world)
    rec = {"w0": _model_params(core)}
    for step in range(2):
        _train_and_publish(core, step, world, rec, "x")
    rec["y_after_publish"], rec["z2"] = _full_master(core, with_z=True)
    rec["model_after_publish"] = _model_params(core)
    core.save_state(f"{out}.ckpt")
    for step in range(2, STEPS):
        _train_and_publish(core, step, world, rec, "x")
    rec["y_end"], _ = _full_master(core)
    core.load_state(f"{out}.ckpt")
    for step in range(2, STEPS):
        _train_and_publish(core, step, world, rec, "resumed_x")
    rec["resumed_y_end"], _ = _full_master(core)
    if rank == 0:
        torch.save(rec, out)


def _spawn(world: int, stage: int, precision: str, model_dir, out) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.makedirs(f"{out}.ckpt", exist_ok=True)
    mp.start_processes(
        _worker, (world, port, stage, precision, str(model_dir), str(out)), nprocs=world, start_method="spawn"
    )
    return torch.load(out, weights_only=False)


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[n].float() - b[n].float()).abs().max()) for n in a)


def _rel_l2(run: dict, ref: dict, start: dict) -> float:
    """||run - ref|| / ||ref - start|| over all parameters: the run's error relative to how far training moved."""
    err = sum(float((run[n].float() - ref[n].float()).square().sum()) for n in ref)
    moved = sum(float((ref[n].float() - start[n].float()).square().sum()) for n in ref)
    return (err / moved) ** 0.5


def _close_to_reference(run: dict, ref: dict, start: dict) -> None:
    """fp32: Adam divides by sqrt(v), so a near-zero gradient summed in another order can move one element by a
    fraction of lr (seen: 3e-3 lr); the whole update agrees to rel 1e-5 (seen), asserted at 1e-4."""
    assert _max_diff(run, ref) <= 1e-2 * LR and _rel_l2(run, ref, start) <= 1e-4


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> dict:
    return _spawn(1, 0, "fp32", tiny_model_dir, tmp_path_factory.mktemp("sf_ref") / "rec.pt")


def _check_swap(rec: dict, bf16: bool) -> None:
    """Published = x from the run's own master (y, z); after the publish the model holds y again."""
    y, z = rec["y_after_publish"], rec["z2"]
    x = {n: y[n] + (1 - 1 / 0.9) * (z[n] - y[n]) for n in y}  # betas (0.9, 0.999): the default
    pub = rec["x1"]
    assert _max_diff(x, y) > 1e-4  # x and y really differ here
    for n in x:
        if bf16:
            assert pub[n].dtype == torch.bfloat16
            assert torch.allclose(pub[n].float(), x[n], rtol=2**-8, atol=1e-7), n
        else:
            assert torch.allclose(pub[n], x[n], rtol=0, atol=1e-6), n
    model = rec["model_after_publish"]
    assert all(torch.equal(model[n], y[n].to(model[n].dtype)) for n in y)  # refreshed from the master, y
    assert _max_diff(rec["y_before_publish"], y) <= 1e-6  # the lerp round trip x -> y: fp32 rounding


def _check_resume(rec: dict) -> None:
    for step in range(2, STEPS):
        a, b = rec[f"x{step}"], rec[f"resumed_x{step}"]
        assert all(torch.equal(a[n], b[n]) for n in a), f"published weights after step {step} differ on resume"
    assert all(torch.equal(rec["y_end"][n], rec["resumed_y_end"][n]) for n in rec["y_end"])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fp32_zero_matches_the_single_process_reference(stage, reference, tiny_model_dir, tmp_path):
    rec = _spawn(2, stage, "fp32", tiny_model_dir, tmp_path / "rec.pt")
    assert reference["grad_norm"][0] > CLIP and rec["grad_norm"][0] == pytest.approx(reference["grad_norm"][0])
    _check_swap(rec, bf16=False)
    for step in range(STEPS):
        _close_to_reference(rec[f"x{step}"], reference[f"x{step}"], reference["w0"])  # published x
    _close_to_reference(rec["y_after_publish"], reference["y_after_publish"], reference["w0"])
    _close_to_reference(rec["y_end"], reference["y_end"], reference["w0"])  # training went on at y
    _check_resume(rec)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_master_weights_publish_x_and_resume_exactly(stage, reference, tiny_model_dir, tmp_path):
    rec = _spawn(2, stage, "bf16", tiny_model_dir, tmp_path / "rec.pt")
    _check_swap(rec, bf16=True)
    _check_resume(rec)
    # bf16 forward passes change gradients by ~1%, and Adam's sign-like first steps turn that into lr-sized
    # differences on some elements (seen: rel 0.2 after 4 steps; unrelated trajectories give ~1.4)
    assert _rel_l2(rec["x3"], reference["x3"], reference["w0"]) < 0.5
