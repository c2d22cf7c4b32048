"""Process rewards: step scores by hand, their placement on the tokens that end the steps, and the traces
that sample_groups builds with them (scripted engine, the real char tokenizer)."""

from __future__ import annotations

import pytest

from learner.tiny_model import build_tokenizer
from rollout.engine import FINISH_STOP, Completion
from rollout.render import RenderConfig, Renderer
from rollout.sampling import drop_uniform_groups, sample_groups
from rollout.step_rewards import (
    StepRewardConfig,
    completion_token_rewards,
    step_scores,
    token_rewards,
)
from rollout.tasks import ARITHMETIC_ALPHABET, ArithmeticTask, Problem, TaskConfig

DIGITS = StepRewardConfig(kind="answer_digits", coef=0.1)
EQUATIONS = StepRewardConfig(kind="equations", coef=0.5)


def test_answer_digits_scores_each_position_against_gold():
    p = Problem("12+9=", "120", "arithmetic+")
    assert step_scores(DIGITS, p, "120") == [(1, 1.0), (2, 1.0), (3, 1.0)]
    assert step_scores(DIGITS, p, "1301") == [(1, 1.0), (2, -1.0), (3, 1.0), (4, -1.0)]  # extra digit: wrong
    assert step_scores(DIGITS, p, "") == []


def test_equations_checks_each_delimited_step_by_arithmetic():
    text = "7+5=12\n1+4+8=12\n2*3-1=5\nnote\n<answer>132</answer>"
    p = Problem("47+85=", "132", "t")
    # correct, wrong (13), correct (precedence), not an equation (0); the answer line is no step
    assert step_scores(EQUATIONS, p, text) == [(7, 1.0), (16, -1.0), (24, 1.0), (29, 0.0)]
    assert step_scores(EQUATIONS, p, "12=12\n") == [(6, 0.0)]  # no computation


def test_token_rewards_land_on_the_token_that_ends_each_step():
    # tokens "ab", "c\n", "de\n", "f": text ends at 2, 4, 7, 8
    ends = [2, 4, 7, 8]
    assert token_rewards([(4, 1.0), (7, -1.0)], ends, 0.5) == (0.0, 0.5, -0.5, 0.0)
    assert token_rewards([(3, 1.0)], ends, 1.0) == (0.0, 1.0, 0.0, 0.0)  # a step ending inside a token
    assert token_rewards([(99, 1.0)], ends, 1.0) == (0.0, 0.0, 0.0, 1.0)  # cut text: the last token


def test_traces_carry_step_rewards_and_the_stop_token_gets_none():
    tok = build_tokenizer(ARITHMETIC_ALPHABET)
    renderer = Renderer(RenderConfig(), tok)
    task = ArithmeticTask(TaskConfig(answer_format="reversed_padded", step_reward={"kind": "answer_digits"}))
    p = task._make(12, "+", 9)  # "12+09=" -> "120"
    chars = {ch: 3 + i for i, ch in enumerate(ARITHMETIC_ALPHABET)}

    def comp(text):
        ids = tuple(chars[c] for c in text) + (tok.eos_token_id,)
        return Completion(ids, tuple(-0.5 for _ in ids), FINISH_STOP)

    class Engine:
        policy_version = 0

        def generate(self, prompts, n, seed=None):
            return [[comp("120"), comp("100")]]

    def rewards(problem, ids):
        return completion_token_rewards(task.cfg.step_reward, problem, ids, renderer.completion_text)

    traces = sample_groups(Engine(), [p], renderer, task.score, 2, step_rewards=rewards)
    assert [t.reward for t in traces] == [1.0, 0.0]
    assert traces[0].token_rewards == pytest.approx((0.1, 0.1, 0.1, 0.0))
    assert traces[1].token_rewards == pytest.approx((0.1, -0.1, 0.1, 0.0))
    assert task.step_scores(p, "100") == [(1, 1.0), (2, -1.0), (3, 1.0)]
    assert ArithmeticTask(TaskConfig()).step_scores(p, "100") == []


def test_groups_that_differ_only_in_step_rewards_are_kept():
    from replay.schema import Trace

    def t(g, reward, tok):
        return Trace(g, (1,), (5, 6), (-1.0, -1.0), reward, 0, token_rewards=tok)

    traces = [t("a", 0.0, (0.1, 0.0)), t("a", 0.0, (-0.1, 0.0)), t("b", 0.0, (0.1, 0.0)), t("b", 0.0, (0.1, 0.0))]
    kept, dropped = drop_uniform_groups(traces)
    assert [x.group_id for x in kept] == ["a", "a"] and dropped == 1
