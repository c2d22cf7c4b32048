"""Worked solutions: column addition written out by hand-computed cases, every line's arithmetic checked over
many generated problems, and the cold-start/preflight wiring."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rollout.problem import Problem
from rollout.worked_solutions import column_addition, rewrite_chain, running_sum


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


def chain(expression: str, total: int) -> str:
    problem = Problem(f"Compute {expression} =", str(total), "t", metadata=json.dumps({"expression": expression}))
    return running_sum(problem, f"<answer>{total}</answer>")


@pytest.mark.parametrize(
    "expression, total, text",
    [
        ("23 + 45 + 12", 80, "23 + 45 = 68\n68 + 12 = 80\n<answer>80</answer>"),
        ("4 - 1 + 7 + 7 - 7", 10, "4 - 1 = 3\n3 + 7 = 10\n10 + 7 = 17\n17 - 7 = 10\n<answer>10</answer>"),
        ("1 - 5 + 2", -2, "1 - 5 = -4\n-4 + 2 = -2\n<answer>-2</answer>"),
        ("-3 + 9", 6, "-3 + 9 = 6\n<answer>6</answer>"),
    ],
)
def test_running_sum_hand_computed(expression, total, text):
    assert chain(expression, total) == text


def test_running_sum_reads_the_prompt_without_metadata_and_rejects_other_operators():
    problem = Problem("State the final answer: 5 + 9 - 7 =", "7", "t")
    assert running_sum(problem, "<answer>7</answer>") == "5 + 9 = 14\n14 - 7 = 7\n<answer>7</answer>"
    with pytest.raises(ValueError, match="running_sum writes chains of \\+ and -.*chain_sum"):
        running_sum(Problem("Calculate 3 * 4.", "12", "t", metadata=json.dumps({"expression": "3 * 4"})), "x")


@given(st.integers(-99, 99), st.lists(st.tuples(st.sampled_from("+-"), st.integers(0, 99)), min_size=1, max_size=10))
def test_running_sum_lines_chain_and_end_at_the_value(first, steps):
    expression = f"{first} " + " ".join(f"{op} {n}" for op, n in steps)
    total = first + sum(n if op == "+" else -n for op, n in steps)
    lines = chain(expression, total).split("\n")
    assert len(lines) == len(steps) + 1 and lines[-1] == f"<answer>{total}</answer>"
    running = first
    for line, (op, n) in zip(lines, steps):
        lhs, rhs = line.split(" = ")
        assert lhs == f"{running} {op} {n}"  # each line starts from the previous result
        running = int(rhs)
        assert running == eval(lhs)  # noqa: S307 -- a generated integer expression
    assert running == total


def test_running_sum_on_reasoning_gym_chain_sum_is_accepted_by_the_verifier():
    from learner.sft import SFTConfig, training_examples
    from rollout.reasoning_gym_task import ReasoningGymTaskConfig
    from rollout.tasks import make_task

    params = {"min_terms": 4, "max_terms": 8, "min_digits": 1, "max_digits": 2}
    task = make_task(ReasoningGymTaskConfig(name="chain_sum", params=params, max_prompt_tokens=96, eval_size=10))
    examples = list(itertools.islice(training_examples(task, SFTConfig(worked_solutions="running_sum")), 50))
    assert len(examples) == 50
    for problem, text in examples:
        assert task.score(problem, text) == 1.0
        assert 3 <= text.count("\n") <= 7  # 4-8 terms: 3-7 steps before the answer


def test_rewrite_chain_hand_computed():
    problem = Problem("State the final answer: 4 - 1 + 17 + 7 - 7 =", "20", "t")
    assert (
        rewrite_chain(problem, "<answer>20</answer>")
        == "= 3 + 17 + 7 - 7\n= 20 + 7 - 7\n= 27 - 7\n= 20\n<answer>20</answer>"
    )
    problem = Problem("x", "-6", "t", metadata=json.dumps({"expression": "1 - 5 - 2"}))
    assert rewrite_chain(problem, "<answer>-6</answer>") == "= -4 - 2\n= -6\n<answer>-6</answer>"
    with pytest.raises(ValueError, match="rewrite_chain writes chains"):
        rewrite_chain(Problem("Calculate 3 * 4.", "12", "t"), "x")


@given(st.integers(-99, 99), st.lists(st.tuples(st.sampled_from("+-"), st.integers(0, 99)), min_size=1, max_size=10))
def test_rewrite_chain_each_line_equals_the_one_before_with_one_step_done(first, steps):
    expression = f"{first} " + " ".join(f"{op} {n}" for op, n in steps)
    total = first + sum(n if op == "+" else -n for op, n in steps)
    problem = Problem("x", str(total), "t", metadata=json.dumps({"expression": expression}))
    lines = rewrite_chain(problem, f"<answer>{total}</answer>").split("\n")
    assert len(lines) == len(steps) + 1 and lines[-1] == f"<answer>{total}</answer>"
    before = expression
    for line in lines[:-1]:
        assert line.startswith("= ")
        after = line[2:]
        assert eval(after) == eval(before)  # noqa: S307 -- generated integer expressions
        assert after.count(" ") == before.count(" ") - 2  # exactly one operator and operand consumed
        assert after.split(" ", 1)[1:] == before.split(" ", 3)[3:]  # the rest copied verbatim
        before = after
    assert before == str(total)
