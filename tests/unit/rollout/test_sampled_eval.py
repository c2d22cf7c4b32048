"""BatchEvaluator with a scripted engine: encoding, scores from the task verifier, votes, truncation, batching."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from rollout.config import RolloutConfig
from rollout.engine import FINISH_LENGTH, FINISH_STOP, Completion
from rollout.sampled_eval import BatchEvaluator, EvalBatch, extract_answer, make_batches
from rollout.tasks import Problem, TaskConfig

# the tiny model's character tokenizer: <pad>=0 <bos>=1 <eos>=2, then one id per alphabet character
ALPHABET = "0123456789+-*="
ID = {ch: 3 + i for i, ch in enumerate(ALPHABET)}


def done(text: str) -> Completion:
    ids = tuple(ID[c] for c in text) + (2,)
    return Completion(ids, (-0.1,) * len(ids), FINISH_STOP)


def cut(text: str) -> Completion:
    ids = tuple(ID[c] for c in text)
    return Completion(ids, (-0.1,) * len(ids), FINISH_LENGTH)


@dataclass
class ScriptedEngine:
    groups: list
    greedy_ids: list
    calls: list = field(default_factory=list)
    policy_version: int = 0

    def generate(self, prompts, n, seed=None):
        self.calls.append(("generate", [list(p) for p in prompts], n, seed))
        return self.groups

    def greedy(self, prompts):
        self.calls.append(("greedy", [list(p) for p in prompts]))
        return self.greedy_ids

    def shutdown(self):
        self.calls.append(("shutdown",))


def test_outcomes_score_with_the_task_verifier_and_vote_on_stripped_text(tiny_model_dir):
    problems = (Problem("1+2=", "3", "arithmetic+"), Problem("5+5=", "10", "arithmetic+"))
    engine = ScriptedEngine(
        groups=[[done("3"), cut("3"), done("33"), done("")], [done("10"), done("01"), cut("1"), done("10")]],
        greedy_ids=[done("3").token_ids, done("1").token_ids],
    )
    ev = BatchEvaluator(RolloutConfig(engine="hf"), TaskConfig(), tiny_model_dir, engine=engine)
    out = ev.evaluate(EvalBatch(index=3, first=10, problems=problems, n=4, seed=77, greedy=True))
    assert [o.prompt_index for o in out] == [10, 11]
    assert out[0].scores == (1.0, 1.0, 0.0, 0.0)  # a completion cut at the budget is scored on its text
    assert out[0].answers == ("3", "3", "33", None)  # an empty completion votes for nothing
    assert out[1].scores == (1.0, 0.0, 0.0, 1.0) and out[1].answers == ("10", "01", "1", "10")
    assert (out[0].greedy_score, out[1].greedy_score) == (1.0, 0.0)
    assert (out[0].truncated, out[1].truncated) == (1, 1)
    assert out[0].sampled_tokens == 2 + 1 + 3 + 1
    assert out[0].samples().correct == 2
    # prompts reach the engine as <bos> + one id per character, the encoding training uses
    assert engine.calls[0] == (
        "greedy",
        [[1, ID["1"], ID["+"], ID["2"], ID["="]], [1, ID["5"], ID["+"], ID["5"], ID["="]]],
    )
    assert engine.calls[1][2:] == (4, 77)


def test_no_greedy_decode_when_not_asked(tiny_model_dir):
    engine = ScriptedEngine(groups=[[done("3"), done("4")]], greedy_ids=[])
    ev = BatchEvaluator(RolloutConfig(engine="hf"), TaskConfig(), tiny_model_dir, engine=engine)
    (o,) = ev.evaluate(EvalBatch(0, 0, (Problem("1+2=", "3", "a"),), n=2, seed=1, greedy=False))
    assert o.greedy_score is None and [c[0] for c in engine.calls] == ["generate"]


def test_batches_are_fixed_by_size_and_seed():
    problems = [Problem(f"{i}+0=", str(i), "a") for i in range(10)]
    batches = make_batches(problems, n=4, max_sequences=12, seed=5)
    assert [len(b.problems) for b in batches] == [3, 3, 3, 1]
    assert [b.first for b in batches] == [0, 3, 6, 9]
    assert [b.seed for b in batches] == [5 * 1_000_003 + i for i in range(4)]
    assert [p for b in batches for p in b.problems] == problems
    assert [len(b.problems) for b in make_batches(problems, n=64, max_sequences=12, seed=0)] == [1] * 10
    with pytest.raises(ValueError, match="n=0"):
        make_batches(problems, n=0, max_sequences=8, seed=0)


def test_extract_answer_is_the_verifiers():
    from rollout.tasks import make_task
    from rollout.verifiers import ExactConfig

    p = Problem("1+2=", "3", "a")
    plain = make_task(TaskConfig())
    assert extract_answer(plain, p, " 3 ") == "3" and extract_answer(plain, p, "  ") is None
    boxed = make_task(TaskConfig(verifier=ExactConfig(extract="boxed")))
    assert extract_answer(boxed, p, "so \\boxed{3}.") == "3" and extract_answer(boxed, p, "3") is None


def always_half(problem, completion):
    return 0.5


def test_a_custom_reward_function_scores_evaluation(tiny_model_dir):
    engine = ScriptedEngine(groups=[[done("3"), done("9")]], greedy_ids=[done("3").token_ids])
    fn = f"{__name__}:always_half"
    ev = BatchEvaluator(RolloutConfig(engine="hf"), TaskConfig(), tiny_model_dir, reward_function=fn, engine=engine)
    (o,) = ev.evaluate(EvalBatch(0, 0, (Problem("1+2=", "3", "a"),), n=2, seed=1, greedy=True))
    assert o.scores == (0.5, 0.5) and o.greedy_score == 0.5
