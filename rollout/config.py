"""`RolloutConfig`: the rollout section of the run config (engine choice, sampling, resources).

Contract: frozen, unknown keys rejected; every cross-field check fails at construction with a
message naming the `rollout.<field>` and the fix. Checks that need the model (prompt + completion
fitting the model's positions) happen when an engine is built, in `rollout/engine*.py`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RolloutConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    engine: Literal["vllm", "hf"] = "vllm"
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    group_size: int = 8
    prompts_per_step: int = Field(8, ge=1)
    # DAPO's dynamic sampling, done at the source: a group whose G rewards are all equal has zero
    # group-relative advantage (GRPO, Dr.GRPO, RLOO), so it only costs
    # learner compute. Dropped before replay and counted (`uniform_groups`); replay's backlog gate then
    # dispatches more prompts, so every learner batch is `groups_per_step` groups with signal.
    drop_uniform_groups: bool = False
    temperature: float = 1.0
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # >= 1 so that every completion has a token (a Trace needs one); see rollout/sampling.py.
    max_new_tokens: int = Field(8, ge=1)
    max_model_len: int = Field(64, ge=2)
    kv_cache_gib: float = Field(1.0, gt=0.0)
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0)
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    # vLLM KV block size; None = vLLM's default (128 on CPU). Only full blocks enter the prefix cache.
    block_size: int | None = Field(None, ge=1)
    seed: int = 0
    num_workers: int = Field(1, ge=1)
    num_cpus_per_worker: float = Field(1, ge=0)
    num_gpus_per_worker: float = Field(0, ge=0)
    # Custom Ray resources per worker, e.g. {flywheel_rollout: 1}, so workers land on the rollout worker group.
    ray_resources: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> RolloutConfig:
        if self.group_size < 2:
            raise ValueError(
                f"rollout.group_size={self.group_size}; group-relative advantages need at least 2 "
                "completions per prompt: set rollout.group_size >= 2"
            )
        if not self.temperature > 0:
            raise ValueError(
                f"rollout.temperature={self.temperature}; sampling needs temperature > 0 "
                "(greedy decoding is Engine.greedy, used for eval)"
            )
        if self.max_new_tokens >= self.max_model_len:
            raise ValueError(
                f"rollout.max_new_tokens={self.max_new_tokens} leaves no room for a prompt within "
                f"rollout.max_model_len={self.max_model_len}: lower max_new_tokens or raise max_model_len"
            )
        if self.device == "cuda" and self.num_gpus_per_worker <= 0:
            raise ValueError(
                "rollout.device='cuda' but rollout.num_gpus_per_worker=0: give each worker a GPU "
                "(e.g. num_gpus_per_worker: 1) or set device: cpu"
            )
        return self
