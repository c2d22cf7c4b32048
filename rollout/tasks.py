"""Verifiable tasks: prompt generators with exact verifiers and a held-out split.

Contract: a task yields `Problem`s whose `prompt` and `answer` use only `task.alphabet`; the
verifier scores a completion 1.0 iff it equals the answer exactly (after stripping the end-of-sequence
marker), else 0.0. Train and eval splits are disjoint by construction: a problem belongs to the eval
split iff a stable hash of its operands falls in the eval bucket, so no eval problem is ever trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Iterator
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ARITHMETIC_ALPHABET = "0123456789+-*="


class TaskConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["arithmetic"] = "arithmetic"
    min_digits: int = Field(1, ge=1, le=9)
    # 1-2 digit addition: learnable by a 1M-param model on one CPU core in minutes; 3 digits learned far
    # slower (tests/bench/recipe_probe.py). deploy/configs/tiny_cpu.yaml adds answer_format reversed_padded.
    max_digits: int = Field(2, ge=1, le=9)
    ops: tuple[Literal["+", "-", "*"], ...] = ("+",)
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    eval_size: int = Field(200, ge=1)
    seed: int = 0
    # "plain": `12+345=` -> `357`. "reversed_padded" (Lee et al. 2023, "Teaching Arithmetic to Small
    # Transformers"): operands zero-padded to N=max_digits, answer zero-padded to N+1 digits and written
    # least-significant digit first, `012+345=` -> `7530`, so each answer digit depends on one column + carry.
    answer_format: Literal["plain", "reversed_padded"] = "plain"

    @model_validator(mode="after")
    def _digits(self) -> TaskConfig:
        if self.min_digits > self.max_digits:
            raise ValueError(
                f"task.min_digits={self.min_digits} > task.max_digits={self.max_digits}; set min_digits <= max_digits"
            )
        if not self.ops:
            raise ValueError("task.ops is empty; give at least one of '+', '-', '*'")
        if self.answer_format == "reversed_padded" and tuple(self.ops) != ("+",):
            raise ValueError(f"task.answer_format='reversed_padded' supports only ops=('+',), got {self.ops}")
        return self


@dataclasses.dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    task: str


class ArithmeticTask:
    """`a op b =` with operands of `min_digits..max_digits` digits; answer is the exact integer."""

    name = "arithmetic"
    alphabet = ARITHMETIC_ALPHABET

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg

    def _operand(self, rng: random.Random) -> int:
        d = rng.randint(self.cfg.min_digits, self.cfg.max_digits)
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)

    def _is_eval(self, a: int, op: str, b: int) -> bool:
        h = hashlib.blake2b(f"{a}{op}{b}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") / 2**64 < self.cfg.eval_fraction

    def _make(self, a: int, op: str, b: int) -> Problem:
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        if self.cfg.answer_format == "reversed_padded":
            n = self.cfg.max_digits
            return Problem(
                prompt=f"{a:0{n}d}{op}{b:0{n}d}=", answer=str(value).zfill(n + 1)[::-1], task=f"{self.name}{op}"
            )
        return Problem(prompt=f"{a}{op}{b}=", answer=str(value), task=f"{self.name}{op}")

    def _draw(self, rng: random.Random, want_eval: bool) -> Problem:
        while True:
            a, b, op = self._operand(rng), self._operand(rng), rng.choice(self.cfg.ops)
            if self._is_eval(a, op, b) == want_eval:
                return self._make(a, op, b)

    def train_stream(self, seed: int | None = None) -> Iterator[Problem]:
        """Endless stream of training problems (never an eval problem)."""
        rng = random.Random(self.cfg.seed if seed is None else seed)
        while True:
            yield self._draw(rng, want_eval=False)

    def eval_set(self) -> list[Problem]:
        """The fixed held-out split: `eval_size` problems, the same for every run with this config."""
        rng = random.Random(10_000 + self.cfg.seed)
        return [self._draw(rng, want_eval=True) for _ in range(self.cfg.eval_size)]

    @staticmethod
    def score(problem: Problem, completion: str) -> float:
        return 1.0 if completion.strip() == problem.answer else 0.0


def make_task(cfg, tokenizer=None):
    """The task for `cfg`: a `TaskConfig` (generated arithmetic) or a `rollout.datasets.DatasetTaskConfig`
    (a JSONL prompt file, validated row by row with `tokenizer`'s prompt encoding, which it then needs)."""
    if isinstance(cfg, TaskConfig):
        return ArithmeticTask(cfg)
    from rollout.datasets import DatasetTaskConfig, make_dataset_task
    from rollout.evaluation import encode_prompt

    if not isinstance(cfg, DatasetTaskConfig):
        raise TypeError(f"unknown task config {type(cfg).__name__}; expected TaskConfig or DatasetTaskConfig")
    if tokenizer is None:
        raise ValueError("a dataset task checks prompt lengths in tokens: pass the policy's tokenizer to make_task")
    return make_dataset_task(cfg, lambda prompt: encode_prompt(tokenizer, prompt))
