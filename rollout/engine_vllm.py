"""`VLLMEngine`: the `Engine` protocol on an in-process vLLM `LLM` (CPU or CUDA, same code).

Contract: as `rollout/engine.py`, plus:
- in-process engine core (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, forced): weight tensors pass to the
  workers by reference, start-up is seconds, and `shutdown` frees the engine's /dev/shm segment.
- behaviour logprobs are vLLM's `processed_logprobs` (after temperature and top-p), i.e. the
  sampling distribution's; `teacher_forced_logprobs` uses `prompt_logprobs` at temperature 1.
- `load_weights` streams the tensors into vLLM's in-place reload (`weights_iterator`: vLLM loads them
  layer by layer and casts to its dtype), then resets the prefix cache: KV cached under the old weights
  would otherwise be reused for a repeated prompt
  (tests/integration/test_engine_vllm.py::test_without_prefix_cache_reset_cached_prompt_is_stale shows it).
- stop conditions: `stop_token_ids` = `stop.token_ids` (vLLM's own eos rule is off, `ignore_eos`, so the
  set is exactly the caller's), `stop` = `stop.strings`; detokenisation is on only when there are stop
  strings (vLLM matches them on the incrementally decoded text). Either way the completion's token ids
  and logprobs are every sampled token up to and including the one that stopped it.
- `step_hook` (None by default): if set, `generate` drives the engine step by step and calls it
  between steps, where it may `load_weights` ("pause" in-flight updates, weight_sync.inflight):
  running sequences keep their KV from the old weights and continue on the new ones. The prefix
  cache cannot be reset while requests run, so that reset happens as soon as the generation ends.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rollout.config import RolloutConfig

if TYPE_CHECKING:
    import torch
from rollout.engine import (
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    check_max_model_len,
    check_prompts,
    checked_weights,
    default_stop,
)
from rollout.render import StopConditions


def _set_env(cfg: RolloutConfig) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # vLLM reads whole GiB; round up so a fractional request still gets at least what it asked for.
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(cfg.kv_cache_gib)))


def _check_platform(cfg: RolloutConfig) -> None:
    from vllm.platforms import current_platform

    if current_platform.device_type != cfg.device:
        raise RuntimeError(
            f"rollout.device={cfg.device!r} but the installed vLLM runs on {current_platform.device_type!r}: "
            "set rollout.device to match, or install the vLLM build for that device"
        )


class _RotaryReloadNotice(logging.Filter):
    """Drops vLLM's per-reload "RotaryEmbedding: Failed to load weights": the rotary cos/sin cache is a
    buffer, not a checkpoint weight; vLLM puts it back unchanged (tests/integration/test_spine_weights.py
    checks logprobs after reloads to 1e-4). Likewise "ParallelLMHead: ..." for tied embeddings: the head's
    weight is the embedding's, loaded under that name, and `_refresh_tied_lm_head` re-derives the rest
    (tests/integration/test_bpe_weights.py). Every other warning passes."""

    QUIET = ("RotaryEmbedding: Failed to load weights", "ParallelLMHead: Failed to load weights")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in self.QUIET


def _quiet_weight_reloads() -> None:
    """A weight update per learner step would otherwise log three INFO lines per step; INFO comes back
    with VLLM_LOGGING_LEVEL=INFO."""
    logging.getLogger("vllm").setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "WARNING").upper())
    reload_logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _RotaryReloadNotice) for f in reload_logger.filters):
        reload_logger.addFilter(_RotaryReloadNotice())


class VLLMEngine:
    def __init__(self, cfg: RolloutConfig, model_dir: str | Path, stop: StopConditions | None = None):
        _set_env(cfg)
        from transformers import AutoConfig
        from vllm import LLM

        _check_platform(cfg)
        hf_config = AutoConfig.from_pretrained(str(model_dir))
        check_max_model_len(cfg, hf_config.max_position_embeddings)
        self.cfg = cfg
        self.stop = stop or default_stop(model_dir)
        self.vocab_size = hf_config.vocab_size
        self.policy_version = 0
        self.step_hook: Callable[[], None] | None = None
        self._generating = False
        self._reset_pending = False
        self._shapes = _checkpoint_shapes(Path(model_dir))
        self._tied_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.llm = LLM(
            model=str(model_dir),
            dtype=cfg.dtype,
            seed=cfg.seed,
            max_model_len=cfg.max_model_len,
            enforce_eager=cfg.enforce_eager,
            enable_prefix_caching=cfg.enable_prefix_caching,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            logprobs_mode="processed_logprobs",
            **({} if cfg.block_size is None else {"block_size": cfg.block_size}),
            **_cpu_scheduling(cfg),
        )
        _quiet_weight_reloads()

    def generate(self, prompts: Sequence[Sequence[int]], n: int, seed: int | None = None) -> list[list[Completion]]:
        from vllm import SamplingParams

        if n < 1:
            raise ValueError(f"n={n}: ask for at least one completion per prompt")
        params = [
            SamplingParams(
                n=n,
                temperature=self.cfg.temperature,
                top_p=self.cfg.top_p,
                max_tokens=self.cfg.max_new_tokens,
                seed=s,
                logprobs=0,
                **self._stop_params(),
            )
            for s in _prompt_seeds(seed, len(prompts))
        ]
        run = self._run if self.step_hook is None else self._run_stepwise
        outs = run(prompts, params, self.cfg.max_model_len - self.cfg.max_new_tokens)
        return [[_completion(o) for o in out.outputs] for out in outs]

    def greedy(self, prompts: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=self.cfg.max_new_tokens, **self._stop_params())
        outs = self._run(prompts, params, self.cfg.max_model_len - self.cfg.max_new_tokens)
        return [tuple(out.outputs[0].token_ids) for out in outs]

    def _stop_params(self) -> dict:
        return {
            "ignore_eos": True,
            "stop_token_ids": sorted(self.stop.token_ids),
            "stop": list(self.stop.strings) or None,
            "detokenize": bool(self.stop.strings),
        }

    def teacher_forced_logprobs(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
        from vllm import SamplingParams

        ids = list(prompt_ids) + list(completion_ids)
        params = SamplingParams(temperature=1.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
        # One position is left for the single token vLLM must generate after the prompt.
        check_prompts([prompt_ids], self.vocab_size, self.cfg.max_model_len - 1 - len(completion_ids))
        (out,) = self._run([ids], params, self.cfg.max_model_len - 1)
        return [out.prompt_logprobs[t][ids[t]].logprob for t in range(len(prompt_ids), len(ids))]

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], policy_version: int) -> None:
        # Each tensor is checked before vLLM sees it; a reload that fails inside vLLM leaves the engine
        # unusable until a complete one (the caller then uses `reload_initial_weights`).
        weights = checked_weights(named_tensors, self._shapes)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self._after_reload(policy_version)

    def reload_initial_weights(self) -> None:
        """The starting weights from the model directory (after an update that failed midway)."""
        self.llm.collective_rpc("reload_weights", kwargs={"is_checkpoint_format": True})
        self._after_reload(0)

    def _after_reload(self, policy_version: int) -> None:
        if self._tied_embeddings:
            self.llm.collective_rpc(_refresh_tied_lm_head)
        self.policy_version = policy_version
        if self._generating:  # a pause update: requests are running, reset once they are done
            self._reset_pending = True
            return
        self._reset_prefix_cache()

    def _reset_prefix_cache(self) -> None:
        self._reset_pending = False
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight update (requests still running?)")

    def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None

    def _run(self, prompts: Sequence[Sequence[int]], params, max_prompt_len: int):
        from vllm.inputs import TokensPrompt

        check_prompts(prompts, self.vocab_size, max_prompt_len)
        token_prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
        return self.llm.generate(token_prompts, sampling_params=params, use_tqdm=False)

    def _run_stepwise(self, prompts: Sequence[Sequence[int]], params, max_prompt_len: int):
        """As `_run`, one engine step at a time with `step_hook` between steps (vLLM's own loop is
        `LLM._run_engine`: the same enqueue / step / collect-finished)."""
        from vllm.inputs import TokensPrompt

        check_prompts(prompts, self.vocab_size, max_prompt_len)
        engine = self.llm.llm_engine
        self.llm.enqueue(
            [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts],
            sampling_params=params,
            use_tqdm=False,
        )
        done = {}
        self._generating = True
        try:
            while engine.has_unfinished_requests():
                done.update((out.request_id, out) for out in engine.step() if out.finished)
                if engine.has_unfinished_requests():
                    self.step_hook()
        finally:
            self._generating = False
        if self._reset_pending:
            self._reset_prefix_cache()
        if len(done) != len(prompts):
            raise RuntimeError(
                f"vLLM finished {len(done)} requests for {len(prompts)} prompts in a stepwise generation"
            )
        return sorted(
            done.values(), key=lambda out: int(out.request_id)
        )  # request ids count up in enqueue order, as in LLM._run_engine


def _refresh_tied_lm_head(worker) -> None:
    """With tied embeddings the LM head shares the embedding's weight, which a reload updates under the
    embedding's name; but the head's own derived state (on CPU a oneDNN-prepacked copy of that weight,
    `cpu_linear`) is built once after loading and a reload that sends no `lm_head.*` tensor leaves it
    stale: logits kept the old weights (tests/integration/test_bpe_weights.py compares vLLM's logprobs with
    the learner's after a broadcast). Rebuild it."""
    head = worker.model_runner.model.lm_head
    head.quant_method.process_weights_after_loading(head)


def _cpu_scheduling(cfg: RolloutConfig) -> dict:
    """No chunked prefill on CPU. A prompt prefilled in chunks has its sampled token discarded and vLLM then
    rewinds that request's seeded generator (`Generator.set_offset`), which a CPU generator does not
    support: the engine crashes once a batch of seeded prompts exceeds max_num_batched_tokens (4096 on
    CPU, e.g. 256 samples of 35-token chat prompts). Whole-prompt scheduling never discards a token."""
    return {"enable_chunked_prefill": False} if cfg.device == "cpu" else {}


def _checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape, from the safetensors headers (no tensor data read)."""
    from safetensors import safe_open

    shapes = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    if not shapes:
        raise FileNotFoundError(f"{model_dir} holds no *.safetensors weights: save the model with safe_serialization")
    return shapes


def _prompt_seeds(seed: int | None, n_prompts: int) -> list[int | None]:
    """One independent seed per prompt. vLLM seeds a prompt's i-th sample with `seed + i`, so one
    shared seed would give every prompt the same noise (identical completions on a flat model)."""
    if seed is None:
        return [None] * n_prompts
    rng = random.Random(seed)
    return [rng.getrandbits(48) for _ in range(n_prompts)]


def _completion(out) -> Completion:
    """One vLLM `CompletionOutput` -> `Completion` (the stopping token kept, with its logprob)."""
    ids = tuple(out.token_ids)
    logprobs = tuple(step[tok].logprob for step, tok in zip(out.logprobs, ids))
    reason = FINISH_STOP if out.finish_reason == "stop" else FINISH_LENGTH
    return Completion(ids, logprobs, reason)
