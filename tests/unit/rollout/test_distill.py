"""Offline distillation data: only verified teacher samples are kept, one per problem, in the JSONL the cold
start reads back (scripted teacher engine, real char tokenizer)."""

from __future__ import annotations

from learner.sft import load_solutions
from learner.tiny_model import build_tokenizer
from rollout.distill import teacher_solutions, write_solutions
from rollout.engine import FINISH_STOP, Completion
from rollout.render import RenderConfig, Renderer
from rollout.tasks import ARITHMETIC_ALPHABET, ArithmeticTask, TaskConfig

TOK = build_tokenizer(ARITHMETIC_ALPHABET)
CHARS = {ch: 3 + i for i, ch in enumerate(ARITHMETIC_ALPHABET)}


def comp(text: str) -> Completion:
    ids = tuple(CHARS[c] for c in text) + (TOK.eos_token_id,)
    return Completion(ids, tuple(-0.1 for _ in ids), FINISH_STOP)


class Teacher:
    policy_version = 0

    def __init__(self, groups):
        self.groups = groups

    def generate(self, prompts, n, seed=None):
        assert len(prompts) == len(self.groups) and n == 2
        return self.groups


def test_only_verified_samples_are_kept_and_the_cold_start_reads_them(tmp_path):
    task = ArithmeticTask(TaskConfig())
    problems = [task._make(1, "+", 2), task._make(4, "+", 4)]
    teacher = Teacher([[comp("4"), comp("3")], [comp("7"), comp("9")]])
    rows, stats = teacher_solutions(teacher, Renderer(RenderConfig(), TOK), task, problems, samples=2)
    assert rows == [{"prompt": "1+2=", "completion": "3"}]
    assert stats == {"accepted_frac": 0.5, "sample_accuracy": 0.25}
    path = write_solutions(rows, tmp_path / "t.jsonl")
    examples = load_solutions(path, eval_keys=set())
    assert [(p.prompt, c) for p, c in examples] == [("1+2=", "3")]
