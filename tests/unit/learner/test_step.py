"""`LearnerCore` on one real DeepSpeed rank: micro-batched gradients equal whole-batch gradients for every
aggregation mode, the entropy bonus has its gradient, grad_norm is the current step's, bf16 trains on this
CPU, PPO epochs give decoupled PPO a proximal policy that differs from the current one, and every step
diagnostic declares its reduction.

Gradients are captured where DeepSpeed hands them to the optimiser (ZeRO-0: after its all-reduce, before
any clipping) and the step is not applied, so one core can be asked twice about the same weights.
Tolerance for "equal" in fp32: max |difference| <= 1e-5 x max |gradient| per tensor (for the entropy bonus,
a difference of two gradients, 1e-5 x the larger one).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from learner.config import LearnerConfig
from learner.diagnostics import REDUCTIONS
from learner.objective import requires
from replay.schema import Trace, traces_to_batch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("dist_env")]


def _batch(seed: int = 0, groups: int = 3, size: int = 4):
    rng = random.Random(seed)
    traces = []
    for g in range(groups):
        prompt = tuple(rng.randint(3, 15) for _ in range(rng.randint(2, 7)))
        for i in range(size):
            n = rng.randint(1, 6)
            traces.append(
                Trace(
                    group_id=f"g{seed}-{g}",
                    prompt_ids=prompt,
                    completion_ids=tuple(rng.randint(3, 15) for _ in range(n)),
                    behaviour_logprobs=tuple(-rng.uniform(1.5, 3.5) for _ in range(n)),
                    reward=float((i + g) % 2),
                    policy_version=0,
                )
            )
    return traces_to_batch(traces)


def _core(model_dir, **kwargs):
    from learner.step import LearnerCore

    return LearnerCore(LearnerConfig(**{"lr": 1e-3, **kwargs}), model_dir, 0, 1)


def _capture_grads(core, batch) -> dict[str, torch.Tensor]:
    """One train_step whose optimiser step only records the gradients it was given (weights unchanged)."""
    grads = {}
    optimizer = core.engine.optimizer
    original = optimizer.step

    def record(closure=None):
        for name, p in core.engine.module.named_parameters():
            if p.grad is not None:
                grads[name.removeprefix("policy.")] = p.grad.detach().clone()

    optimizer.step = record
    try:
        core.train_step(batch)
    finally:
        optimizer.step = original
    return grads


def _assert_grads_equal(got: dict, want: dict, scales: dict | None = None) -> None:
    assert got.keys() == want.keys()
    for name in want:
        scale = (want if scales is None else scales)[name].abs().max().clamp(min=1e-8)
        assert (got[name] - want[name]).abs().max() <= 1e-5 * scale, name


AGG_MODES = [
    dict(agg="token-mean"),
    dict(agg="seq-mean-token-mean"),
    dict(agg="seq-mean-token-sum"),
    dict(agg="seq-mean-token-sum-norm", agg_norm_tokens=6, advantage="dr_grpo"),
]


@pytest.mark.parametrize("objective", AGG_MODES)
def test_micro_batched_gradients_equal_the_whole_batch_gradients(tiny_model_dir, objective):
    core = _core(tiny_model_dir, zero_stage=0, objective=objective)
    batch = _batch(seed=1)
    whole = _capture_grads(core, batch)
    core.cfg = core.cfg.model_copy(update={"micro_batch_tokens": 24})  # ~3 rows per micro-batch
    micro = _capture_grads(core, batch)
    _assert_grads_equal(micro, whole)
    diag = core.train_step(batch)
    assert diag["micro_batches"] >= 4, diag["micro_batches"]


def _reference_loss(model, batch, objective, pad_id: int = 0):
    """The objective on full-vocabulary log-probs of a plain HF model (an independent re-computation)."""
    from learner.batch import collate
    from learner.objective import ObjectiveInputs, compute_objective

    tb = collate(batch, pad_id)
    out = model(input_ids=tb.input_ids, attention_mask=tb.attention_mask, position_ids=tb.position_ids)
    p, t = tb.prompt_len, tb.completion_ids.shape[1]
    logp_all = torch.log_softmax(out.logits[:, p - 1 : p - 1 + t].float(), dim=-1)
    logp = logp_all.gather(-1, tb.completion_ids[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    x = ObjectiveInputs(logp, tb.behaviour_logprobs, tb.mask, tb.rewards, tb.group_ids, entropy=entropy)
    return compute_objective(objective, x)[0], entropy, tb.mask


def test_entropy_bonus_changes_the_gradient_by_its_own_gradient(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    core = _core(tiny_model_dir, zero_stage=0)
    batch = _batch(seed=2)
    without = _capture_grads(core, batch)
    coef = 0.1
    core.cfg = core.cfg.model_copy(update={"objective": core.cfg.objective.model_copy(update={"entropy_coef": coef})})
    core.needs, core.entropy = requires(core.cfg.objective), "grad"
    with_bonus = _capture_grads(core, batch)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    _, entropy, mask = _reference_loss(model, batch, core.cfg.objective)
    bonus = -coef * (entropy * mask).sum() / mask.sum()  # token-mean over every response token
    bonus.backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    diff = {n: with_bonus[n] - without[n] for n in want}
    assert max(d.abs().max().item() for d in diff.values()) > 1e-4  # it changes the gradient at all
    _assert_grads_equal(diff, want, scales=with_bonus)  # a difference of two gradients: their own rounding


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_grad_norm_is_the_norm_of_this_steps_gradient(tiny_model_dir, zero_stage):
    from transformers import AutoModelForCausalLM

    core = _core(tiny_model_dir, zero_stage=zero_stage, lr=1e-2)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    norms = []
    for seed in (3, 4):
        model.load_state_dict(dict(core.named_weights()))
        model.zero_grad()
        loss, _, _ = _reference_loss(model, _batch(seed=seed), core.cfg.objective)
        loss.backward()
        want = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
        got = core.train_step(_batch(seed=seed))["grad_norm"]
        norms.append((got, float(want)))
    for got, want in norms:
        assert got == pytest.approx(want, rel=1e-4), norms
    assert norms[0][1] != pytest.approx(norms[1][1], rel=1e-3)  # the two steps differ: not one step late


@pytest.mark.parametrize("mode", ["deepspeed", "autocast"])
def test_bf16_step_runs_on_cpu_with_fp32_master_weights(tiny_model_dir, mode):
    core = _core(tiny_model_dir, zero_stage=1, precision="bf16", mixed_precision=mode, objective={"kl_ref_coef": 0.05})
    before = {n: t.float().clone() for n, t in core.named_weights()}
    diags = [core.train_step(_batch(seed=s)) for s in range(2)]
    assert all(math.isfinite(d["loss"]) and d["skipped_nonfinite"] == 0 for d in diags)
    after = dict(core.named_weights())
    assert any(not torch.equal(after[n].float(), before[n]) for n in before)
    params = list(core.engine.module.parameters())
    assert params[0].dtype == (torch.bfloat16 if mode == "deepspeed" else torch.float32)
    assert next(core.reference.model.parameters()).dtype == torch.bfloat16  # reference in the compute dtype
    assert 0 <= diags[0]["kl_ref"] < 0.05  # bf16 policy vs bf16 reference: the same model at step 0


def test_ppo_epochs_clip_around_the_policy_before_the_first_update(tiny_model_dir):
    single = _core(tiny_model_dir, lr=2e-2, objective={"policy_loss": "decoupled_ppo"})
    d1 = single.train_step(_batch(seed=5))
    assert d1["ratio_min"] == pytest.approx(1.0, abs=1e-5) and d1["ratio_max"] == pytest.approx(1.0, abs=1e-5)

    epochs = _core(
        tiny_model_dir, lr=2e-2, updates_per_batch=4, minibatches=2, objective={"policy_loss": "decoupled_ppo"}
    )
    steps_before = epochs.engine.global_steps
    d4 = epochs.train_step(_batch(seed=5))
    assert d4["updates_applied"] == 4 and epochs.engine.global_steps - steps_before == 4
    assert d4["ratio_max"] > 1.01 or d4["ratio_min"] < 0.99  # later updates see pi != pi_proximal
    assert epochs.steps == 1  # one sampled batch


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(micro_batch_tokens=20, objective={"advantage": "gae", "kl_ref_coef": 0.1, "entropy_coef": 0.01}),
        dict(updates_per_batch=2, objective={"policy_loss": {"kind": "decoupled_ppo", "tis_cap": 2.0}}),
    ],
)
def test_every_step_diagnostic_declares_its_reduction(tiny_model_dir, kwargs):
    diag = _core(tiny_model_dir, **kwargs).train_step(_batch(seed=6))
    assert set(diag) <= set(REDUCTIONS), sorted(set(diag) - set(REDUCTIONS))
    assert diag["tokens"] > 0 and diag["grad_norm"] > 0


def test_nan_loss_in_a_micro_batch_skips_the_whole_update(tiny_model_dir):
    core = _core(tiny_model_dir, zero_stage=1, micro_batch_tokens=20)
    before = {n: t.clone() for n, t in core.named_weights()}
    bad = _batch(seed=7).to_pydict()
    bad["reward"][0] = float("nan")  # NaN reward -> NaN advantages of that group -> NaN loss in its micro-batch
    import pyarrow as pa

    diag = core.train_step(pa.RecordBatch.from_pydict(bad, schema=_batch(seed=7).schema))
    assert diag["skipped_nonfinite"] == 1.0 and diag["nonfinite_in_gradient"] == 0.0
    assert all(torch.equal(before[n], t) for n, t in core.named_weights()) and core.steps == 0


def test_activation_checkpointing_and_small_logprob_chunks_give_the_same_gradients(tiny_model_dir):
    batch = _batch(seed=8)
    plain = _capture_grads(_core(tiny_model_dir, zero_stage=0), batch)
    frugal = _core(tiny_model_dir, zero_stage=0, activation_checkpointing=True, logprob_chunk_tokens=3)
    _assert_grads_equal(_capture_grads(frugal, batch), plain)
