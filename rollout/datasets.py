"""Prompt datasets from local files, read as hostile input: bad rows are counted, never fatal by surprise.

Sources (`format`, `auto` picks by path): a JSONL file (one JSON object per line; blank lines are not
rows), a Parquet file, or a directory written by HF `datasets`' `save_to_disk` (a `Dataset`, or a
`DatasetDict` with `split` chosen). Fields are mapped by `prompt_key` / `answer_key` (strings; a
numeric answer is taken as its text) or, with `messages_key`, a list of `{"role", "content"}` chat
turns: the turns before a trailing assistant turn are the prompt, and the answer is `answer_key` when
present, else that trailing assistant turn. `task_key` (optional) names the task in traces.

A row is bad (counted in `skipped_rows` under exactly one reason, checked in this order) when it is:
`invalid_utf8`, `invalid_json` (JSONL only), `wrong_type` (not an object, or a mapped field of the
wrong type), `missing_field`, `empty_prompt`, `empty_answer`, `unencodable` (lone surrogates, or the
renderer raises ValueError) or `too_long` (more than `max_prompt_tokens` ids after rendering, so the
count includes the chat template and any BOS). Every other row is kept, duplicates included. With
`on_bad_row="error"` the first bad row raises `DatasetError` naming the file, row and reason.

Split: eval prompts are chosen by a seeded hash of the prompt (`Problem.key`), so the split is
deterministic for a seed and independent of row order, and train and eval never share a prompt
(duplicates of an eval prompt all go to eval, so `eval_size` counts distinct prompts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rollout.problem import Problem
from rollout.tasks import VerifiedTask
from rollout.verifiers import ExactConfig, VerifierConfig

DEFAULT_TASK_NAME = "dataset"
Encode = Callable[[Problem], list[int]]


class DatasetTaskConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["dataset"] = Field("dataset", description="a prompt dataset from local files")
    path: str = Field(description="a local JSONL or Parquet file, or a datasets save_to_disk directory, on every node")
    format: Literal["auto", "jsonl", "parquet", "hf_disk"] = Field(
        "auto", description="auto: a directory is hf_disk, *.parquet is parquet, anything else jsonl"
    )
    split: str | None = Field(
        None, description="hf_disk DatasetDict: the split to read (None = 'train', or the only split)"
    )
    prompt_key: str = Field("prompt", description="the column holding the prompt text")
    answer_key: str = Field("answer", description="the column holding the reference answer")
    messages_key: str | None = Field(
        None, description="a column of chat turns [{role, content}] used as the prompt instead of prompt_key"
    )
    task_key: str = Field("task", description="optional column naming each row's task (default 'dataset')")
    max_prompt_tokens: int = Field(ge=1, description="rows longer than this after rendering are skipped (too_long)")
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="at most this fraction of prompts is held out")
    eval_size: int = Field(200, ge=1, description="at most this many distinct prompts are held out")
    seed: int = Field(0, description="seeds the split and the training order")
    on_bad_row: Literal["skip", "error"] = Field("skip", description="skip (and count) bad rows, or stop at the first")
    verifier: VerifierConfig = Field(
        default_factory=ExactConfig, description="how completions are scored (rollout/verifiers.py)"
    )


class DatasetError(ValueError):
    """The dataset cannot be used; the message names the file (and row) and the fix."""


@dataclasses.dataclass(frozen=True)
class LoadedDataset:
    train: list[Problem]
    eval: list[Problem]
    skipped: dict[str, int]


class _BadRow(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# -- reading rows ---------------------------------------------------------------------------------
def _resolve_format(cfg: DatasetTaskConfig) -> str:
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DatasetError(
            f"dataset {cfg.path!r} does not exist (task.path); give a local JSONL/Parquet file or a "
            "save_to_disk directory present on every rollout node"
        )
    if cfg.format != "auto":
        return cfg.format
    return "hf_disk" if path.is_dir() else "parquet" if path.suffix == ".parquet" else "jsonl"


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict | _BadRow]]:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield f"{path}:{line_no}", _BadRow("invalid_utf8", f"not UTF-8 ({e})")
                continue
            except json.JSONDecodeError as e:
                yield f"{path}:{line_no}", _BadRow("invalid_json", f"not JSON ({e})")
                continue
            yield f"{path}:{line_no}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict | _BadRow]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DatasetError(f"dataset {str(path)!r} is not a readable Parquet file ({e}); check task.format") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}:row {i}", row


def _hf_disk_rows(path: Path, split: str | None) -> Iterator[tuple[str, dict | _BadRow]]:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DatasetError(f"{str(path)!r} is not a datasets save_to_disk directory ({e}); check task.format") from None
    if isinstance(data, datasets.DatasetDict):
        names = list(data)
        name = split or ("train" if "train" in data else names[0] if len(names) == 1 else None)
        if name not in data:
            raise DatasetError(f"{str(path)!r} holds splits {names}; set task.split to one of them")
        data = data[name]
    for i, row in enumerate(data):
        yield f"{path}:row {i}", row


def read_rows(cfg: DatasetTaskConfig) -> Iterator[tuple[str, dict | _BadRow]]:
    """(location, row or the reason it could not be read) for every row of the dataset."""
    fmt, path = _resolve_format(cfg), Path(cfg.path).expanduser()
    if fmt == "hf_disk":
        return _hf_disk_rows(path, cfg.split)
    if not path.is_file():
        raise DatasetError(f"dataset {cfg.path!r} is not a file; task.format={fmt!r} reads a file")
    return _parquet_rows(path) if fmt == "parquet" else _jsonl_rows(path)


# -- one row -> one Problem -----------------------------------------------------------------------
def _text(row: dict, key: str, required: bool, numbers: bool = False) -> str | None:
    if key not in row or (row[key] is None and not required):
        if required:
            raise _BadRow("missing_field", f"missing field {key!r}")
        return None
    value = row[key]
    if numbers and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise _BadRow("wrong_type", f"field {key!r} is a {type(value).__name__}, expected a string")
    return value


def _turns(row: dict, key: str) -> list[tuple[str, str]]:
    if key not in row:
        raise _BadRow("missing_field", f"missing field {key!r}")
    value = row[key]
    ok = isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )
    if not ok:
        raise _BadRow("wrong_type", f"field {key!r} must be a list of {{'role': str, 'content': str}} turns")
    return [(m["role"], m["content"]) for m in value]


def row_problem(row: Any, cfg: DatasetTaskConfig) -> Problem:
    """The Problem a parsed row describes (no token checks); raises _BadRow."""
    if not isinstance(row, dict):
        raise _BadRow("wrong_type", f"row is a JSON {type(row).__name__}, expected an object")
    task = _text(row, cfg.task_key, required=False) or DEFAULT_TASK_NAME
    if cfg.messages_key is None:
        prompt, answer = _text(row, cfg.prompt_key, True), _text(row, cfg.answer_key, True, numbers=True)
        messages = None
    else:
        turns = _turns(row, cfg.messages_key)
        answer = _text(row, cfg.answer_key, required=False, numbers=True)
        if turns and turns[-1][0] == "assistant":
            last = turns.pop()[1]
            answer = last if answer is None else answer
        if answer is None:
            raise _BadRow("missing_field", f"no {cfg.answer_key!r} field and no trailing assistant turn")
        messages = tuple(turns)
        prompt = next((c for r, c in reversed(turns) if r == "user"), "")
    if not prompt.strip():
        raise _BadRow("empty_prompt", "prompt is empty or whitespace")
    if not answer.strip():
        raise _BadRow("empty_answer", "answer is empty or whitespace")
    return Problem(prompt=prompt, answer=answer, task=task, messages=messages)


def _check_tokens(problem: Problem, encode: Encode, max_tokens: int) -> Problem:
    try:
        for text in (problem.prompt, problem.answer, problem.task, *(c for _, c in problem.messages or ())):
            text.encode("utf-8")
        n_tokens = len(encode(problem))
    except (UnicodeEncodeError, ValueError) as e:
        raise _BadRow("unencodable", f"text cannot be encoded ({e})") from None
    if n_tokens > max_tokens:
        raise _BadRow("too_long", f"prompt is {n_tokens} tokens after rendering, over max_prompt_tokens={max_tokens}")
    return problem


def _read_problems(cfg: DatasetTaskConfig, encode: Encode) -> tuple[list[Problem], dict[str, int]]:
    kept, skipped = [], {}
    for where, row in read_rows(cfg):
        try:
            if isinstance(row, _BadRow):
                raise row
            kept.append(_check_tokens(row_problem(row, cfg), encode, cfg.max_prompt_tokens))
        except _BadRow as bad:
            if cfg.on_bad_row == "error":
                raise DatasetError(f"{where}: {bad.reason}: {bad}; fix the row or set task.on_bad_row='skip'") from None
            skipped[bad.reason] = skipped.get(bad.reason, 0) + 1
    return kept, skipped


def _split(rows: list[Problem], cfg: DatasetTaskConfig) -> tuple[list[Problem], list[Problem]]:
    def rank(key: str) -> bytes:
        return hashlib.blake2b(f"{cfg.seed}\0{key}".encode(), digest_size=8).digest()

    keys = sorted({p.key for p in rows}, key=rank)
    n_eval = min(cfg.eval_size, math.ceil(cfg.eval_fraction * len(keys)), len(keys) - 1)
    eval_keys = set(keys[:n_eval])
    return [p for p in rows if p.key not in eval_keys], [p for p in rows if p.key in eval_keys]


def load_prompt_dataset(cfg: DatasetTaskConfig, encode: Encode) -> LoadedDataset:
    """Read, validate (`encode` renders a Problem to its prompt ids) and split; see the module docstring."""
    rows, skipped = _read_problems(cfg, encode)
    if len({p.key for p in rows}) < 2:
        raise DatasetError(
            f"dataset {cfg.path!r} has {len(rows)} valid row(s) with distinct prompts "
            f"(skipped: {skipped}); need at least 2 for a train and an eval split"
        )
    train, eval_ = _split(rows, cfg)
    return LoadedDataset(train=train, eval=eval_, skipped=skipped)


def dataset_texts(cfg: DatasetTaskConfig) -> list[str]:
    """The prompt, turn and answer texts of every row that parses, before any tokenizer exists (the built-in
    model's tokenizer is built from them)."""
    texts: list[str] = []
    for _, row in read_rows(cfg):
        try:
            p = row_problem(row, cfg) if not isinstance(row, _BadRow) else None
        except _BadRow:
            continue
        if p is not None:
            texts += [p.prompt, p.answer, *(c for _, c in p.messages or ())]
    return texts


class DatasetTask(VerifiedTask):
    """A loaded prompt dataset behind the `rollout.tasks.Task` protocol."""

    name = DEFAULT_TASK_NAME

    def __init__(self, cfg: DatasetTaskConfig, data: LoadedDataset):
        super().__init__(cfg)
        self.data = data
        self.skipped_rows = dict(data.skipped)

    @classmethod
    def from_config(cls, cfg: DatasetTaskConfig, renderer=None) -> DatasetTask:
        if renderer is None:
            raise ValueError("a dataset task checks prompt lengths in rendered tokens: pass the policy's Renderer")
        return cls(cfg, load_prompt_dataset(cfg, renderer.encode_prompt))

    def train_stream(self, seed: int | None = None) -> Iterator[Problem]:
        """Endless stream of training problems: each pass is a fresh seeded shuffle (never an eval prompt)."""
        rng = random.Random(self.cfg.seed if seed is None else seed)
        while True:
            yield from rng.sample(self.data.train, len(self.data.train))

    def eval_set(self) -> list[Problem]:
        return list(self.data.eval)
