"""Process rewards: per-step scores of a completion, placed as token rewards on the tokens that end the steps.

Contract:
- A step verifier (`StepRewardConfig.kind`) splits a completion's text into steps and scores each one:
  +1 a correct step, -1 a wrong one, 0 one it cannot judge. `step_scores(cfg, problem, text)` returns
  `[(end, score)]`, `end` the character offset just past the step, in text order. The answer itself is
  still scored by the task's verifier (the outcome reward); steps add to it, scaled by `cfg.coef`.
  - "answer_digits": step boundaries by the task - each character of the answer is one step, correct when it
    equals the gold answer's character at that position. With the default arithmetic format (answer written
    least-significant digit first) each digit is one column plus carry: a natural reasoning step.
  - "equations": step boundaries by a delimiter (default a newline); a step `lhs = rhs` with `lhs` integers
    joined by + - * is correct when it evaluates to `rhs` (worked solutions: column additions, reasoning-gym
    arithmetic); a step that is not such an equation scores 0. Text after the last delimiter is not a step.
- `token_rewards(scores, char_ends, coef)` puts `coef * score` on the first token whose decoded text reaches the
  step's end; `char_ends[k]` is the length of the text of tokens `[:k+1]` (`char_ends_of`).
Outcome vs process supervision: Lightman et al. 2023 ("Let's Verify Step by Step"), Uesato et al. 2022;
DeepSeek-R1 reports process rewards unsuccessful at scale - both are available here so they can be compared.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rollout.problem import Problem

_EQUATION = re.compile(r"^\s*(-?\d+(?:\s*[-+*]\s*-?\d+)*)\s*=\s*(-?\d+)\s*$")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


class StepRewardConfig(BaseModel):
    """Per-step rewards of a task (module docstring); None on the task = outcome rewards only."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["answer_digits", "equations"] = Field(
        description="'answer_digits': each answer character is a step, checked against the gold answer; "
        "'equations': delimiter-separated `a+b=c` steps checked by arithmetic (worked solutions)"
    )
    coef: float = Field(
        0.1,
        gt=0,
        description="reward per step: +coef if correct, -coef if wrong, added to the outcome reward at the step's "
        "last token. Keep the sum of step rewards below the outcome reward so a right answer still dominates",
    )
    delimiter: str = Field("\n", min_length=1, description="'equations': the text that ends a step")


def _evaluate(expression: str) -> int:
    """Integer value of `expression` (integers, unary minus, + - * with the usual precedence)."""

    def walk(node) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"not integer arithmetic: {expression!r}")

    return walk(ast.parse(expression, mode="eval").body)


def _equation_score(step: str) -> float:
    m = _EQUATION.match(step)
    if m is None:
        return 0.0
    # a lone number "x=y" is not a computation: leave it to the outcome
    if not re.search(r"\d\s*[-+*]", m.group(1)):
        return 0.0
    return 1.0 if _evaluate(m.group(1)) == int(m.group(2)) else -1.0


def step_scores(cfg: StepRewardConfig, problem: Problem, text: str) -> list[tuple[int, float]]:
    """`[(end offset, score)]` of `text`'s steps (module docstring)."""
    if cfg.kind == "answer_digits":
        gold = problem.answer
        return [(i + 1, 1.0 if i < len(gold) and ch == gold[i] else -1.0) for i, ch in enumerate(text)]
    out, start = [], 0
    while (at := text.find(cfg.delimiter, start)) >= 0:
        end = at + len(cfg.delimiter)
        out.append((end, _equation_score(text[start:at])))
        start = end
    return out


def char_ends_of(decode: Callable[[list[int]], str], ids: Sequence[int]) -> list[int]:
    """`[len(decode(ids[:k+1])) for k]`: where each token's text ends in the decoded completion."""
    return [len(decode(list(ids[: k + 1]))) for k in range(len(ids))]


def token_rewards(scores: Sequence[tuple[int, float]], char_ends: Sequence[int], coef: float) -> tuple[float, ...]:
    """Per-token rewards: `coef * score` on the first token whose text reaches each step's end.

    A step ending past the last token (cut text) lands on the last token."""
    out = [0.0] * len(char_ends)
    k = 0
    for end, score in scores:
        while k < len(char_ends) - 1 and char_ends[k] < end:
            k += 1
        out[k] += coef * score
    return tuple(out)


def completion_token_rewards(
    cfg: StepRewardConfig, problem: Problem, ids: Sequence[int], text_of: Callable[[Sequence[int]], str]
) -> tuple[float, ...]:
    """Token rewards `[len(ids)]` of one completion; `text_of` is what the verifier reads for a token prefix
    (`Renderer.completion_text`), so step offsets and token ends are measured in the same text."""
    ends = char_ends_of(lambda prefix: text_of(prefix), ids)
    return token_rewards(step_scores(cfg, problem, text_of(ids)), ends, cfg.coef)
