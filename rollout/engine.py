"""The `Engine` protocol: one rollout engine (vLLM or HF) behind one interface.

Contract (both implementations, checked by tests/unit/rollout/test_engine_hf.py and
tests/integration/test_engine_vllm.py):
- prompts arrive as token ids (rendered by `rollout.render.Renderer`); completions are token ids.
- `generate` samples `n` completions per prompt with the `RolloutConfig`'s temperature / top_p /
  max_new_tokens; a completion stops at the first token in `stop.token_ids` or the first token whose
  decoded text (without special tokens) completes one of `stop.strings` (`rollout.render.StopConditions`;
  default: the model's eos ids). That token is its last (with its logprob): the ids are exactly what was
  sampled. Every completion has >= 1 token (`max_new_tokens >= 1`).
- `Completion.logprobs[t]` is the behaviour policy's log-prob of `token_ids[t]` under the *sampling*
  distribution (after temperature and top-p renormalisation); at temperature 1, top_p 1 it is
  `log_softmax(logits)[token]`.
- `greedy` returns argmax completions under the same stop conditions, the stop token included when reached.
- `teacher_forced_logprobs` is at temperature 1 and never reads KV computed under older weights.
- `load_weights` takes HF checkpoint names (as in `model.state_dict()`), full tensors in any floating
  dtype (cast on load, so a bf16 wire needs no up-cast copy), and updates the live engine in place as
  they stream in (never holding the whole update), then sets `policy_version`. Each tensor's name and
  shape are checked before it is applied; if the stream fails midway the engine holds a mix, so
  `reload_initial_weights` puts the starting weights (and `policy_version` 0) back.

`import rollout.engine` imports neither vllm nor transformers; `make_engine` imports lazily.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from rollout.config import RolloutConfig
from rollout.render import StopConditions

if TYPE_CHECKING:
    import torch

FINISH_STOP = "stop"  # sampled a stop token or completed a stop string
FINISH_LENGTH = "length"  # hit max_new_tokens


@dataclass(frozen=True)
class Completion:
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str  # FINISH_STOP | FINISH_LENGTH


class EngineNeedsWeights(RuntimeError):
    """A weight update broke midway and the engine went back to its starting weights: it must not generate
    until a complete update arrives (its traces would be labelled with a policy_version older than ones it
    already produced)."""


class Engine(Protocol):
    policy_version: int

    def generate(self, prompts: Sequence[Sequence[int]], n: int, seed: int | None = None) -> list[list[Completion]]: ...

    def greedy(self, prompts: Sequence[Sequence[int]]) -> list[tuple[int, ...]]: ...

    def teacher_forced_logprobs(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]: ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], policy_version: int) -> None: ...

    def reload_initial_weights(self) -> None: ...

    def shutdown(self) -> None: ...


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_prompt_len: int) -> None:
    """Raise ValueError naming the first prompt that is empty, too long or holds an unknown token id."""
    if len(prompts) == 0:
        raise ValueError("no prompts given: pass at least one prompt (a sequence of token ids)")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: encode it with at least one token (e.g. <bos>)")
        if len(p) > max_prompt_len:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens but at most {max_prompt_len} fit (rollout.max_model_len less "
                "the tokens to generate or score): shorten the prompt or raise rollout.max_model_len"
            )
        bad = [t for t in p if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} holds token ids {bad} outside the vocabulary [0, {vocab_size})")


def check_max_model_len(cfg: RolloutConfig, max_position_embeddings: int) -> None:
    if cfg.max_model_len > max_position_embeddings:
        raise ValueError(
            f"rollout.max_model_len={cfg.max_model_len} exceeds the model's max_position_embeddings="
            f"{max_position_embeddings}: set rollout.max_model_len <= {max_position_embeddings}"
        )


def check_weights(named_tensors: Sequence[tuple[str, torch.Tensor]], shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise before any weight is applied if a name is unknown or a shape differs from the model's."""
    for name, tensor in named_tensors:
        if name not in shapes:
            raise KeyError(f"load_weights: {name!r} is not a parameter of this model; send HF state_dict names")
        if tuple(tensor.shape) != tuple(shapes[name]):
            raise ValueError(
                f"load_weights: {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(shapes[name])}"
            )


def default_stop(model_dir: str | Path) -> StopConditions:
    """The model's own eos ids (config.json and generation_config.json): what stops a completion when the
    caller gives no `StopConditions`."""
    from rollout.render import model_eos_ids

    eos = model_eos_ids(model_dir)
    if not eos:
        raise ValueError(f"{model_dir}: the model config has no eos_token_id; set it, or pass stop conditions")
    return StopConditions(frozenset(eos))


def checked_weights(
    named_tensors: Iterable[tuple[str, torch.Tensor]], shapes: dict[str, tuple[int, ...]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """`named_tensors`, lazily, each checked (`check_weights`) before it is handed on."""
    for name, tensor in named_tensors:
        check_weights([(name, tensor)], shapes)
        yield name, tensor.detach()


def make_engine(cfg: RolloutConfig, model_dir: str | Path, stop: StopConditions | None = None) -> Engine:
    """Build the engine `cfg.engine` names on the HF-format model in `model_dir`, stopping completions at
    `stop` (default: the model's eos ids)."""
    if not (Path(model_dir) / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} holds no config.json: pass a directory with an HF-format model")
    stop = stop or default_stop(model_dir)
    if cfg.engine == "vllm":
        from rollout.engine_vllm import VLLMEngine

        return VLLMEngine(cfg, model_dir, stop)
    from rollout.engine_hf import HFEngine

    return HFEngine(cfg, model_dir, stop)
