"""rollout.tasks: the `reversed_padded` answer format (Lee et al. 2023) and the unchanged `plain` format."""

from __future__ import annotations

import itertools

import pytest
from pydantic import ValidationError

from rollout.tasks import ArithmeticTask, Problem, TaskConfig


def rev(max_digits: int = 3, **kw) -> ArithmeticTask:
    return ArithmeticTask(TaskConfig(max_digits=max_digits, answer_format="reversed_padded", **kw))


@pytest.mark.parametrize(
    "n,a,b,prompt,answer",
    [
        (3, 47, 385, "047+385=", "2340"),  # 432 -> 0432 -> reversed
        (3, 999, 999, "999+999=", "8991"),  # 1998
        (3, 0, 0, "000+000=", "0000"),
        (3, 5, 5, "005+005=", "0100"),  # 10 -> 0010
        (3, 500, 500, "500+500=", "0001"),  # 1000
        (2, 7, 86, "07+86=", "390"),  # 93 -> 093
        (4, 1234, 8766, "1234+8766=", "00001"),  # 10000
    ],
)
def test_reversed_padded_hand_computed(n, a, b, prompt, answer):
    task = rev(n)
    p = task._make(a, "+", b)
    assert (p.prompt, p.answer, p.task) == (prompt, answer, "arithmetic+")
    assert task.score(p, answer) == 1.0 and task.reference_completion(p) == answer
    assert task.score(p, answer[::-1]) == 0.0 or answer == answer[::-1]
    assert task.score(p, str(a + b)) == 0.0 or str(a + b) == answer


def test_reversed_padded_stream_is_well_formed():
    task = rev(3)
    for p in itertools.islice(task.train_stream(seed=1), 500):
        a, b = p.prompt[:-1].split("+")
        assert len(a) == len(b) == 3 and len(p.answer) == 4
        assert int(p.answer[::-1]) == int(a) + int(b)
        assert set(p.prompt + p.answer) <= set(task.alphabet)


@pytest.mark.parametrize("fmt", ["plain", "reversed_padded"])
def test_eval_and_train_disjoint(fmt):
    task = ArithmeticTask(TaskConfig(max_digits=2, answer_format=fmt, eval_size=300))
    evals = task.eval_set()
    train = list(itertools.islice(task.train_stream(seed=0), 5000))
    assert len(evals) == 300
    assert not {p.prompt for p in evals} & {p.prompt for p in train}
    assert task.eval_set() == evals  # fixed split


def test_formats_share_the_split():
    """Same operands land in the same split whatever the format (the hash is over operands only)."""
    plain, r = ArithmeticTask(TaskConfig(max_digits=3)), rev(3)
    for a, b in [(1, 2), (47, 385), (999, 0), (123, 456)]:
        assert plain._is_eval(a, "+", b) == r._is_eval(a, "+", b)
    strip = lambda s: "+".join(str(int(x)) for x in s[:-1].split("+")) + "="  # noqa: E731
    assert [strip(p.prompt) for p in r.eval_set()] == [p.prompt for p in plain.eval_set()]


def test_plain_unchanged():
    cfg = TaskConfig()
    assert cfg.answer_format == "plain"
    task = ArithmeticTask(cfg)
    assert task._make(47, "+", 385) == Problem(prompt="47+385=", answer="432", task="arithmetic+")
    assert task._make(3, "-", 9) == Problem(prompt="3-9=", answer="-6", task="arithmetic-")
    first = list(itertools.islice(task.train_stream(seed=0), 3))
    explicit = list(itertools.islice(ArithmeticTask(TaskConfig(answer_format="plain")).train_stream(seed=0), 3))
    assert first == explicit
    for p in itertools.islice(task.train_stream(seed=0), 200):
        a, b = p.prompt[:-1].split("+")
        assert p.answer == str(int(a) + int(b)) and a == str(int(a)) and b == str(int(b))


def test_reversed_padded_rejects_other_ops():
    with pytest.raises(ValidationError, match="reversed_padded"):
        TaskConfig(answer_format="reversed_padded", ops=("+", "*"))
