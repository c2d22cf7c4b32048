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

    engine: Literal["vllm", "hf"] = Field(
        "vllm", description="`vllm` (paged KV cache, prefix caching, in-place weight reload) or `hf` (transformers)"
    )
    device: Literal["cpu", "cuda"] = Field("cpu", description="where engines run; must equal learner.device")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="engine weights and activations; bfloat16 on GPUs (the learner's logprobs stay fp32)"
    )
    group_size: int = Field(
        8, description="completions sampled per prompt (G of GRPO); larger = lower-variance advantages, more compute"
    )
    prompts_per_step: int = Field(
        8, ge=1, description="prompts (groups) per learner batch; batch size = prompts_per_step * group_size"
    )
    # DAPO's dynamic sampling, done at the source: a group whose G rewards are all equal has zero
    # group-relative advantage (GRPO, Dr.GRPO, RLOO), so it only costs
    # learner compute. Dropped before replay and counted (`uniform_groups`); replay's backlog gate then
    # dispatches more prompts, so every learner batch is `groups_per_step` groups with signal.
    drop_uniform_groups: bool = Field(
        False,
        description="drop groups whose rewards are all equal before replay (DAPO dynamic sampling); "
        "saves learner compute once many groups are all-right or all-wrong",
    )
    temperature: float = Field(
        1.0, description="sampling temperature (> 0); must equal learner.temperature so ratios compare like with like"
    )
    top_p: float = Field(
        1.0, gt=0.0, le=1.0, description="nucleus sampling; < 1 biases behaviour logprobs away from the learner's"
    )
    # >= 1 so that every completion has a token (a Trace needs one); see rollout/sampling.py.
    max_new_tokens: int = Field(8, ge=1, description="longest completion; longer ones are cut (finish reason `length`)")
    max_model_len: int = Field(64, ge=2, description="prompt + completion positions an engine holds per sequence")
    kv_cache_gib: float = Field(1.0, gt=0.0, description="vLLM on CPU: KV-cache memory per worker, GiB")
    gpu_memory_utilization: float = Field(
        0.5, gt=0.0, le=1.0, description="vLLM on GPU: share of the GPU's memory the engine may take"
    )
    enforce_eager: bool = Field(True, description="vLLM: no CUDA graphs / torch.compile (faster start, slower decode)")
    enable_prefix_caching: bool = Field(
        True, description="vLLM: reuse the KV of a shared prompt across a group's G samples; reset on each weight load"
    )
    # vLLM KV block size; None = vLLM's default (128 on CPU). Only full blocks enter the prefix cache.
    block_size: int | None = Field(None, ge=1, description="vLLM KV block size (null = vLLM's default)")
    seed: int = Field(
        0, description="sampling seed; each batch is seeded from it, the worker index and the batch count"
    )
    num_workers: int = Field(1, ge=1, description="rollout workers at start; scale live with `flywheel scale rollout`")
    num_cpus_per_worker: float = Field(1, ge=0, description="Ray CPUs each rollout worker reserves")
    num_gpus_per_worker: float = Field(0, ge=0, description="Ray GPUs each rollout worker reserves (>= 1 with cuda)")
    # Custom Ray resources per worker, e.g. {flywheel_rollout: 1}, so workers land on the rollout worker group.
    ray_resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources per worker, e.g. {flywheel_rollout: 1} to pin workers to a node group",
    )

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
