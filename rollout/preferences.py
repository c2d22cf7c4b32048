"""Preference pairs (prompt, chosen, rejected) from local files, read as hostile input like prompt datasets.

Sources are those of `rollout.datasets` (JSONL, Parquet, HF `save_to_disk`; `format: auto` picks by path).
`prompt` is a string or a list of `{"role", "content"}` turns; `chosen` and `rejected` are strings or
turn lists whose last turn is the assistant's reply. When `prompt` is absent and both replies are
conversations (the HH-RLHF layout), the turns before the final assistant turn are the prompt, and they must
be the same in both. An optional numeric `margin_key` column gives a per-pair margin for the
Bradley–Terry loss (Llama 2's preference-strength margin).

Each pair is rendered with the rollout `Renderer` (prompt ids exactly as rollout encodes them; replies as
the cold start's targets, ending with the turn's stop token), so a reward model or DPO policy sees the
token sequences the policy will later produce.

A row is bad (counted in `skipped` under exactly one reason) when it is: `invalid_utf8`, `invalid_json`,
`wrong_type`, `missing_field`, `empty_prompt`, `empty_reply` (chosen or rejected blank), `identical_replies`,
`prompt_mismatch` (conversation prefixes differ), `unencodable` or `too_long` (prompt + longer reply over
`max_tokens`). With `on_bad_row="error"` the first bad row raises `DatasetError` naming file, row and reason.
With `deduplicate` (the default) a row rendering to the same prompt, chosen and rejected ids as an earlier
row is dropped and counted as `duplicate`; a repeat is not malformed, so it never raises.

Split: held-out pairs are chosen by a seeded hash of the prompt, so no prompt is in both splits.

Verified pairs (`verified_pairs`): those whose chosen reply the task's verifier accepts (score >= 1) and
whose rejected reply it does not (score < 1). A pair on a prompt without a reference answer cannot be
verified and is dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rollout.datasets import DatasetError, _BadRow, read_rows
from rollout.problem import Problem

Turns = list[tuple[str, str]]


class PreferenceDataConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str = Field(description="a local JSONL or Parquet file, or a datasets save_to_disk directory")
    format: Literal["auto", "jsonl", "parquet", "hf_disk"] = Field(
        "auto", description="auto: a directory is hf_disk, *.parquet is parquet, anything else jsonl"
    )
    split: str | None = Field(None, description="hf_disk DatasetDict: the split to read (None = 'train' or the only)")
    prompt_key: str = Field("prompt", description="column of the prompt (a string or chat turns); may be absent")
    chosen_key: str = Field("chosen", description="column of the preferred reply (a string or chat turns)")
    rejected_key: str = Field("rejected", description="column of the dispreferred reply (a string or chat turns)")
    margin_key: str | None = Field(
        None, description="optional numeric column: how strongly chosen beats rejected (Bradley–Terry margin)"
    )
    answer_key: str = Field(
        "answer", description="optional column with a reference answer, so a verifier can score held-out prompts"
    )
    max_tokens: int = Field(512, ge=2, description="pairs whose prompt + longer reply exceed this are skipped")
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="at most this fraction of prompts is held out")
    eval_size: int = Field(500, ge=1, description="at most this many distinct prompts are held out")
    seed: int = Field(0, description="seeds the held-out split")
    on_bad_row: Literal["skip", "error"] = Field("skip", description="skip (and count) bad rows, or stop at the first")
    deduplicate: bool = Field(
        True,
        description="skip a row whose (prompt, chosen, rejected) repeats an earlier row (counted as `duplicate`): "
        "sampled pairs repeat when prompts recur, and repeats over-weight those prompts and inflate held-out "
        "counts; turn off only when repetition is a deliberate weighting",
    )


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """One rendered pair: token ids as the policy sees them, plus the problem (for verifier evaluation)."""

    problem: Problem
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    margin: float = 0.0


@dataclasses.dataclass(frozen=True)
class LoadedPreferences:
    train: list[PreferencePair]
    eval: list[PreferencePair]
    skipped: dict[str, int]


def _turns(value: Any, key: str) -> Turns | None:
    if isinstance(value, str):
        return None
    ok = isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )
    if not ok or not value:
        raise _BadRow("wrong_type", f"field {key!r} must be a string or a non-empty list of {{role, content}} turns")
    return [(m["role"], m["content"]) for m in value]


def _reply(row: dict, key: str) -> tuple[Turns | None, str]:
    """(the conversation before the reply or None, the reply text) of a chosen/rejected field."""
    if key not in row or row[key] is None:
        raise _BadRow("missing_field", f"missing field {key!r}")
    turns = _turns(row[key], key)
    if turns is None:
        return None, row[key]
    if turns[-1][0] != "assistant":
        raise _BadRow("wrong_type", f"field {key!r} must end with an assistant turn")
    return turns[:-1], turns[-1][1]


def _prompt(row: dict, cfg: PreferenceDataConfig, prefix: Turns | None) -> tuple[str, tuple | None]:
    value = row.get(cfg.prompt_key)
    if value is None:
        if not prefix:
            raise _BadRow("missing_field", f"missing field {cfg.prompt_key!r} (and the replies hold no prompt turns)")
        turns = prefix
    elif isinstance(value, str):
        return value, (tuple(prefix + [("user", value)]) if prefix else None)
    else:
        turns = _turns(value, cfg.prompt_key)
    user = next((c for r, c in reversed(turns) if r == "user"), "")
    return user, tuple(turns)


def row_pair(row: Any, cfg: PreferenceDataConfig) -> tuple[Problem, str, str, float]:
    """(problem, chosen text, rejected text, margin) of a parsed row; raises _BadRow."""
    if not isinstance(row, dict):
        raise _BadRow("wrong_type", f"row is a JSON {type(row).__name__}, expected an object")
    chosen_prefix, chosen = _reply(row, cfg.chosen_key)
    rejected_prefix, rejected = _reply(row, cfg.rejected_key)
    if chosen_prefix != rejected_prefix:
        raise _BadRow("prompt_mismatch", "chosen and rejected conversations differ before the final reply")
    prompt, messages = _prompt(row, cfg, chosen_prefix)
    if not prompt.strip():
        raise _BadRow("empty_prompt", "prompt is empty or whitespace")
    if not chosen.strip() or not rejected.strip():
        raise _BadRow("empty_reply", "chosen or rejected reply is empty or whitespace")
    if chosen == rejected:
        raise _BadRow("identical_replies", "chosen and rejected are the same text: the pair carries no preference")
    margin = row.get(cfg.margin_key, 0.0) if cfg.margin_key else 0.0
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not math.isfinite(margin):
        raise _BadRow("wrong_type", f"field {cfg.margin_key!r} must be a finite number")
    answer = row.get(cfg.answer_key)
    answer = str(answer) if isinstance(answer, str | int | float) and not isinstance(answer, bool) else ""
    return Problem(prompt=prompt, answer=answer, task="preferences", messages=messages), chosen, rejected, float(margin)


def encode_pair(renderer, problem: Problem, chosen: str, rejected: str, margin: float, max_tokens: int):
    """Render one pair with the rollout renderer; raises _BadRow (unencodable, too_long)."""
    try:
        prompt_ids = renderer.encode_prompt(problem)
        chosen_ids, rejected_ids = renderer.target_ids(problem, chosen), renderer.target_ids(problem, rejected)
    except (UnicodeEncodeError, ValueError) as e:
        raise _BadRow("unencodable", f"text cannot be encoded ({e})") from None
    n = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))
    if n > max_tokens:
        raise _BadRow("too_long", f"pair is {n} tokens after rendering, over max_tokens={max_tokens}")
    return PreferencePair(problem, tuple(prompt_ids), tuple(chosen_ids), tuple(rejected_ids), margin)


def pair_key(pair: PreferencePair) -> tuple:
    """What makes two pairs the same: the rendered prompt, chosen and rejected ids (not the margin)."""
    return pair.prompt_ids, pair.chosen_ids, pair.rejected_ids


def dedupe_pairs(pairs: list[PreferencePair]) -> list[PreferencePair]:
    """The first pair of each `pair_key`, in order."""
    seen: set[tuple] = set()
    out = []
    for pair in pairs:
        if pair_key(pair) not in seen:
            seen.add(pair_key(pair))
            out.append(pair)
    return out


def _read_pairs(cfg: PreferenceDataConfig, renderer) -> tuple[list[PreferencePair], dict[str, int]]:
    kept, skipped, seen = [], {}, set()
    for where, row in read_rows(cfg):
        try:
            if isinstance(row, _BadRow):
                raise row
            pair = encode_pair(renderer, *row_pair(row, cfg), cfg.max_tokens)
        except _BadRow as bad:
            if cfg.on_bad_row == "error":
                raise DatasetError(f"{where}: {bad.reason}: {bad}; fix the row or set on_bad_row='skip'") from None
            skipped[bad.reason] = skipped.get(bad.reason, 0) + 1
            continue
        if cfg.deduplicate and pair_key(pair) in seen:  # a repeat is not malformed: counted, never an error
            skipped["duplicate"] = skipped.get("duplicate", 0) + 1
            continue
        seen.add(pair_key(pair))
        kept.append(pair)
    return kept, skipped


def split_by_prompt(items: list, key: Callable[[Any], str], seed: int, fraction: float, size: int) -> tuple[list, list]:
    """(train, held-out): held-out prompts chosen by a seeded hash, so the split ignores row order."""

    def rank(k: str) -> bytes:
        return hashlib.blake2b(f"{seed}\0{k}".encode(), digest_size=8).digest()

    keys = sorted({key(x) for x in items}, key=rank)
    held = set(keys[: min(size, math.ceil(fraction * len(keys)), len(keys) - 1)])
    return [x for x in items if key(x) not in held], [x for x in items if key(x) in held]


def load_preferences(cfg: PreferenceDataConfig, renderer) -> LoadedPreferences:
    """Read, validate, render and split; see the module docstring."""
    pairs, skipped = _read_pairs(cfg, renderer)
    if len({p.problem.key for p in pairs}) < 2:
        raise DatasetError(
            f"preference data {cfg.path!r} has {len(pairs)} valid pair(s) with distinct prompts (skipped: "
            f"{skipped}); need pairs on at least 2 prompts for a train and a held-out split"
        )
    train, held = split_by_prompt(pairs, lambda p: p.problem.key, cfg.seed, cfg.eval_fraction, cfg.eval_size)
    return LoadedPreferences(train=train, eval=held, skipped=skipped)


@dataclasses.dataclass(frozen=True)
class VerifiedSplit:
    kept: list[PreferencePair]
    dropped: int  # pairs whose chosen reply failed the verifier or whose rejected reply passed it


def verified_pairs(pairs: list[PreferencePair], renderer, score: Callable[[Problem, str], float]) -> VerifiedSplit:
    """Keep the pairs with chosen verified correct and rejected verified wrong, in order.

    Sampled preference data often ranks two wrong replies by a graded score; such pairs teach a reward model
    a weak, noisy signal (the RM then learns the grade, not correctness), so a run may train on these only."""
    kept = [
        p
        for p in pairs
        if score(p.problem, renderer.completion_text(p.chosen_ids)) >= 1.0
        and score(p.problem, renderer.completion_text(p.rejected_ids)) < 1.0
    ]
    return VerifiedSplit(kept, len(pairs) - len(kept))
