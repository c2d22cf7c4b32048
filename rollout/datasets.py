"""Prompt datasets from a local JSONL file, read as hostile input: bad rows are counted, never fatal by surprise.

Each line is `{"prompt": str, "answer": str, "task": str (optional)}`; other keys are ignored and
blank lines are not rows. A row is bad (and counted in `LoadedDataset.skipped` under exactly one
reason, checked in this order) when it is: `invalid_utf8`, `invalid_json`, `wrong_type` (not an
object, or a field that is not a string), `missing_field`, `empty_prompt`, `empty_answer`,
`unencodable` (lone surrogates, or `encode` raises ValueError) or `too_long` (more than
`max_prompt_tokens` ids from `encode`, so the count includes e.g. a <bos> the encoder adds).
Every other row is kept, duplicates included.
With `on_bad_row="error"` the first bad row raises `DatasetError` naming the file, line and reason.

Split: eval prompts are chosen by a seeded hash of the prompt text, so the split is deterministic
for a seed and independent of row order, and train and eval never share a prompt text (duplicates
of an eval prompt all go to eval, so `eval_size` counts distinct prompts).
`DatasetTask` has the interface of `rollout.tasks.ArithmeticTask`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rollout.tasks import Problem

DEFAULT_TASK_NAME = "dataset"


class DatasetTaskConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["dataset"] = "dataset"
    path: str
    max_prompt_tokens: int = Field(ge=1)
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    eval_size: int = Field(200, ge=1)
    seed: int = 0
    on_bad_row: Literal["skip", "error"] = "skip"


class DatasetError(ValueError):
    """The dataset file cannot be used; the message names the file (and line) and the fix."""


@dataclasses.dataclass(frozen=True)
class LoadedDataset:
    train: list[Problem]
    eval: list[Problem]
    skipped: dict[str, int]


class _BadRow(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _parse(raw: bytes, encode: Callable[[str], list[int]], max_tokens: int) -> Problem:
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _BadRow("invalid_utf8", f"not UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise _BadRow("invalid_json", f"not JSON ({e})") from None
    if not isinstance(row, dict):
        raise _BadRow("wrong_type", f"row is a JSON {type(row).__name__}, expected an object")
    for key, value in row.items():
        if key in ("prompt", "answer", "task") and not isinstance(value, str):
            raise _BadRow("wrong_type", f"field {key!r} is a {type(value).__name__}, expected a string")
    missing = [k for k in ("prompt", "answer") if k not in row]
    if missing:
        raise _BadRow("missing_field", f"missing field(s) {missing}")
    return _check_text(row, encode, max_tokens)


def _check_text(row: dict, encode: Callable[[str], list[int]], max_tokens: int) -> Problem:
    prompt, answer = row["prompt"], row["answer"]
    if not prompt.strip():
        raise _BadRow("empty_prompt", "prompt is empty or whitespace")
    if not answer.strip():
        raise _BadRow("empty_answer", "answer is empty or whitespace")
    try:
        for text in (prompt, answer, row.get("task", "")):
            text.encode("utf-8")
        n_tokens = len(encode(prompt))
    except (UnicodeEncodeError, ValueError) as e:
        raise _BadRow("unencodable", f"text cannot be encoded ({e})") from None
    if n_tokens > max_tokens:
        raise _BadRow("too_long", f"prompt is {n_tokens} tokens, over max_prompt_tokens={max_tokens}")
    return Problem(prompt=prompt, answer=answer, task=row.get("task") or DEFAULT_TASK_NAME)


def _read_rows(cfg: DatasetTaskConfig, encode: Callable[[str], list[int]]) -> tuple[list[Problem], dict[str, int]]:
    path = Path(cfg.path)
    if not path.is_file():
        raise DatasetError(
            f"dataset file {cfg.path!r} does not exist or is not a file (task.path); give a local JSONL "
            "file present on every rollout node"
        )
    kept, skipped = [], {}
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                kept.append(_parse(raw, encode, cfg.max_prompt_tokens))
            except _BadRow as bad:
                if cfg.on_bad_row == "error":
                    raise DatasetError(
                        f"{cfg.path}:{line_no}: {bad.reason}: {bad}; fix the row or set task.on_bad_row='skip'"
                    ) from None
                skipped[bad.reason] = skipped.get(bad.reason, 0) + 1
    return kept, skipped


def _split(rows: list[Problem], cfg: DatasetTaskConfig) -> tuple[list[Problem], list[Problem]]:
    def rank(prompt: str) -> bytes:
        return hashlib.blake2b(f"{cfg.seed}\0{prompt}".encode(), digest_size=8).digest()

    prompts = sorted({p.prompt for p in rows}, key=rank)
    n_eval = min(cfg.eval_size, math.ceil(cfg.eval_fraction * len(prompts)), len(prompts) - 1)
    eval_prompts = set(prompts[:n_eval])
    return [p for p in rows if p.prompt not in eval_prompts], [p for p in rows if p.prompt in eval_prompts]


def load_prompt_dataset(cfg: DatasetTaskConfig, encode: Callable[[str], list[int]]) -> LoadedDataset:
    """Read, validate and split `cfg.path`; see the module docstring for what counts as a bad row."""
    rows, skipped = _read_rows(cfg, encode)
    if len({p.prompt for p in rows}) < 2:
        raise DatasetError(
            f"dataset file {cfg.path!r} has {len(rows)} valid row(s) with distinct prompts "
            f"(skipped: {skipped}); need at least 2 for a train and an eval split"
        )
    train, eval_ = _split(rows, cfg)
    return LoadedDataset(train=train, eval=eval_, skipped=skipped)


class DatasetTask:
    """A loaded prompt dataset behind the `ArithmeticTask` interface; scoring is exact match after strip."""

    name = DEFAULT_TASK_NAME
    alphabet = None  # any text the tokenizer accepts; unencodable rows were skipped at load

    def __init__(self, cfg: DatasetTaskConfig, data: LoadedDataset):
        self.cfg, self.data = cfg, data

    def train_stream(self, seed: int | None = None) -> Iterator[Problem]:
        """Endless stream of training problems: each pass is a fresh seeded shuffle (never an eval prompt)."""
        rng = random.Random(self.cfg.seed if seed is None else seed)
        while True:
            yield from rng.sample(self.data.train, len(self.data.train))

    def eval_set(self) -> list[Problem]:
        return list(self.data.eval)

    @staticmethod
    def score(problem: Problem, completion: str) -> float:
        return 1.0 if completion.strip() == problem.answer.strip() else 0.0


def dataset_alphabet(cfg: DatasetTaskConfig) -> str:
    """Every character of the file's prompts and answers (rows that parse), for building a character
    tokenizer for the built-in model before the rows can be validated in tokens."""
    path = Path(cfg.path)
    if not path.is_file():
        raise DatasetError(f"dataset file {cfg.path!r} does not exist or is not a file (task.path)")
    chars: set[str] = set()
    with path.open("rb") as f:
        for raw in f:
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(row, dict):
                for key in ("prompt", "answer"):
                    if isinstance(row.get(key), str):
                        chars.update(row[key])
    return "".join(sorted(chars))


def make_dataset_task(cfg: DatasetTaskConfig, encode: Callable[[str], list[int]]) -> DatasetTask:
    return DatasetTask(cfg, load_prompt_dataset(cfg, encode))
