"""Tasks: where prompts come from and how completions are scored, behind one `Task` protocol.

Contract of every task source (`TASK_SOURCES`: the built-in arithmetic here, prompt datasets in
rollout/datasets.py, reasoning-gym generators in rollout/reasoning_gym_task.py):
- `train_stream(seed)` is an endless stream of training `Problem`s and never yields an eval problem;
  `eval_set()` is the fixed held-out split, the same for every run with the config.
- `score(problem, completion_text)` is the task's verifier (rollout/verifiers.py, `task.verifier`), the
  same function for rollout rewards and evaluation; a user's `reward.function` replaces it for both.
- `skipped_rows` counts the rows (or generated problems) left out, by reason; `{}` when none were.
- `corpus(n)`: up to n training texts (prompts and reference completions), e.g. to train the built-in
  model's tokenizer before any tokenizer exists.

Arithmetic: `a op b =` with an exact integer answer; a problem belongs to the eval split iff a stable
hash of its operands falls in the eval bucket, so no eval problem is ever trained on.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rollout.problem import Problem
from rollout.verifiers import ExactConfig, VerifierConfig, make_verifier

if TYPE_CHECKING:
    from rollout.render import Renderer

__all__ = ["ARITHMETIC_ALPHABET", "ArithmeticTask", "Problem", "Task", "TaskConfig", "make_task"]

ARITHMETIC_ALPHABET = "0123456789+-*="


class Task(Protocol):
    name: str
    skipped_rows: dict[str, int]

    def train_stream(self, seed: int | None = None) -> Iterator[Problem]: ...

    def eval_set(self) -> list[Problem]: ...

    def score(self, problem: Problem, completion: str) -> float: ...

    def reference_completion(self, problem: Problem) -> str: ...

    def corpus(self, n: int) -> list[str]: ...


class TaskConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["arithmetic"] = Field("arithmetic", description="generated integer arithmetic problems")
    min_digits: int = Field(1, ge=1, le=9, description="fewest digits per operand")
    # 1-2 digit addition: learnable by a 1M-param model on one CPU core in minutes; 3 digits learned far
    # slower (tests/bench/recipe_probe.py). deploy/configs/tiny_cpu.yaml adds answer_format reversed_padded.
    max_digits: int = Field(2, ge=1, le=9, description="most digits per operand (the main difficulty knob)")
    ops: tuple[Literal["+", "-", "*"], ...] = Field(("+",), description="operators problems are drawn from")
    eval_fraction: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="share of the problem space (by a hash of the problem) held out: never trained on, only evaluated",
    )
    eval_size: int = Field(200, ge=1, description="held-out problems scored at each evaluation (a fixed set)")
    seed: int = Field(0, description="seeds the training-problem stream and the held-out set")
    # "plain": `12+345=` -> `357`. "reversed_padded" (Lee et al. 2023, "Teaching Arithmetic to Small
    # Transformers"): operands zero-padded to N=max_digits, answer zero-padded to N+1 digits and written
    # least-significant digit first, `012+345=` -> `7530`, so each answer digit depends on one column + carry.
    answer_format: Literal["plain", "reversed_padded"] = Field(
        "plain",
        description="`plain` answers as written; `reversed_padded` zero-pads and reverses the digits (tiny models)",
    )
    verifier: VerifierConfig = Field(
        default_factory=ExactConfig,
        description="how completions are scored (rollout/verifiers.py); default: exact match of the whole completion",
    )

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


class VerifiedTask:
    """Scoring shared by every task source: its `cfg.verifier`, built once (picklable)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.verifier = make_verifier(cfg.verifier)
        self.skipped_rows: dict[str, int] = {}

    def score(self, problem: Problem, completion: str) -> float:
        return self.verifier.score(problem, completion)

    def reference_completion(self, problem: Problem) -> str:
        return self.verifier.reference_completion(problem)

    def corpus(self, n: int) -> list[str]:
        problems = [p for _, p in zip(range(n), self.train_stream())]
        return [text for p in problems for text in (p.prompt, self.reference_completion(p))]


class ArithmeticTask(VerifiedTask):
    """`a op b =` with operands of `min_digits..max_digits` digits; answer is the exact integer."""

    name = "arithmetic"
    alphabet = ARITHMETIC_ALPHABET

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

    @classmethod
    def from_config(cls, cfg: TaskConfig, renderer: Renderer | None = None) -> ArithmeticTask:
        return cls(cfg)


# kind -> "module:class" with `from_config(cfg, renderer)`; imported on use so `import rollout.tasks`
# stays cheap (reasoning-gym and pyarrow load only for the tasks that need them).
TASK_SOURCES = {
    "arithmetic": "rollout.tasks:ArithmeticTask",
    "dataset": "rollout.datasets:DatasetTask",
    "reasoning_gym": "rollout.reasoning_gym_task:ReasoningGymTask",
}


def make_task(cfg, renderer: Renderer | None = None) -> Task:
    """The task source `cfg.kind` names. A `renderer` lets sources check prompt lengths in rendered
    tokens (datasets need one; without it they cannot skip over-long rows and raise)."""
    import importlib

    if getattr(cfg, "kind", None) not in TASK_SOURCES:
        raise TypeError(f"unknown task config {type(cfg).__name__}; task.kind must be one of {list(TASK_SOURCES)}")
    module, _, cls = TASK_SOURCES[cfg.kind].partition(":")
    return getattr(importlib.import_module(module), cls).from_config(cfg, renderer)
