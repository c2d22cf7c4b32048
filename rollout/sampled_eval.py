"""Sampled evaluation on one rollout engine: greedy pass@1 and n scored samples per prompt (no ray).

Contract:
- `encode_prompt`, `score_completion` and `extract_answer` are the only places where this evaluation
  turns a problem into token ids, a completion into a verifier score, and a completion into a vote for
  maj@k. The rollout worker's encoding and the task's verifier are used, so evaluation sees exactly
  what training sees.
- `make_batches` cuts the problems into fixed batches with fixed seeds, independent of how many
  workers later run them, so results depend on (seed, batch size), never on the worker count.
- `BatchEvaluator.evaluate(batch)` returns one `PromptOutcome` per problem of the batch, in order: the
  greedy completion's score (when asked) and the n sampled completions' scores and answers.
  Completions are decoded without special tokens (the eos a completion stopped at is not text).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from rollout.config import RolloutConfig
from rollout.engine import FINISH_LENGTH
from rollout.passk import PromptSamples
from rollout.tasks import Problem


def encode_prompt(tokenizer, problem: Problem) -> list[int]:
    """The prompt's token ids, as every engine, the cold start and the rollout workers encode it."""
    from rollout.evaluation import encode_prompt as encode

    return encode(tokenizer, problem.prompt)


def score_completion(task, problem: Problem, text: str) -> float:
    """The task's verifier score of one decoded completion, in [0, 1]."""
    return float(task.score(problem, text))


def extract_answer(problem: Problem, text: str) -> str | None:
    """The answer a completion votes for in maj@k (None = no answer). The tasks here are exact-match after
    stripping, so the stripped text is the answer; a verifier that parses answers would return its parse."""
    answer = text.strip()
    return answer or None


@dataclasses.dataclass(frozen=True)
class EvalBatch:
    """Problems `first .. first+len(problems)-1` of the eval split, with this batch's sampling seed."""

    index: int
    first: int
    problems: tuple[Problem, ...]
    n: int
    seed: int
    greedy: bool


@dataclasses.dataclass(frozen=True)
class PromptOutcome:
    prompt_index: int
    greedy_score: float | None
    scores: tuple[float, ...]
    answers: tuple[str | None, ...]
    sampled_tokens: int
    truncated: int  # samples that hit max_new_tokens before an eos

    def samples(self) -> PromptSamples:
        return PromptSamples(self.scores, self.answers)


def make_batches(
    problems: Sequence[Problem], n: int, max_sequences: int, seed: int, greedy: bool = True
) -> list[EvalBatch]:
    """Batches of `max(1, max_sequences // n)` problems; batch i samples with seed `seed * 1_000_003 + i`."""
    if n < 1:
        raise ValueError(f"n={n}: sample at least one completion per prompt")
    size = max(1, max_sequences // n)
    return [
        EvalBatch(i, start, tuple(problems[start : start + size]), n, seed * 1_000_003 + i, greedy)
        for i, start in enumerate(range(0, len(problems), size))
    ]


class BatchEvaluator:
    """One engine on one model, with the task's verifier; `evaluate` runs one `EvalBatch`.

    `task_cfg` is a `rollout.tasks.TaskConfig` or `rollout.datasets.DatasetTaskConfig` (the run's `task`);
    `engine` replaces the one `rollout_cfg` would build (tests pass a scripted engine)."""

    def __init__(self, rollout_cfg: RolloutConfig, task_cfg, model_dir: str | Path, engine=None):
        from transformers import AutoTokenizer

        from rollout.engine import make_engine
        from rollout.tasks import make_task

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.task = make_task(task_cfg, self.tokenizer)
        self.engine = engine if engine is not None else make_engine(rollout_cfg, Path(model_dir))

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _score(self, problem: Problem, ids: Sequence[int]) -> tuple[float, str | None]:
        text = self._decode(ids)
        return score_completion(self.task, problem, text), extract_answer(problem, text)

    def evaluate(self, batch: EvalBatch) -> list[PromptOutcome]:
        prompts = [encode_prompt(self.tokenizer, p) for p in batch.problems]
        greedy = self.engine.greedy(prompts) if batch.greedy else [None] * len(prompts)
        groups = self.engine.generate(prompts, n=batch.n, seed=batch.seed)
        out = []
        for i, (problem, g_ids, group) in enumerate(zip(batch.problems, greedy, groups)):
            scored = [self._score(problem, c.token_ids) for c in group]
            out.append(
                PromptOutcome(
                    prompt_index=batch.first + i,
                    greedy_score=None if g_ids is None else self._score(problem, g_ids)[0],
                    scores=tuple(s for s, _ in scored),
                    answers=tuple(a for _, a in scored),
                    sampled_tokens=sum(len(c.token_ids) for c in group),
                    truncated=sum(c.finish_reason == FINISH_LENGTH for c in group),
                )
            )
        return out

    def shutdown(self) -> None:
        self.engine.shutdown()
