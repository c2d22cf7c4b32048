"""Worked solutions: column addition written out by hand-computed cases, every line's arithmetic checked over
many generated problems, and the cold-start/preflight wiring."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rollout.problem import Problem
from rollout.worked_solutions import column_addition


def solve(expression: str) -> str:
    total = sum(int(t) for t in expression.split("+"))
    problem = Problem(f"Calculate {expression}.", str(total), "t", metadata=json.dumps({"expression": expression}))
    return column_addition(problem, f"<answer>{total}</answer>")


@pytest.mark.parametrize(
    "expression, text",
    [
        ("47 + 85", "7+5=12\n1+4+8=13\n<answer>132</answer>"),
        ("5 + 3", "5+3=8\n<answer>8</answer>"),
        ("99 + 1", "9+1=10\n1+9=10\n<answer>100</answer>"),
        ("7 + 85", "7+5=12\n1+8=9\n<answer>92</answer>"),
        ("867 + 821 + 999", "7+1+9=17\n1+6+2+9=18\n1+8+8+9=26\n<answer>2687</answer>"),
    ],
)
def test_hand_computed(expression, text):
    assert solve(expression) == text


@given(st.lists(st.integers(0, 99_999), min_size=2, max_size=4))
def test_every_line_is_right_and_the_answer_is_assembled_from_the_lines(terms):
    lines = solve(" + ".join(map(str, terms))).split("\n")
    steps, answer = lines[:-1], lines[-1]
    digits, carry = [], 0
    for line in steps:
        lhs, rhs = line.split("=")
        parts = [int(x) for x in lhs.split("+")]
        assert sum(parts) == int(rhs)
        assert parts[: 1 if carry else 0] == ([carry] if carry else [])  # a line opens with the carry
        digits.append(int(rhs) % 10)
        carry = int(rhs) // 10
    assembled = (str(carry) if carry else "") + "".join(map(str, reversed(digits)))
    assert answer == f"<answer>{int(assembled)}</answer>" == f"<answer>{sum(terms)}</answer>"


def test_reads_the_prompt_without_metadata_and_refuses_what_it_cannot_solve():
    assert column_addition(Problem("12+34=", "46", "t"), "46").startswith("2+4=6\n1+3=4")
    with pytest.raises(ValueError, match="column_addition writes sums"):
        column_addition(Problem("Calculate 5 - 3.", "2", "t", metadata=json.dumps({"expression": "5 - 3"})), "2")


def test_cold_start_examples_from_a_reasoning_gym_task_pass_its_verifier():
    from learner.sft import SFTConfig, training_examples
    from rollout.reasoning_gym_task import ReasoningGymTaskConfig
    from rollout.tasks import make_task

    params = {
        "min_terms": 2,
        "max_terms": 3,
        "min_digits": 1,
        "max_digits": 3,
        "operators": ["+"],
        "format_style": "simple",
        "allow_parentheses": False,
        "allow_negation": False,
    }
    task = make_task(ReasoningGymTaskConfig(name="basic_arithmetic", params=params, max_prompt_tokens=64, eval_size=10))
    for problem, text in itertools.islice(training_examples(task, SFTConfig(worked_solutions="column_addition")), 50):
        assert "\n" in text or len(str(problem.answer)) == 1
        assert task.score(problem, text) == 1.0
    with pytest.raises(ValueError, match="keep one"):
        SFTConfig(worked_solutions="column_addition", solutions_path="x.jsonl")
