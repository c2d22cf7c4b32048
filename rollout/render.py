"""Prompt rendering and stop conditions: THE mapping between task text and token ids, for every component.

Contract (every engine call, the SFT cold start, evaluation and the learner see exactly these ids):
- `mode: raw`: `tokenizer.encode(prompt, add_special_tokens=True)` - the tokenizer's own special tokens,
  so a BOS appears iff the tokenizer's post-processor adds one (Llama: yes, Qwen: no), as HF and vLLM do
  for a text prompt.
- `mode: chat`: the tokenizer's chat template over `[system_prompt?] + the problem's turns` (one user
  turn holding `problem.prompt`, or `problem.messages`), rendered to text with `add_generation_prompt`
  and encoded with `add_special_tokens=False` (the template writes its own BOS if it has one), exactly
  what `apply_chat_template(tokenize=True)` returns.
- Stop conditions: a completion ends at the first sampled token in `stop.token_ids` (the tokenizer's
  eos, the model's generation-config eos ids, `stop_tokens`, `stop_token_ids`) or at the first token
  whose decoded text completes one of `stop.strings`. That token is kept in the completion (with its
  behaviour logprob): the trace holds exactly what was sampled.
- `completion_text(ids)`: what a verifier reads: a trailing stop token dropped, decoded without special
  tokens, cut before the first stop string (vLLM's `text` with `include_stop_str_in_output=False`).
- `target_ids(problem, completion)`: the ids a cold start trains on after the prompt: the completion's
  tokens plus the token that ends the turn (chat: the template's end-of-turn token, which must be a
  stop token; raw: the first stop token id, normally the eos), i.e. a sequence rollout could sample.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from rollout.problem import Problem


class RenderError(ValueError):
    """The tokenizer cannot render what the config asks for; the message names the `render.` field."""


class RenderConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    mode: Literal["raw", "chat"] = Field(
        "raw",
        description=(
            "raw: the prompt text with the tokenizer's own special tokens (base models, the built-in char model); "
            "chat: the tokenizer's chat template (instruct models, the built-in BPE model)"
        ),
    )
    system_prompt: str | None = Field(
        None,
        description="chat mode: a system turn put before every prompt that has none (e.g. 'answer in \\boxed{}')",
    )
    add_generation_prompt: bool = Field(
        True,
        description="chat mode: end the prompt with the template's assistant header; false only for templates that "
        "open the assistant turn themselves",
    )
    stop_at_eos: bool = Field(
        True,
        description="stop at the tokenizer's eos and the model's generation_config eos ids; false = only the stop "
        "tokens/strings below (or max_new_tokens) end a completion",
    )
    stop_tokens: tuple[str, ...] = Field(
        (),
        description="token strings that end a completion, e.g. ['<|im_end|>']; each must be one token of the "
        "vocabulary (checked at start-up and by --dry-run)",
    )
    stop_token_ids: tuple[int, ...] = Field(
        (), description="token ids that end a completion (as vLLM's stop_token_ids); each must be inside the vocabulary"
    )
    stop_strings: tuple[str, ...] = Field(
        (),
        description="texts that end a completion once the decoded completion contains them (vLLM's `stop`, e.g. "
        "'</answer>'); the text a verifier reads is cut before the first one",
    )


@dataclasses.dataclass(frozen=True)
class StopConditions:
    """What ends a completion in both engines (see module docstring)."""

    token_ids: frozenset[int]
    strings: tuple[str, ...] = ()


def model_eos_ids(model_dir: str | Path) -> set[int]:
    """eos ids the model's `config.json` and `generation_config.json` declare (vLLM stops at these too)."""
    out: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = Path(model_dir) / name
        if path.exists():
            eos = json.loads(path.read_text()).get("eos_token_id")
            out.update([eos] if isinstance(eos, int) else (eos or []))
    return out


