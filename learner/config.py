"""`LearnerConfig`: the learner's section of the run config (DeepSpeed group, optimiser, objective, weight sync).

The device picks everything backend-shaped: `cpu` -> gloo + DeepSpeed's CPU accelerator, `cuda` ->
NCCL + CUDA. There is no other switch between the CPU and GPU paths.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from learner.objective import ObjectiveConfig, requires
from learner.weight_transport import WeightSyncConfig


class ReferenceConfig(BaseModel):
    """The frozen reference policy for `objective.kl_ref_coef > 0` (see `learner.auxiliary.ReferencePolicy`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str | None = None  # a local HF model dir; None = the run's starting weights (cold start / model.path)
    offload: bool = False  # keep it in CPU memory between forward passes (GPU learners)


class LearnerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    device: Literal["cpu", "cuda"] = "cpu"
    num_ranks: int = Field(1, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 1
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    groups_per_step: int = Field(8, ge=1, description="groups per optimiser step, summed over ranks")
    temperature: float = Field(1.0, gt=0, description="must equal rollout.temperature")
    num_cpus_per_rank: float = Field(1.0, ge=0)
    num_gpus_per_rank: float = Field(0.0, ge=0)
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
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig)

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
        if self.device == "cuda" and self.num_gpus_per_rank <= 0:
            raise ValueError("learner.device='cuda' needs learner.num_gpus_per_rank > 0")
        return self

    def deepspeed_config(self, micro_batch_sequences: int) -> dict:
        """The DeepSpeed JSON for one optimiser step over `micro_batch_sequences` sequences per rank."""
        return {
            "train_micro_batch_size_per_gpu": micro_batch_sequences,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": self.grad_clip,
            "zero_optimization": {"stage": self.zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
