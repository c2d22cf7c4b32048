"""sample_groups: group structure, scoring on the rendered completion text, versions, contract errors (scripted
engine + real HF)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from learner.tiny_model import build_tokenizer
from replay.schema import batch_to_traces, traces_to_batch, validate_trace
from rollout.engine import FINISH_LENGTH, FINISH_STOP, Completion
from rollout.render import RenderConfig, Renderer
from rollout.sampling import drop_uniform_groups, sample_groups
from rollout.tasks import ARITHMETIC_ALPHABET, ArithmeticTask, Problem, TaskConfig

EOS = 2
CHARS = {ch: 3 + i for i, ch in enumerate(ARITHMETIC_ALPHABET)}
RENDERER = Renderer(RenderConfig(), build_tokenizer(ARITHMETIC_ALPHABET))
SCORE = ArithmeticTask(TaskConfig()).score


def encode(text: str) -> list[int]:
    return [1] + [CHARS[ch] for ch in text]


def done(text: str) -> Completion:
    ids = tuple(CHARS[ch] for ch in text) + (EOS,)
    return Completion(ids, tuple(-0.5 for _ in ids), FINISH_STOP)


def cut(text: str) -> Completion:
    ids = tuple(CHARS[ch] for ch in text)
    return Completion(ids, tuple(-0.25 for _ in ids), FINISH_LENGTH)


@dataclass
class ScriptedEngine:
    """Returns fixed groups in order; optionally bumps its version during generate (a concurrent update)."""

    groups: list[list[Completion]]
    policy_version: int = 4
    bump_during_generate: bool = False
    calls: list = field(default_factory=list)

    def generate(self, prompts, n, seed=None):
        self.calls.append((list(map(list, prompts)), n, seed))
        if self.bump_during_generate:
            self.policy_version += 1
        return self.groups


PROBLEMS = [Problem("1+2=", "3", "arithmetic+"), Problem("5*5=", "25", "arithmetic*")]


def test_groups_rewards_and_fields():
    eng = ScriptedEngine([[done("3"), cut("3"), done("33")], [done("25"), done(""), cut("2")]])
    traces = sample_groups(eng, PROBLEMS, RENDERER, SCORE, group_size=3, seed=9)
    assert eng.calls == [([encode("1+2="), encode("5*5=")], 3, 9)]  # one engine call for all prompts
    assert [t.reward for t in traces] == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    assert len({t.group_id for t in traces[:3]}) == 1 and len({t.group_id for t in traces[3:]}) == 1
    assert traces[0].group_id != traces[3].group_id
    assert [t.task for t in traces] == ["arithmetic+"] * 3 + ["arithmetic*"] * 3
    assert traces[0].prompt_ids == tuple(encode("1+2=")) and traces[0].completion_ids == (CHARS["3"], EOS)
    assert traces[0].behaviour_logprobs == (-0.5, -0.5)
    assert traces[4].completion_ids == (EOS,)  # eos-only completion: a valid 1-token trace, reward 0
    assert json.loads(traces[3].metadata) == {"answer": "25", "finish_reason": FINISH_STOP}
    assert all(t.policy_version == t.policy_version_max == 4 for t in traces)
    for t in traces:
        validate_trace(t)
    assert [t.trace_id for t in batch_to_traces(traces_to_batch(traces))] == [t.trace_id for t in traces]


def test_weight_update_during_generate_spans_versions():
    eng = ScriptedEngine([[done("3"), done("3")]], policy_version=2, bump_during_generate=True)
    traces = sample_groups(eng, PROBLEMS[:1], RENDERER, SCORE, group_size=2)
    assert [(t.policy_version, t.policy_version_max) for t in traces] == [(2, 3), (2, 3)]


@pytest.mark.parametrize(
    "groups, match",
    [
        ([[done("3"), Completion((), (), FINISH_LENGTH)]], "empty completion"),
        ([[done("3")]], "expected 2 each"),
        ([[done("3"), Completion((5,), (), FINISH_LENGTH)]], "behaviour_logprobs length differs"),
    ],
)
def test_engine_contract_breaches_raise(groups, match):
    with pytest.raises(Exception, match=match):
        sample_groups(ScriptedEngine(groups), PROBLEMS[:1], RENDERER, SCORE, group_size=2)


def test_group_size_below_two_is_rejected():
    with pytest.raises(ValueError, match="group_size=1"):
        sample_groups(ScriptedEngine([]), PROBLEMS, RENDERER, SCORE, group_size=1)


def test_with_real_hf_engine(tiny_model_dir):
    from rollout.config import RolloutConfig
    from rollout.engine_hf import HFEngine

    tok = RENDERER.tokenizer
    assert tok.convert_tokens_to_ids(list(ARITHMETIC_ALPHABET)) == [CHARS[c] for c in ARITHMETIC_ALPHABET]
    eng = HFEngine(RolloutConfig(engine="hf", max_new_tokens=4), tiny_model_dir)
    traces = sample_groups(eng, PROBLEMS, RENDERER, SCORE, group_size=3, seed=0)
    assert len(traces) == 6 and len({t.group_id for t in traces}) == 2
    for t in traces:
        validate_trace(t)
        assert len(t.completion_ids) <= 4 and t.reward in (0.0, 1.0)


def test_score_batch_scores_everything_in_one_call_and_drops_groups_with_a_failed_score():
    from rollout.engine import Completion
    from rollout.sampling import sample_groups
    from rollout.tasks import Problem

    class TwoTokenEngine:
        policy_version = 3

        def generate(self, prompts, n, seed=None):
            return [
                [Completion(token_ids=(5, 2), logprobs=(-0.5, -0.1), finish_reason="stop") for _ in range(n)]
                for _ in prompts
            ]

    problems = [Problem("1+1=", "2", "t"), Problem("2+2=", "4", "t")]
    calls = []

    def score_batch_simple(items):
        calls.append(len(items))
        return [1.0, 0.0, None, 1.0]  # the second problem's group has a failed score

    traces = sample_groups(
        TwoTokenEngine(),
        problems,
        RENDERER,
        lambda p, c: 0.0,
        2,
        score_batch=score_batch_simple,
    )
    assert calls == [4]
    assert [t.reward for t in traces] == [1.0, 0.0]
    assert {t.group_id for t in traces} and all(t.policy_version == 3 for t in traces)


def test_drop_uniform_groups_keeps_only_groups_with_reward_spread():
    eng = ScriptedEngine([[done("3"), done("4")], [done("25"), done("25")], [done("9"), cut("9")]])
    problems = [*PROBLEMS, Problem("4+5=", "9", "arithmetic+")]
    traces = sample_groups(eng, problems, RENDERER, SCORE, group_size=2)
    kept, dropped = drop_uniform_groups(traces)
    assert dropped == 2  # all-correct "5*5" and all-correct "4+5" (a cut "9" still scores 1)
    assert kept == traces[:2] and {t.reward for t in kept} == {0.0, 1.0}
    assert drop_uniform_groups([]) == ([], 0)
