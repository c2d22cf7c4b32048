"""`LearnerConfig`: the learner's section of the run config (DeepSpeed group, optimiser, precision,
micro-batching, PPO epochs, objective, weight sync).

The device picks everything backend-shaped: `cpu` -> gloo + DeepSpeed's CPU accelerator, `cuda` ->
NCCL + CUDA. There is no other switch between the CPU and GPU paths. Mixed precision always keeps fp32
master weights and optimiser state (DeepSpeed's `bf16`/`fp16` sections, or its `torch_autocast`).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from learner.critic import CriticConfig
from learner.lr_schedule import Schedule
from learner.objective import ObjectiveConfig, requires, trains_value_head
from learner.weight_transport import WeightSyncConfig


class ReferenceConfig(BaseModel):
    """The frozen reference policy for `objective.kl_ref_coef > 0` (see `learner.auxiliary.ReferencePolicy`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str | None = Field(
        None, description="a local HF model dir; None = the run's starting weights (cold start / model.path)"
    )
    offload: bool = Field(
        False, description="keep it in CPU memory between forward passes (GPU learners short of memory)"
    )


class TeacherConfig(BaseModel):
    """The frozen teacher of on-policy distillation (`objective.kl_teacher.coef > 0`), held by every learner rank."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str | None = Field(
        None,
        description="a local HF model dir with the student's tokenizer (e.g. an earlier run's final_model); "
        "needed when objective.kl_teacher.coef > 0",
    )
    offload: bool = Field(False, description="keep it in CPU memory between forward passes (GPU memory short)")


class LearnerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    device: Literal["cpu", "cuda"] = Field("cpu", description="cpu: gloo + DeepSpeed's CPU accelerator; cuda: NCCL")
    num_ranks: int = Field(1, ge=1, description="DeepSpeed data-parallel ranks (one Ray actor each)")
    zero_stage: Literal[0, 1, 2, 3] = Field(
        1, description="DeepSpeed ZeRO stage; 3 partitions the weights too (publishing then gathers bucket by bucket)"
    )
    optimizer: Literal["adamw", "schedule_free_adamw"] = Field(
        "adamw",
        description="'adamw' with linear warm-up then constant lr; 'schedule_free_adamw' (Defazio et al. 2024, RPG's "
        "optimiser): no schedule (warmup_steps still warms up), rollout, evaluation and the final model get its "
        "averaged weights x while gradients are taken at y; works at every zero_stage, fp32 or bf16 (DeepSpeed's "
        "master weights or autocast), not fp16. Try it instead of tuning a decay schedule",
    )
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate after warm-up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    grad_clip: float = Field(1.0, gt=0, description="clip the global gradient norm of each update to this")
    warmup_steps: int = Field(0, ge=0, description="optimiser steps of linear learning-rate warm-up")
    lr_schedule: Schedule = Field(
        "constant",
        description="after warm-up: a constant learning rate, or a linear / cosine decay to min_lr_ratio x lr at "
        "lr_decay_steps optimiser steps (then flat). Decay settles the policy a fixed-budget run ends with; set "
        "lr_decay_steps to about the learner steps the run will take x updates_per_batch",
    )
    lr_decay_steps: int | None = Field(
        None, ge=1, description="lr_schedule linear/cosine: optimiser steps (warm-up included) at which the decay ends"
    )
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="lr_schedule linear/cosine: the floor of the decay, as a fraction of lr"
    )
    groups_per_step: int = Field(
        8,
        ge=1,
        description="groups per learner step (one sampled batch), summed over ranks; updates_per_batch optimiser "
        "steps are taken on it",
    )
    temperature: float = Field(1.0, gt=0, description="must equal rollout.temperature")
    num_cpus_per_rank: float = Field(1.0, ge=0, description="Ray CPUs reserved per learner rank")
    num_gpus_per_rank: float = Field(0.0, ge=0, description="Ray GPUs per learner rank (> 0 with device cuda)")
    ray_resources: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "custom Ray resources per rank, e.g. {flywheel_learner: 1} to pin ranks to the learner worker group"
        ),
    )
    max_consecutive_nonfinite: int = Field(
        5,
        ge=1,
        description=(
            "stop the run (with a checkpoint) after this many consecutive steps skipped for a NaN/inf loss or gradient"
        ),
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description=(
            "compute dtype of the policy and the reference model; optimiser state and master weights stay fp32. "
            "bf16 on GPUs (and CPUs with avx512_bf16) halves weight and activation memory; fp16 adds dynamic loss "
            "scaling (early steps may be skipped while the scale settles)"
        ),
    )
    mixed_precision: Literal["deepspeed", "autocast"] = Field(
        "deepspeed",
        description=(
            "how a bf16/fp16 `precision` is applied: 'deepspeed' = DeepSpeed's bf16/fp16 section (weights and "
            "activations in that dtype, fp32 master copy in the optimiser: least memory); 'autocast' = DeepSpeed's "
            "torch_autocast (fp32 weights, matmuls in that dtype; bf16 only). Ignored at fp32"
        ),
    )
    micro_batch_tokens: int | None = Field(
        None,
        ge=1,
        description=(
            "padded tokens (rows x longest prompt+completion) per forward/backward; a rank's share is split into "
            "micro-batches under this budget and their gradients accumulated into one update equal to the "
            "whole-batch update. None = one micro-batch. Lower it when activations run out of memory"
        ),
    )
    logprob_chunk_tokens: int = Field(
        1024,
        ge=1,
        description=(
            "completion tokens per chunk of the LM head + log-softmax; peak logits memory is about "
            "chunk x vocab x 6 bytes for a plain linear head (x 16 with an entropy gradient or under ZeRO-3). "
            "Lower it for large vocabularies on small devices"
        ),
    )
    activation_checkpointing: bool = Field(
        False,
        description="recompute each decoder layer's activations in the backward (HF gradient checkpointing): "
        "less memory, ~30% more compute; turn on when long sequences do not fit",
    )
    log_entropy: bool = Field(
        True,
        description="compute the policy's token entropy in the logprob pass and log it (no gradient unless "
        "objective.entropy_coef > 0, which always computes it); off saves one softmax over each chunk",
    )
    updates_per_batch: int = Field(
        1,
        ge=1,
        description=(
            "optimiser steps per sampled batch (PPO epochs x minibatches). Above 1 the proximal log-probs of "
            "decoupled PPO/TIS are the policy's before the first of them, so their clip binds (AReaL)"
        ),
    )
    minibatches: int = Field(
        1,
        ge=1,
        description=(
            "disjoint minibatches each rank's share is split into (rows shuffled each epoch); each optimiser step "
            "uses one. updates_per_batch must be a multiple of it: epochs = updates_per_batch / minibatches"
        ),
    )
    objective: ObjectiveConfig = Field(
        default_factory=ObjectiveConfig, description="the loss: advantages, policy loss, KL terms, aggregation"
    )
    reference: ReferenceConfig = Field(
        default_factory=ReferenceConfig, description="the frozen reference model (objective.kl_ref_coef > 0)"
    )
    teacher: TeacherConfig = Field(
        default_factory=TeacherConfig, description="the distillation teacher (objective.kl_teacher.coef > 0)"
    )
    critic: CriticConfig | None = Field(
        None,
        description="a separate critic (value model) initialised from a reward-model checkpoint, trained only by the "
        "value loss, for critic-based advantages (gae, vtrace); None = a value head on the policy's trunk. Set it "
        "for the four-model RLHF setup (policy, reward model, critic, reference) as OpenRLHF/verl PPO run it",
    )
    weight_sync: WeightSyncConfig = Field(
        default_factory=WeightSyncConfig, description="how new weights reach the rollout workers"
    )

    @property
    def compute_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    @property
    def snapshot_weights(self) -> bool:
        """Publish from a device snapshot (training continues) rather than streaming from the parameters."""
        mode = self.weight_sync.snapshot
        return mode == "device" or (mode == "auto" and self.zero_stage != 3)

    @property
    def epochs(self) -> int:
        return self.updates_per_batch // self.minibatches

    @property
    def dist_backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"

    @model_validator(mode="after")
    def _check(self) -> LearnerConfig:
        if self.groups_per_step % self.num_ranks:
            raise ValueError(
                f"learner.groups_per_step={self.groups_per_step} is not divisible by "
                f"learner.num_ranks={self.num_ranks}; "
                "each rank trains on whole groups, so make groups_per_step a multiple of num_ranks"
            )
        if self.weight_sync.backend != self.dist_backend:
            raise ValueError(
                f"learner.weight_sync.backend={self.weight_sync.backend!r} but learner.device={self.device!r} implies "
                f"{self.dist_backend!r}; set learner.weight_sync.backend={self.dist_backend!r}"
            )
        if self.reference.path is not None and "ref_logprobs" not in requires(self.objective):
            raise ValueError(
                "learner.reference.path is set but learner.objective.kl_ref_coef=0, so no reference model is loaded; "
                "set kl_ref_coef > 0 or drop learner.reference"
            )
        for problem in _algorithm_problems(self):
            raise ValueError(problem)
        if self.device == "cuda" and self.num_gpus_per_rank <= 0:
            raise ValueError("learner.device='cuda' needs learner.num_gpus_per_rank > 0")
        if self.updates_per_batch % self.minibatches:
            raise ValueError(
                f"learner.updates_per_batch={self.updates_per_batch} is not a multiple of learner.minibatches="
                f"{self.minibatches}; each epoch takes one step per minibatch, so set updates_per_batch = "
                "epochs x minibatches"
            )
        if self.precision == "bf16" and self.mixed_precision == "deepspeed" and self.zero_stage == 0:
            raise ValueError(
                "learner.precision='bf16' with learner.mixed_precision='deepspeed' keeps fp32 master weights only "
                "under ZeRO (DeepSpeed's ZeRO-0 bf16 path trains the bf16 weights directly); set learner.zero_stage "
                ">= 1 or learner.mixed_precision='autocast'"
            )
        if self.precision == "fp16" and self.mixed_precision == "autocast":
            raise ValueError(
                "learner.precision='fp16' with learner.mixed_precision='autocast' has no loss scaling; "
                "use mixed_precision='deepspeed' for fp16, or precision='bf16'"
            )
        return self

    def deepspeed_config(self) -> dict:
        """The DeepSpeed JSON. The learner sizes micro-batches by tokens and calls `step()` once per update
        (unmanaged gradient accumulation: any number of backward passes before it)."""
        ds = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,
            "gradient_clipping": self.grad_clip,
            "zero_optimization": {"stage": self.zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if self.precision == "fp32":
            return ds
        if self.mixed_precision == "autocast":
            return ds | {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
        if self.precision == "bf16":
            # fp32 gradient accumulation: micro-batch gradients summed in bf16 would lose low-order bits
            return ds | {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}
        return ds | {"fp16": {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2}}


def _algorithm_problems(c: LearnerConfig) -> list[str]:
    """Cross-field checks of the kl_prev / kl_teacher terms and the optimiser."""
    p, obj = [], c.objective
    if obj.kl_prev.coef > 0 and obj.kl_prev.source == "previous" and c.updates_per_batch == 1:
        p.append(
            "learner.objective.kl_prev.source='previous' anchors to the policy at the start of the batch, which "
            "with learner.updates_per_batch=1 is the policy being updated (the term is zero): raise "
            "updates_per_batch, or use kl_prev.source='snapshot'"
        )
    if (obj.kl_teacher.coef > 0) != (c.teacher.path is not None):
        p.append(
            "learner.teacher.path and learner.objective.kl_teacher.coef > 0 go together: set both for on-policy "
            f"distillation or neither (got path={c.teacher.path!r}, coef={obj.kl_teacher.coef})"
        )
    if c.critic is not None and not trains_value_head(obj):
        p.append(
            f"learner.critic.path is set but learner.objective.advantage.kind={obj.advantage.kind!r} uses no values; "
            "a critic needs a critic-based estimator (kind: gae or vtrace), or drop learner.critic"
        )
    elif c.critic is not None and obj.advantage.value_coef <= 0:
        p.append(
            "learner.critic.path is set but learner.objective.advantage.value_coef=0, so the critic would never be "
            "trained; set value_coef > 0 (e.g. 0.5)"
        )
    if c.lr_schedule != "constant" and c.lr_decay_steps is None:
        p.append(f"learner.lr_schedule={c.lr_schedule!r} needs learner.lr_decay_steps (the step the decay ends at)")
    if c.lr_schedule != "constant" and c.optimizer == "schedule_free_adamw":
        p.append(
            "learner.optimizer='schedule_free_adamw' replaces the learning-rate schedule by iterate averaging: "
            "use learner.lr_schedule='constant' with it"
        )
    if c.optimizer == "schedule_free_adamw" and c.precision == "fp16" and c.mixed_precision == "deepspeed":
        p.append(
            "learner.optimizer='schedule_free_adamw' is not supported with learner.precision='fp16' (DeepSpeed's fp16 "
            "loss scaling around its averaged-weight swap is untested): use learner.precision='bf16' (any ZeRO stage "
            ">= 1, or mixed_precision='autocast') or 'fp32'"
        )
    return p