class Renderer:
    """`RenderConfig` bound to one tokenizer (and the model's declared eos ids)."""

    def __init__(self, cfg: RenderConfig, tokenizer, model_eos: Iterable[int] = ()):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.vocab_size = len(tokenizer)
        if cfg.mode == "chat" and not getattr(tokenizer, "chat_template", None):
            raise RenderError(
                "render.mode='chat' but the tokenizer has no chat_template: use a tokenizer that ships one "
                "(tokenizer_config.json / chat_template.jinja), or set render.mode=raw"
            )
        self.stop = StopConditions(frozenset(self._stop_ids(model_eos)), tuple(cfg.stop_strings))
        if not self.stop.token_ids and not self.stop.strings:
            raise RenderError(
                "no stop condition: the tokenizer has no eos and render.stop_tokens / stop_token_ids / stop_strings "
                "are empty (or render.stop_at_eos=false); every completion would run to max_new_tokens"
            )

    @classmethod
    def from_pretrained(cls, cfg: RenderConfig, model_dir: str | Path) -> Renderer:
        from transformers import AutoTokenizer

        return cls(cfg, AutoTokenizer.from_pretrained(str(model_dir)), model_eos_ids(model_dir))

    def _stop_ids(self, model_eos: Iterable[int]) -> set[int]:
        ids: set[int] = set()
        if self.cfg.stop_at_eos:
            eos = self.tokenizer.eos_token_id
            ids.update(([] if eos is None else [eos]) + [i for i in model_eos if i < self.vocab_size])
        for tok in self.cfg.stop_tokens:
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if tid is None or tid == self.tokenizer.unk_token_id or self.tokenizer.convert_ids_to_tokens(tid) != tok:
                raise RenderError(
                    f"render.stop_tokens: {tok!r} is not a token of this tokenizer's vocabulary (it encodes to "
                    f"{self.tokenizer.encode(tok, add_special_tokens=False)}); give a single token such as "
                    f"{self.tokenizer.eos_token!r}, or put the text in render.stop_strings"
                )
            ids.add(tid)
        for tid in self.cfg.stop_token_ids:
            if not 0 <= tid < self.vocab_size:
                raise RenderError(
                    f"render.stop_token_ids: {tid} is outside the vocabulary [0, {self.vocab_size}); give ids of "
                    "this tokenizer (tokenizer.convert_tokens_to_ids)"
                )
            ids.add(tid)
        return ids

    # -- prompts ----------------------------------------------------------------------------------
    def messages(self, problem: Problem) -> list[dict[str, str]]:
        """The chat turns of `problem` (chat mode): system prompt (unless the turns have one) + its turns."""
        turns = [{"role": r, "content": c} for r, c in problem.messages] if problem.messages else None
        turns = turns or [{"role": "user", "content": problem.prompt}]
        if self.cfg.system_prompt is not None and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": self.cfg.system_prompt})
        return turns

    def prompt_text(self, problem: Problem) -> str:
        if self.cfg.mode == "raw":
            if problem.messages:
                raise RenderError(
                    f"a problem of task {problem.task!r} is a list of chat turns, which render.mode='raw' cannot "
                    "render: set render.mode=chat"
                )
            return problem.prompt
        return self._chat(self.messages(problem), self.cfg.add_generation_prompt)

    def encode_prompt(self, problem: Problem) -> list[int]:
        """The prompt's token ids; ValueError if the tokenizer cannot represent the text (unknown token)."""
        text = self.prompt_text(problem)
        ids = self.tokenizer.encode(text, add_special_tokens=self.cfg.mode == "raw")
        self._check_known(text, ids)
        if not ids:
            raise ValueError(f"prompt {text!r} encodes to no tokens")
        return ids

    def _chat(self, turns: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _check_known(self, text: str, ids: Sequence[int]) -> None:
        unk = self.tokenizer.unk_token_id
        if unk is not None and unk in ids and (self.tokenizer.unk_token or "\0") not in text:
            bad = sorted({ch for ch in text if unk in self.tokenizer.encode(ch, add_special_tokens=False)})
            raise ValueError(
                f"text {text[:80]!r} holds characters {bad} the tokenizer does not know; build the built-in "
                "model's tokenizer on the task's text, or skip the row"
            )

    # -- completions ------------------------------------------------------------------------------
    def completion_text(self, ids: Sequence[int]) -> str:
        """The text a verifier reads (see module docstring)."""
        ids = list(ids)
        if ids and ids[-1] in self.stop.token_ids:
            ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop.strings) if i >= 0), default=len(text))
        return text[:cut]

    def target_ids(self, problem: Problem, completion: str) -> list[int]:
        """Token ids of `completion` as the model should produce them after `encode_prompt(problem)`, ending
        with the stop token that closes the turn (what the SFT cold start trains on)."""
        ids = self._chat_suffix(problem, completion) if self.cfg.mode == "chat" else None
        if ids is None:
            ids = [*self.tokenizer.encode(completion, add_special_tokens=False), self.end_id]
        self._check_known(completion, ids)
        return ids

    @property
    def end_id(self) -> int:
        """The stop token a raw-mode target ends with: the eos when it stops a completion, else the lowest stop id."""
        eos = self.tokenizer.eos_token_id
        if eos in self.stop.token_ids:
            return eos
        if not self.stop.token_ids:
            raise RenderError("a cold-start target needs a stop token to end with: set render.stop_tokens")
        return min(self.stop.token_ids)

    def _chat_suffix(self, problem: Problem, completion: str) -> list[int] | None:
        """The assistant turn as the template writes it, cut after its first stop token; None when the
        template does not render the conversation as prompt + continuation (then: completion + end_id)."""
        prompt = self.prompt_text(problem)
        full = self._chat([*self.messages(problem), {"role": "assistant", "content": completion}], False)
        if not full.startswith(prompt):
            return None
        suffix = self.tokenizer.encode(full[len(prompt) :], add_special_tokens=False)
        end = next((i for i, t in enumerate(suffix) if t in self.stop.token_ids), None)
        if end is None:
            raise RenderError(
                f"the chat template ends an assistant turn with {full[len(prompt) + len(completion) :]!r}, which "
                "holds no stop token: add the template's end-of-turn token (e.g. '<|im_end|>') to render.stop_tokens"
            )
        return suffix[: end + 1]

    def describe_stop(self) -> str:
        """The stop conditions with their token strings, for --dry-run."""
        toks = ", ".join(f"{i} {self.tokenizer.convert_ids_to_tokens(i)!r}" for i in sorted(self.stop.token_ids))
        return f"stop token ids: [{toks}]; stop strings: {list(self.stop.strings)}"
