"""The learner's step on one DeepSpeed rank: logprobs, objective, micro-batched backward, optimiser steps.

Contract: `LearnerCore` is created on every rank of an initialised torch.distributed default group
(RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT in the environment, as the Ray actor sets them). Each rank
calls `train_step` with its own whole groups, in lock-step with the others (DeepSpeed all-reduces
the gradients). One `train_step` is one sampled batch:
1. collate (Arrow buffers -> tensors); reference log-probs (no grad) if the objective has a KL to it;
2. if the targets need the policy's outputs (GAE/V-trace values, reward-placed KL) or several updates
   follow (decoupled PPO's proximal policy), a no-grad pass records them before any update;
3. `objective.compute_targets` on the whole batch (advantages need whole groups);
4. `learner.updates_per_batch` optimiser steps, each over one minibatch (`learner.minibatches`, rows
   reshuffled every epoch), each as micro-batches under `learner.micro_batch_tokens` whose gradients
   accumulate. Every micro-batch's loss is its share of the minibatch loss: divided by the
   aggregation denominator summed over all micro-batches and ranks, times the world size (DeepSpeed
   averages gradients over ranks), so the update equals the whole-batch update for every `agg` mode.
Under ZeRO-2/3 ranks agree on the number of micro-batches (collectives pair up their passes);
a rank with fewer rows runs zero-weight passes. Diagnostics are the objective's over each whole
minibatch (exact, not averaged over micro-batches), reduced over updates by `learner.diagnostics`.
`grad_norm` is the norm of the update just applied (read after `engine.step()`).

Non-finite numerics: a micro-batch loss that is NaN/inf on any rank poisons that update's gradient, so
DeepSpeed (or, at ZeRO-0, `_ClippedAdamW`) skips the update on every rank, and the batch's later updates
are not taken. A batch with no applied update reports `skipped_nonfinite=1` (`nonfinite_in_gradient`
tells which); weights, optimiser and scheduler are then untouched.
`save_state` / `load_state` are collective: DeepSpeed's per-rank checkpoint plus this rank's RNG and step.
Weights for rollout: `weight_buckets` (collective under ZeRO-3, and with Schedule-Free under ZeRO-1/2/3) yields
the policy's parameters bucket by bucket, on the device, gathering ZeRO-3 partitions one bucket at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch

from learner.auxiliary import ReferencePolicy, frozen_policies
from learner.batch import TrainBatch, collate, plan_micro_batches, split_minibatches
from learner.config import LearnerConfig
from learner.critic import load_critic, optimizer_groups
from learner.diagnostics import StepDiagnostics, reduce_diagnostics
from learner.kl import adaptive_kl_coef
from learner.logprobs import CompletionModel, run_completion_model
from learner.losses import agg_denominator
from learner.lr_schedule import lr_multiplier
from learner.objective import (
    ObjectiveConfig,
    ObjectiveInputs,
    Targets,
    compute_targets,
    objective_loss,
    requires,
    trains_value_head,
)
from learner.sample_weights import group_priorities, row_weights, weighted_advantages
from learner.schedule_free import ClippedScheduleFreeAdamW, ensure_train_mode, eval_parameters
from learner.weight_packing import group_into_buckets

SNAPSHOT_FILE = "kl_prev_snapshot.pt"


class _ClippedAdamW(torch.optim.AdamW):
    """AdamW that clips by the global gradient norm and keeps it (ZeRO-0 without DeepSpeed mixed precision,
    where DeepSpeed clips but drops the norm). DeepSpeed all-reduces gradients before calling `step`, so
    the norm is global; a non-finite one skips the update and sets `overflow`, which DeepSpeed honours."""

    def __init__(self, params, max_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm, self._global_grad_norm, self.overflow = max_norm, None, False

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        self._global_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_norm))
        self.overflow = not math.isfinite(self._global_grad_norm)
        return None if self.overflow else super().step(closure)


def _build_engine(cfg: LearnerConfig, model_dir: str | Path, value_head: bool):
    import deepspeed
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if cfg.activation_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    critic = None if cfg.critic is None else load_critic(model_dir, cfg.critic.path, cfg.activation_checkpointing)
    model = CompletionModel(policy, value_head and critic is None, cfg.logprob_chunk_tokens, critic)
    groups = optimizer_groups(model, cfg.lr, None if cfg.critic is None else cfg.critic.lr)
    kwargs = {"lr": cfg.lr, "betas": cfg.betas, "weight_decay": cfg.weight_decay}
    # fused AdamW (CPU and CUDA kernels in torch): one pass per tensor, no `sqrt(v) / bias_correction`
    # temporaries the size of the flat fp32 partition, which set the learner's peak memory otherwise
    adamw = {**kwargs, "fused": True}
    ds_config = cfg.deepspeed_config()
    if cfg.optimizer == "schedule_free_adamw":  # its own warm-up, no schedule
        return _build_schedule_free(cfg, model, groups, ds_config, kwargs)
    if cfg.zero_stage == 0 and "bf16" not in ds_config and "fp16" not in ds_config:
        optimizer = _ClippedAdamW(groups, cfg.grad_clip, **adamw)
        ds_config["gradient_clipping"] = 0.0  # the optimizer clips (and keeps the norm)
    else:
        optimizer = torch.optim.AdamW(groups, **adamw)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, cfg.warmup_steps, cfg.lr_schedule, cfg.lr_decay_steps, cfg.min_lr_ratio)
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
    )
    return engine, optimizer, scheduler


def _build_schedule_free(cfg: LearnerConfig, model, groups: list[dict], ds_config: dict, kwargs: dict):
    """Schedule-Free AdamW under DeepSpeed. At ZeRO-0 it clips (DeepSpeed would drop the norm); under ZeRO/bf16
    DeepSpeed's wrapper clips by the global norm, since the optimiser only sees this rank's partition."""
    import deepspeed

    zero0 = cfg.zero_stage == 0
    optimizer = ClippedScheduleFreeAdamW(
        groups, cfg.grad_clip if zero0 else None, warmup_steps=cfg.warmup_steps, **kwargs
    )
    if zero0:
        ds_config["gradient_clipping"] = 0.0
    if cfg.zero_stage == 3:  # ZeRO-3 steps each sub-group separately: one per param group keeps one step per update
        ds_config["zero_optimization"]["sub_group_size"] = 2**62
    engine, wrapper, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, wrapper, None


class LearnerCore:
    def __init__(self, cfg: LearnerConfig, model_dir: str | Path, rank: int, world_size: int):
        import deepspeed
        from transformers import AutoTokenizer

        os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.device == "cuda" else "cpu")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        deepspeed.init_distributed(dist_backend=cfg.dist_backend)
        self.pad_id = AutoTokenizer.from_pretrained(model_dir).pad_token_id or 0
        self.needs = requires(cfg.objective)
        self.engine, self.optimizer, self.scheduler = _build_engine(cfg, model_dir, "values" in self.needs)
        self.entropy = "grad" if "entropy" in self.needs else ("detached" if cfg.log_entropy else "none")
        self.steps = 0
        self.kl_ref_coef = cfg.objective.kl_ref_coef  # moves with objective.kl_ref_target (adaptive KL control)
        self.frozen = frozen_policies(cfg, model_dir, self.engine.device, self.needs)
        self.reference = self.frozen.get("ref_logprobs")
        self.last_priorities: tuple[tuple[str, ...], tuple[float, ...]] = ((), ())

    # ------------------------------------------------------------------ one sampled batch
    def train_step(
        self, batch: pa.RecordBatch | pa.Table, group_weights: tuple[float, ...] | None = None
    ) -> StepDiagnostics:
        """`updates_per_batch` optimiser steps on this rank's groups; returns diagnostics plus timings.

        `group_weights`: replay's weight per group (order of first appearance), scaling each group's
        policy-gradient term (learner/sample_weights.py). Afterwards `last_priorities` holds
        (group_id, mean |advantage|) for replay's prioritized sampler."""
        t0 = time.perf_counter()
        tb = collate(batch, self.pad_id).to(self.engine.device)
        times = {"collate_s": time.perf_counter() - t0}
        ref = {name: self._frozen_pass(tb, model, times) for name, model in self.frozen.items()}
        pre = self._no_grad_pass(tb, "policy", times) if self._needs_prepass() else None
        logp0, values0 = pre if pre is not None else (None, None)
        if self._prev_is_previous():  # mirror descent's anchor: the policy before this batch's first update
            ref["prev_logprobs"] = logp0
        targets = compute_targets(self.objective, self._inputs(tb, logp0, None, values0, ref))
        gids = pc.unique(batch.column("group_id")).to_pylist()  # dense group id j <-> gids[j] (collate's order)
        priorities = group_priorities(targets.advantages, targets.loss_mask, tb.group_ids)
        self.last_priorities = (tuple(gids), tuple(priorities))
        weights = row_weights(group_weights, tb.group_ids)
        targets = dataclasses.replace(targets, advantages=weighted_advantages(targets.advantages, weights))
        times["sample_weight_mean"] = float(weights.mean()) if weights is not None else 1.0
        minibatches = [
            rows for _ in range(self.cfg.epochs) for rows in split_minibatches(tb.num_rows, self.cfg.minibatches)
        ]
        parts: list[dict[str, float]] = []
        for rows in minibatches:
            parts.append(self._update(tb, targets, rows.to(tb.mask.device), ref, pre, times))
            if parts[-1]["nonfinite_updates"]:  # the same on every rank: the data of this batch is suspect
                break
        diag = self._step_diagnostics(tb, parts, times, t0)
        self._adapt_kl_ref(diag)
        self._maybe_refresh_snapshot(diag, times)
        return StepDiagnostics.from_mapping(diag)

    @property
    def objective(self) -> ObjectiveConfig:
        """The objective this step optimises: the config's, with the adaptive KL coefficient in place
        (`objective.kl_ref_target`)."""
        obj = self.cfg.objective
        return obj if obj.kl_ref_target is None else obj.model_copy(update={"kl_ref_coef": self.kl_ref_coef})

    def _adapt_kl_ref(self, diag: dict) -> None:
        """Adaptive KL control: record the coefficient this step used, then move it by the step's per-token KL
        to the reference over all ranks (one all-reduce, so every rank holds the same coefficient)."""
        obj = self.cfg.objective
        if obj.kl_ref_target is None:
            return
        diag["kl_ref_coef"] = self.kl_ref_coef
        kl, tokens = diag.get("kl_ref", float("nan")), diag["tokens"]
        ok = math.isfinite(kl) and diag.get("updates_applied", 0.0) > 0
        local = [kl * tokens, tokens, diag["sequences"]] if ok else [0.0, 0.0, diag["sequences"]]
        kl_sum, token_sum, sequences = self._all_reduce(torch.tensor(local, dtype=torch.float64), "sum").tolist()
        if token_sum > 0:
            self.kl_ref_coef = adaptive_kl_coef(
                self.kl_ref_coef, kl_sum / token_sum, obj.kl_ref_target, sequences, obj.kl_ref_horizon
            )

    def _prev_is_previous(self) -> bool:
        return "prev_logprobs" in self.needs and self.cfg.objective.kl_prev.source == "previous"

    def _maybe_refresh_snapshot(self, diag: dict, times: dict) -> None:
        """Copy the policy into the kl_prev snapshot every `refresh_versions` applied steps (collective: ZeRO-3)."""
        snap = self.frozen.get("prev_logprobs")
        if snap is None or not diag.get("updates_applied") or self.steps % self.cfg.objective.kl_prev.refresh_versions:
            return
        t0 = time.perf_counter()
        snap.load_from(self._full_parameters())
        diag["snapshot_refresh_s"] = time.perf_counter() - t0

    def _full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every policy parameter, whole, on every rank (ZeRO-3 gathers one at a time; other stages hold them)."""
        named = list(self.policy_module.named_parameters())
        with eval_parameters(self.optimizer):  # the policy rollout serves (Schedule-Free's average x)
            if self.cfg.zero_stage != 3:
                yield from ((n, p.detach()) for n, p in named)
                return
            import deepspeed

            for n, p in named:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    yield n, p.detach()

    def _needs_prepass(self) -> bool:
        obj = self.cfg.objective
        reward_kl = (obj.kl_behaviour_coef > 0 and obj.kl_behaviour_in == "reward") or (
            obj.kl_ref_coef > 0 and obj.kl_ref_in == "reward"
        )
        proximal = "proximal_logprobs" in self.needs and self.cfg.updates_per_batch > 1
        return trains_value_head(obj) or reward_kl or proximal or self._prev_is_previous()

    def _inputs(self, tb: TrainBatch, logp, entropy, values, ref: dict, proximal=None) -> ObjectiveInputs:
        """Objective inputs of `tb`; `ref` holds the frozen models' log-probs by input name (ref_logprobs,
        prev_logprobs, teacher_logprobs). Without `logp` (targets that never read the policy's log-probs) the
        behaviour log-probs stand in."""
        return ObjectiveInputs(
            learner_logprobs=tb.behaviour_logprobs if logp is None else logp,
            behaviour_logprobs=tb.behaviour_logprobs,
            mask=tb.mask,
            rewards=tb.rewards,
            group_ids=tb.group_ids,
            proximal_logprobs=proximal,
            token_rewards=tb.token_rewards,
            values=values,
            entropy=entropy,
            **ref,
        )

    def _plan(self, tb: TrainBatch | None, training: bool) -> list[torch.Tensor]:
        """Micro-batches of `tb` (row indices). Where passes hold collectives (ZeRO-3 forwards, ZeRO-2/3
        backwards) every rank runs as many, padded with empty ones; otherwise the plan is local."""
        lens = tb.lengths() if tb is not None else (torch.zeros(0, dtype=torch.long),) * 2
        count = 1
        if self.cfg.zero_stage >= (2 if training else 3):
            local = len(plan_micro_batches(*lens, self.cfg.micro_batch_tokens)) if tb is not None else 1
            count = int(self._all_reduce(torch.tensor([float(local)]), "max").item())
        return [rows.to(self.engine.device) for rows in plan_micro_batches(*lens, self.cfg.micro_batch_tokens, count)]

    def _frozen_pass(self, tb: TrainBatch, model: ReferencePolicy, times: dict) -> torch.Tensor:
        return self._no_grad_pass(tb, "reference", times, model)

    @torch.no_grad()
    def _no_grad_pass(self, tb: TrainBatch, which: str, times: dict, model: ReferencePolicy | None = None):
        """Per-row outputs `[B, T]` before any update: the reference's log-probs, or the policy's (logp, values)."""
        t0 = time.perf_counter()
        logp, values = torch.zeros_like(tb.mask), torch.zeros_like(tb.mask) if "values" in self.needs else None
        if which == "reference":
            plan = plan_micro_batches(*tb.lengths(), self.cfg.micro_batch_tokens)  # no collectives: local plan
            parts = model.logprobs([tb.select(rows).tokens() for rows in plan], self.cfg.temperature)
            outputs = [(lp, None) for lp in parts]
        else:
            self.engine.eval()
            plan = self._plan(tb, training=False)
            outputs = [self._forward(tb.select(rows if len(rows) else self._first_row()), "none") for rows in plan]
            outputs = [(lp, v) for lp, _, v in outputs]
        for rows, (lp, v) in zip(plan, outputs):
            if len(rows):
                logp[rows, : lp.shape[1]] = lp
                if values is not None and v is not None:
                    values[rows, : v.shape[1]] = v
        key = "reference_s" if which == "reference" else "prepass_s"
        times[key] = times.get(key, 0.0) + time.perf_counter() - t0
        return logp if which == "reference" else (logp, values)

    def _first_row(self) -> torch.Tensor:
        return torch.zeros(1, dtype=torch.long, device=self.engine.device)

    def _forward(self, tb: TrainBatch, entropy: str):
        return run_completion_model(self.engine, tb.tokens(), self.cfg.temperature, entropy)

    # ------------------------------------------------------------------ one optimiser step
    def _update(self, tb: TrainBatch, targets: Targets, rows, ref, pre, times: dict) -> dict[str, float]:
        """One optimiser step over minibatch `rows` of `tb`, in micro-batches; its diagnostics."""
        obj = self.objective
        sub = tb.select(rows) if len(rows) else None
        sub_targets = targets.select(rows, sub.mask.shape[1]) if sub is not None else None
        local = agg_denominator(sub_targets.loss_mask, obj.agg, obj.agg_norm_tokens) if sub is not None else 0.0
        totals = self._all_reduce(torch.tensor([float(local), float(len(rows))], dtype=torch.float64), "sum")
        if totals[1] == 0:  # every rank's minibatch is empty (more minibatches than rows): no update
            return {"tokens": 0.0, "updates_applied": 0.0, "nonfinite_updates": 0.0, "nonfinite_in_gradient": 0.0}
        denominator = totals[0].clamp(min=1).to(self.engine.device)
        self.engine.train()
        nonfinite, seen = False, []
        for mb in self._plan(sub, training=True):
            t_fwd = time.perf_counter()
            if len(mb):
                loss, part = self._micro_batch_loss(sub, sub_targets, rows, mb, ref, pre, denominator)
                seen.append(part)
            else:  # this rank has fewer rows than micro-batches elsewhere: a zero-weight pass
                logp, _, values = self._forward(tb.select(self._first_row()), "none")
                loss = (logp.sum() + (values.sum() if values is not None else 0.0)) * 0.0
            times["forward_s"] = times.get("forward_s", 0.0) + time.perf_counter() - t_fwd
            if not math.isfinite(float(loss.detach())):
                nonfinite, loss = True, loss * float("nan")  # poisons the gradient: every rank's optimiser skips
            self.engine.backward(loss)
        nonfinite = not self._all_ranks(not nonfinite)  # one flag for all: was it a loss or a gradient?
        self.engine.step()
        applied = bool(self.engine.was_step_applied())
        grad_norm = self.engine.get_global_grad_norm()
        diag = self._update_diagnostics(sub, sub_targets, seen, ref, rows) if sub is not None else {"tokens": 0.0}
        return diag | {
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": float(self.optimizer.param_groups[0].get("scheduled_lr", self.optimizer.param_groups[0]["lr"])),
            "updates_applied": float(applied),
            "nonfinite_updates": float(not applied),
            "nonfinite_in_gradient": float(not applied and not nonfinite),
            "micro_batches": float(len(seen)),
        }

    def _micro_batch_loss(self, sub, targets, rows, mb, ref, pre, denominator):
        """The loss of micro-batch `mb` of minibatch `sub` (its share of the minibatch loss, times the world
        size since DeepSpeed averages gradients over ranks) and its detached outputs."""
        mtb = sub.select(mb)
        width = mtb.mask.shape[1]
        logp, entropy, values = self._forward(mtb, self.entropy)
        proximal = self._proximal(pre, rows, mb, width, logp)
        ref_mb = {name: t[rows][mb, :width] for name, t in ref.items()}
        x = self._inputs(mtb, logp, entropy, values, ref_mb, proximal)
        loss, _ = objective_loss(self.objective, x, targets.select(mb, width), denominator)
        detached = {"logp": logp, "entropy": entropy, "values": values, "proximal": proximal}
        part = {k: None if v is None else v.detach() for k, v in detached.items()}
        return loss * self.world_size, part | {"rows": mb}

    def _proximal(self, pre, rows, mb, width, logp) -> torch.Tensor | None:
        """Decoupled PPO's proximal log-probs: the pre-pass (policy before this batch's first update) when
        several updates follow, else the current policy's, detached (one update: they are the same)."""
        if "proximal_logprobs" not in self.needs:
            return None
        return pre[0][rows][mb, :width] if pre is not None else logp.detach()

    @torch.no_grad()
    def _update_diagnostics(self, sub: TrainBatch, targets: Targets, seen: list[dict], ref, rows) -> dict[str, float]:
        """The objective's diagnostics over the whole minibatch, from the micro-batches' detached outputs."""

        def whole(key: str) -> torch.Tensor | None:
            if not seen or seen[0][key] is None:
                return None
            full = torch.zeros_like(sub.mask)
            for part in seen:
                full[part["rows"], : part[key].shape[1]] = part[key]
            return full

        frozen = {k: t[rows] for k, t in ref.items()}
        x = self._inputs(sub, whole("logp"), whole("entropy"), whole("values"), frozen, whole("proximal"))
        _, diag = objective_loss(self.objective, x, targets)
        return diag | {"tokens": float(sub.mask.sum()), "sequences": float(sub.num_rows)}

    def _step_diagnostics(self, tb: TrainBatch, parts: list[dict], times: dict, t0: float) -> dict[str, float]:
        diag = reduce_diagnostics(parts)
        applied = diag.get("updates_applied", 0.0)
        if applied:
            self.steps += 1
        diag.update(times)
        diag.update(
            skipped_nonfinite=float(applied == 0),
            nonfinite_in_gradient=float(applied == 0 and parts[-1]["nonfinite_in_gradient"] > 0),
            sequences=float(tb.num_rows),
            tokens=float(tb.num_tokens),
            reward_mean=float(tb.rewards.mean()),
            step_s=time.perf_counter() - t0,
        )
        return diag

    # ------------------------------------------------------------------ collectives
    def _all_reduce(self, value: torch.Tensor, op: str) -> torch.Tensor:
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        out = value.to(self.engine.device, torch.float64 if value.is_floating_point() else value.dtype).clone()
        dist.all_reduce(out, op={"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op])
        return out.cpu()

    def _all_ranks(self, ok: bool) -> bool:
        """True iff `ok` on every rank (one tiny all-reduce), so every rank takes the same branch."""
        return bool(self._all_reduce(torch.tensor([0.0 if ok else 1.0]), "max").item() == 0.0)

    # ------------------------------------------------------------------ state and weights
    @property
    def policy_module(self) -> torch.nn.Module:
        """The HF policy inside the DeepSpeed engine (without the value head or critic): what rollout serves."""
        return self.engine.module.policy

    def save_state(self, out_dir: str | Path) -> None:
        """Write this rank's share of the training state under `out_dir` (every rank calls; no gather)."""
        from learner.rng_state import capture_rng

        out = Path(out_dir)
        # Schedule-Free: the training state at y (train mode), so a resume continues bit for bit
        self.engine.save_checkpoint(str(out / "deepspeed"), tag="state", save_latest=False)
        own = {"rng": capture_rng(), "steps": self.steps, "kl_ref_coef": self.kl_ref_coef}
        torch.save(own, out / f"rank-{self.rank}.pt")
        snap = self.frozen.get("prev_logprobs")
        if snap is not None and self.rank == 0:  # every rank holds the same snapshot; one copy is enough
            torch.save(snap.model.state_dict(), out / SNAPSHOT_FILE)

    def load_state(self, ckpt_dir: str | Path) -> int:
        """Load what `save_state` wrote (same world size and ZeRO stage); returns the learner step."""
        from learner.rng_state import restore_rng

        ckpt = Path(ckpt_dir)
        path, _ = self.engine.load_checkpoint(
            str(ckpt / "deepspeed"), tag="state", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {ckpt / 'deepspeed'}; the checkpoint is incomplete")
        ensure_train_mode(self.optimizer)  # Schedule-Free checkpoints written at x: back to y
        own = torch.load(ckpt / f"rank-{self.rank}.pt", weights_only=False)
        restore_rng(own["rng"])
        snap = self.frozen.get("prev_logprobs")
        if snap is not None:
            if not (ckpt / SNAPSHOT_FILE).is_file():
                raise FileNotFoundError(
                    f"{ckpt / SNAPSHOT_FILE} is missing: this checkpoint was written without "
                    "objective.kl_prev.source='snapshot'; resume with the config it was written with"
                )
            snap.load_from(torch.load(ckpt / SNAPSHOT_FILE, weights_only=True).items())
        self.steps = own["steps"]
        self.kl_ref_coef = own.get("kl_ref_coef", self.cfg.objective.kl_ref_coef)  # older checkpoints: the start
        return self.steps

    def weight_buckets(
        self, bucket_bytes: int, wire_dtype: str | None = None
    ) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """The policy's parameters as (HF name, device tensor) buckets of <= `bucket_bytes` wire bytes.

        Rank 0 gets the tensors; other ranks get empty buckets (under ZeRO-3 they must still iterate, in
        step, since each bucket is one collective gather; with Schedule-Free under any ZeRO stage every rank
        iterates to the end, since its swap to x and back all-gathers). A bucket's tensors are valid until the next
        bucket is requested (ZeRO-3 releases the gather then): read or copy them before that.
        """
        named = list(self.policy_module.named_parameters())
        with eval_parameters(self.optimizer):  # Schedule-Free publishes its averaged x (collective under ZeRO)
            if self.cfg.zero_stage != 3:
                if self.rank == 0:
                    yield from group_into_buckets(((n, p.detach()) for n, p in named), bucket_bytes, wire_dtype)
                return
            import deepspeed

            sized = [(n, torch.empty(p.ds_shape, dtype=p.dtype, device="meta")) for n, p in named]
            params = dict(named)
            for bucket in group_into_buckets(sized, bucket_bytes, wire_dtype):
                group = [params[n] for n, _ in bucket]
                with deepspeed.zero.GatheredParameters(group, modifier_rank=None):
                    yield [(n, p.detach()) for (n, _), p in zip(bucket, group)] if self.rank == 0 else []

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """Full parameters as (HF name, CPU tensor) on rank 0; [] on other ranks. Collective as `weight_buckets`."""
        out = []
        for bucket in self.weight_buckets(256 * 2**20):
            out += [(n, t.to("cpu", copy=True)) for n, t in bucket]
        return out

    def logprobs(self, batch: pa.RecordBatch | pa.Table, at: str = "served") -> torch.Tensor:
        """Learner log-probs `[B, T]` of the batch's completions (no grad), e.g. to check engine agreement.

        `at="served"`: the weights rollout gets (Schedule-Free's average x); "training": where gradients are taken
        (Schedule-Free's y; the same weights for AdamW). Schedule-Free under ZeRO: every rank calls "served"."""
        tb = collate(batch, self.pad_id).to(self.engine.device)
        swap = eval_parameters(self.optimizer) if at == "served" else contextlib.nullcontext()
        with swap:
            logp, _ = self._no_grad_pass(tb, "policy", {})
        return (logp * tb.mask).cpu()

    def save(self, out_dir: str | Path, tokenizer_dir: str | Path) -> Path | None:
        """Write the current model in HF format (rank 0 writes; every rank must call under ZeRO-3 or Schedule-Free)."""
        from transformers import AutoTokenizer

        weights = dict(self.named_weights())
        if self.rank != 0:
            return None
        out = Path(out_dir)
        self.policy_module.save_pretrained(out, state_dict=weights, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
        return out
