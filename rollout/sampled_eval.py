"""Sampled evaluation on one rollout engine: greedy pass@1 and n scored samples per prompt (no ray).

Contract:
- Prompts are encoded by the run's `rollout.render.Renderer` and completions end at its stop conditions;
  `score_completion` and `extract_answer` are the only places where a completion becomes a score and a
  vote for maj@k. The reward function (the user's `reward.function`, else the task's verifier) and the
  renderer are the rollout workers', so evaluation sees exactly what training sees.
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


def score_completion(score, problem: Problem, text: str) -> float:
    """The reward function's score of one decoded completion (the user's `reward.function`, else the task's
    verifier: what training rewards use)."""
    return float(score(problem, text))


def extract_answer(task, problem: Problem, text: str) -> str | None:
    """The answer a completion votes for in maj@k (None = no answer): what the task's verifier extracts,
    so `\\boxed{7}` and `Answer: 7` vote together."""
    from rollout.verifiers import extract_answer as extract

    how = getattr(getattr(getattr(task, "verifier", None), "cfg", None), "extract", "none")
    answer = extract(text, how)
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

    `task_cfg` is the run's `task` section, `render_cfg` its `render`, `reward_function` its
    `reward.function` ("module:callable" or None = the task's verifier); `engine` replaces the one
    `rollout_cfg` would build (tests pass a scripted engine)."""

    def __init__(
        self,
        rollout_cfg: RolloutConfig,
        task_cfg,
        model_dir: str | Path,
        render_cfg=None,
        reward_function: str | None = None,
        engine=None,
    ):
        from rollout.engine import make_engine
        from rollout.render import RenderConfig, Renderer
        from rollout.rewards import load_reward_function
        from rollout.tasks import make_task

        self.renderer = Renderer.from_pretrained(render_cfg or RenderConfig(), model_dir)
        self.task = make_task(task_cfg, self.renderer)
        self.score = load_reward_function(reward_function) if reward_function else self.task.score
        self.engine = engine if engine is not None else make_engine(rollout_cfg, Path(model_dir), self.renderer.stop)

    def _score(self, problem: Problem, ids: Sequence[int]) -> tuple[float, str | None]:
        text = self.renderer.completion_text(ids)
        return score_completion(self.score, problem, text), extract_answer(self.task, problem, text)

    def evaluate(self, batch: EvalBatch) -> list[PromptOutcome]:
        prompts = [self.renderer.encode_prompt(p) for p in batch.problems]
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
