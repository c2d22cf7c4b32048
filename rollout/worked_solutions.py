"""Worked solutions: step-by-step completions generated for a task's problems, for the SFT cold start.

Contract: `WORKED_SOLUTIONS[name](problem, answer_completion)` returns the text a cold start imitates for
`problem`: the steps, then `answer_completion` (the verifier's reference completion, e.g.
`<answer>132</answer>`), so the verifier accepts it exactly when it accepts the reference. A generator
raises `ValueError` naming what it cannot solve. Registered generators:

- `column_addition`: sums of non-negative integers (`a + b + ...`, read from the problem's
  `metadata.expression` or its prompt) written column by column, least significant first, each line
  starting with the carry from the line before: `47 + 85` ->
  `7+5=12\\n1+4+8=13\\n<answer>132</answer>`. Each line is one-digit arithmetic and the answer is the
  last line's sum followed by the other lines' last digits in reverse, so a small model can learn the
  algorithm (cf. Lee et al. 2023, "Teaching Arithmetic to Small Transformers": carries written out).
- `running_sum`: chains of additions and subtractions of integers (reasoning-gym `chain_sum`,
  `basic_arithmetic` with `+`/`-`), one term at a time left to right, each line starting from the
  previous line's result: `4 - 1 + 17` -> `4 - 1 = 3\n3 + 17 = 20\n<answer>20</answer>`. A chain of
  n terms is n-1 lines, so the solution's length grows with the problem (a scratchpad, Nye et al. 2021,
  "Show Your Work").
- `rewrite_chain`: the same chains, rewritten after each step with the first two terms replaced by their
  result and the rest copied: `4 - 1 + 17` -> `= 3 + 17\n= 20\n<answer>20</answer>`. Each line's
  arithmetic reads the two terms at the head of the line before, and the rest is a copy of that line at a
  fixed offset (what induction heads do, Olsson et al. 2022), where `running_sum` must find the k-th term
  of the prompt on line k; a chain of n terms is about n^2/2 terms of text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from rollout.problem import Problem

_SUM = re.compile(r"^\s*\d+(\s*\+\s*\d+)+\s*$")


def _terms(problem: Problem) -> list[int]:
    """The addends of `problem`: from reasoning-gym's `metadata.expression`, else the prompt's `a + b ...`."""
    expression = json.loads(problem.metadata).get("expression") if problem.metadata else None
    if expression is None:
        found = re.search(r"\d+(?:\s*\+\s*\d+)+", problem.prompt)
        expression = found.group(0) if found else ""
    if not _SUM.match(expression):
        raise ValueError(
            f"column_addition writes sums of non-negative integers, not {expression or problem.prompt!r}; "
            "use a task of additions only (e.g. reasoning_gym basic_arithmetic with operators ['+'])"
        )
    return [int(t) for t in expression.split("+")]


def column_addition(problem: Problem, answer_completion: str) -> str:
    terms = _terms(problem)
    lines, carry, column = [], 0, 0
    while column < max(len(str(t)) for t in terms):
        digits = [t // 10**column % 10 for t in terms if t >= 10**column or column == 0]
        parts = ([carry] if carry else []) + digits
        total = sum(parts)
        lines.append("+".join(map(str, parts)) + f"={total}")
        carry, column = total // 10, column + 1
    return "\n".join([*lines, answer_completion])


_CHAIN = re.compile(r"^\s*-?\d+(\s*[+-]\s*\d+)+\s*$")
_TERM = re.compile(r"([+-])\s*(\d+)")


def _chain(problem: Problem, writer: str) -> tuple[int, list[tuple[str, int]]]:
    """The first term and the (operator, operand) steps of `problem`'s `a + b - c ...` chain."""
    expression = json.loads(problem.metadata).get("expression") if problem.metadata else None
    if expression is None:
        found = re.search(r"-?\d+(?:\s*[+-]\s*\d+)+", problem.prompt)
        expression = found.group(0) if found else ""
    if not _CHAIN.match(expression):
        raise ValueError(
            f"{writer} writes chains of + and - over integers, not {expression or problem.prompt!r}; "
            "use a task of additions and subtractions only (e.g. reasoning_gym chain_sum)"
        )
    first = re.match(r"\s*(-?\d+)", expression)
    return int(first.group(1)), [(op, int(n)) for op, n in _TERM.findall(expression[first.end() :])]


def running_sum(problem: Problem, answer_completion: str) -> str:
    total, steps = _chain(problem, "running_sum")
    lines = []
    for op, operand in steps:
        after = total + operand if op == "+" else total - operand
        lines.append(f"{total} {op} {operand} = {after}")
        total = after
    return "\n".join([*lines, answer_completion])


def rewrite_chain(problem: Problem, answer_completion: str) -> str:
    total, steps = _chain(problem, "rewrite_chain")
    lines = []
    for i, (op, operand) in enumerate(steps):
        total = total + operand if op == "+" else total - operand
        lines.append("= " + " ".join([str(total), *(f"{o} {n}" for o, n in steps[i + 1 :])]))
    return "\n".join([*lines, answer_completion])


WORKED_SOLUTIONS: dict[str, Callable[[Problem, str], str]] = {
    "column_addition": column_addition,
    "running_sum": running_sum,
    "rewrite_chain": rewrite_chain,
}
