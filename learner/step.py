"""The learner's step on one DeepSpeed rank: recompute logprobs, objective, backward, optimiser step.

Contract: `LearnerCore` is created on every rank of an initialised torch.distributed default group
(RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT in the environment, as the Ray actor sets them). Each rank
calls `train_step` with its own whole groups, in lock-step with the others (DeepSpeed all-reduces
the gradients). `named_weights()` must be called on every rank too (ZeRO-3 gathers collectively);
it returns full tensors on rank 0 and an empty list elsewhere.

Non-finite numerics: a step whose loss (on any rank) or global gradient is NaN/inf is skipped on
every rank — no backward (loss) or no optimiser update (gradient; DeepSpeed ZeRO drops the
gradients itself, stage 0 is checked here) — and reported as `skipped_nonfinite=1` in the diagnostics.
`save_state` / `load_state` are collective too: DeepSpeed's per-rank checkpoint (model, optimiser and
scheduler partitions, no gather) plus this rank's RNG state and step count.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pyarrow as pa
import torch

from learner.auxiliary import PolicyWithValue, ReferencePolicy
from learner.batch import collate, completion_logprobs, completion_outputs
from learner.config import LearnerConfig
from learner.objective import ObjectiveInputs, compute_objective, requires


class LearnerCore:
    def __init__(self, cfg: LearnerConfig, model_dir: str | Path, rank: int, world_size: int):
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.device == "cuda" else "cpu")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        deepspeed.init_distributed(dist_backend=cfg.dist_backend)
        self.pad_id = AutoTokenizer.from_pretrained(model_dir).pad_token_id or 0
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.needs = requires(cfg.objective)
        if "values" in self.needs:  # GAE / V-trace: a value head on the policy's trunk, trained with it
            model = PolicyWithValue(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=cfg.deepspeed_config(1)
        )
        self.steps = 0
        self.reference = None
        if "ref_logprobs" in self.needs:
            self.reference = ReferencePolicy(cfg.reference.path or model_dir, self.engine.device, cfg.reference.offload)

    def train_step(self, batch: pa.RecordBatch | pa.Table) -> dict[str, float]:
        """One optimiser step on this rank's groups; returns the objective's diagnostics plus timings."""
        t0 = time.perf_counter()
        tb = collate(batch, self.pad_id)
        device = self.engine.device
        tb = _to(tb, device)
        self.engine.train()
        logp, entropy, values = completion_outputs(self.engine, tb, self.cfg.temperature, with_entropy=True)
        ref = self.reference.logprobs(tb, self.cfg.temperature) if self.reference is not None else None
        t_fwd = time.perf_counter()
        # One optimiser step per sampled batch, so the proximal policy of decoupled PPO (AReaL) is
        # the learner's weights before this step: its logprobs are the current ones, detached.
        proximal = logp.detach() if "proximal_logprobs" in self.needs else None
        inputs = ObjectiveInputs(
            learner_logprobs=logp,
            behaviour_logprobs=tb.behaviour_logprobs,
            proximal_logprobs=proximal,
            ref_logprobs=ref,
            values=values,
            mask=tb.mask,
            rewards=tb.rewards,
            group_ids=tb.group_ids,
            token_rewards=tb.token_rewards,
            entropy=entropy,
        )
        loss, diag = compute_objective(self.cfg.objective, inputs)
        if not self._all_ranks(math.isfinite(float(loss.detach()))):
            return self._skipped(diag, loss, "loss", t0, t_fwd)
        self.engine.backward(loss)
        if self.cfg.zero_stage == 0 and not self._all_ranks(_grads_finite(self.engine.module)):
            self.engine.zero_grad()  # ZeRO stages >= 1 check the global norm in their own step()
            return self._skipped(diag, loss, "gradient", t0, t_fwd)
        grad_norm = self.engine.get_global_grad_norm()
        self.engine.step()
        if not getattr(self.engine, "_step_applied", True):  # ZeRO found a NaN/inf gradient norm: no update
            return self._skipped(diag, loss, "gradient", t0, t_fwd)
        self.steps += 1
        t_end = time.perf_counter()
        diag = dict(diag)
        diag.update(
            skipped_nonfinite=0.0,
            loss=float(loss.detach()),
            grad_norm=float(grad_norm) if grad_norm is not None and math.isfinite(float(grad_norm)) else float("nan"),
            lr=float(self.optimizer.param_groups[0]["lr"]),
            sequences=float(tb.mask.shape[0]),
            tokens=float(tb.num_tokens),
            reward_mean=float(tb.rewards.mean()),
            forward_s=t_fwd - t0,
            step_s=t_end - t0,
        )
        return diag

    @property
    def policy_module(self) -> torch.nn.Module:
        """The HF policy inside the DeepSpeed engine (without the value head, if any): what rollout serves."""
        module = self.engine.module
        return module.policy if isinstance(module, PolicyWithValue) else module

    def _all_ranks(self, ok: bool) -> bool:
        """True iff `ok` on every rank (one tiny all-reduce), so every rank takes the same branch."""
        if self.world_size == 1:
            return ok
        import torch.distributed as dist

        flag = torch.tensor([0.0 if ok else 1.0], device=self.engine.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() == 0.0)

    def _skipped(self, diag: dict, loss: torch.Tensor, where: str, t0: float, t_fwd: float) -> dict[str, float]:
        """Diagnostics of a step skipped for non-finite numerics: weights and optimiser state unchanged."""
        out = {k: float(v) for k, v in diag.items()}
        out.update(
            skipped_nonfinite=1.0,
            nonfinite_in_gradient=float(where == "gradient"),
            loss=float(loss.detach()),
            forward_s=t_fwd - t0,
            step_s=time.perf_counter() - t0,
        )
        return out

    def save_state(self, out_dir: str | Path) -> None:
        """Write this rank's share of the training state under `out_dir` (every rank calls; no gather)."""
        from learner.rng_state import capture_rng

        out = Path(out_dir)
        self.engine.save_checkpoint(str(out / "deepspeed"), tag="state", save_latest=False)
        torch.save({"rng": capture_rng(), "steps": self.steps}, out / f"rank-{self.rank}.pt")

    def load_state(self, ckpt_dir: str | Path) -> int:
        """Load what `save_state` wrote (same world size and ZeRO stage); returns the learner step."""
        from learner.rng_state import restore_rng

        ckpt = Path(ckpt_dir)
        path, _ = self.engine.load_checkpoint(
            str(ckpt / "deepspeed"), tag="state", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {ckpt / 'deepspeed'}; the checkpoint is incomplete")
        own = torch.load(ckpt / f"rank-{self.rank}.pt", weights_only=False)
        restore_rng(own["rng"])
        self.steps = own["steps"]
        return self.steps

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """Full parameters as (HF name, CPU tensor) on rank 0; [] on other ranks. Collective under ZeRO-3."""
        module = self.policy_module
        if self.cfg.zero_stage == 3:
            import deepspeed

            out = []
            for name, param in module.named_parameters():
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    if self.rank == 0:
                        out.append((name, param.detach().to("cpu", copy=True)))
            return out
        if self.rank != 0:
            return []
        return [(name, p.detach().to("cpu", copy=True)) for name, p in module.named_parameters()]

    def logprobs(self, batch: pa.RecordBatch | pa.Table) -> torch.Tensor:
        """Learner log-probs `[B, T]` of the batch's completions (no grad), e.g. to check engine agreement."""
        tb = _to(collate(batch, self.pad_id), self.engine.device)
        self.engine.eval()
        with torch.no_grad():
            logp, _ = completion_logprobs(self.engine, tb, self.cfg.temperature)
        return (logp * tb.mask).cpu()

    def save(self, out_dir: str | Path, tokenizer_dir: str | Path) -> Path | None:
        """Write the current model in HF format (rank 0 writes; every rank must call under ZeRO-3)."""
        from transformers import AutoTokenizer

        weights = dict(self.named_weights())
        if self.rank != 0:
            return None
        out = Path(out_dir)
        self.policy_module.save_pretrained(out, state_dict=weights, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
        return out


def _grads_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p.grad).all()) for p in module.parameters() if p.grad is not None)


def _to(tb, device):
    import dataclasses

    return dataclasses.replace(
        tb,
        **{
            f.name: getattr(tb, f.name).to(device)
            for f in dataclasses.fields(tb)
            if isinstance(getattr(tb, f.name), torch.Tensor)
        },
    )
