"""reasoning-gym procedural generators as a `rollout.tasks.Task`: offline, unlimited, held out by seed.

Contract:
- `name` is a reasoning-gym generator and `params` its config fields (checked when the config is built:
  a bad name or parameter is a config error naming `task.name` / `task.params`).
- The eval split is the first `eval_size` distinct questions the generator makes from an eval seed
  derived from `seed`; training streams draw from other derived seeds (one per stream and pass) and
  never yield a question of the eval split (such draws are skipped and counted as `in_eval_split`).
- With a renderer, generated prompts over `max_prompt_tokens` rendered tokens are skipped and counted
  (`too_long`), in both splits.
- A problem carries the generator's entry: `prompt` = question, `answer` = reference answer, `metadata` =
  the entry's metadata as JSON, so the `reasoning_gym` verifier calls the generator's own
  `score_answer(answer, entry)`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rollout.problem import Problem
from rollout.step_rewards import StepRewardConfig
from rollout.tasks import VerifiedTask
from rollout.verifiers import ReasoningGymConfig, VerifierConfig

_TRAIN_CHUNK = 100_000  # problems per derived train seed before the stream moves to the next seed
_MAX_MISSES = 10_000  # consecutive unusable draws before the stream gives up


class ReasoningGymTaskConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["reasoning_gym"] = Field("reasoning_gym", description="a reasoning-gym procedural generator")
    name: str = Field(
        "chain_sum", description="a reasoning-gym generator, e.g. chain_sum, basic_arithmetic, leg_counting"
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="the generator's config fields, e.g. {min_terms: 2, max_terms: 3, min_digits: 1, max_digits: 2}",
    )
    max_prompt_tokens: int = Field(ge=1, description="generated prompts longer than this after rendering are skipped")
    eval_size: int = Field(200, ge=1, description="distinct held-out questions (from the eval seed)")
    seed: int = Field(0, description="derives the eval seed and every training stream's seeds")
    verifier: VerifierConfig = Field(
        default_factory=ReasoningGymConfig,
        description="how completions are scored; default: the generator's own score_answer on the <answer> tag",
    )
    step_reward: StepRewardConfig | None = Field(
        None,
        description="process rewards (rollout/step_rewards.py): {kind: equations} checks each newline-ended "
        "`a+b=c` step of a worked solution; None = outcome reward only",
    )

    @model_validator(mode="after")
    def _generator_exists(self) -> ReasoningGymTaskConfig:
        import reasoning_gym

        try:
            reasoning_gym.create_dataset(self.name, size=1, seed=0, **self.params)
        except Exception as e:  # noqa: BLE001 - reasoning-gym reports bad names/params as KeyError/TypeError/assert
            raise ValueError(
                f"task.name={self.name!r} with task.params={self.params} is not a usable reasoning-gym generator "
                f"({type(e).__name__}: {e}); see reasoning_gym.factory.DATASETS and the generator's config fields"
            ) from None
        return self


def derived_seed(*parts: object) -> int:
    """A 48-bit seed from `parts`. reasoning-gym seeds item i with `seed + i`, so nearby seeds would give
    shifted copies of the same problems; hashed seeds are far apart."""
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=6).digest()
    return int.from_bytes(digest, "little")


class ReasoningGymTask(VerifiedTask):
    name = "reasoning_gym"

    def __init__(self, cfg: ReasoningGymTaskConfig, renderer=None):
        super().__init__(cfg)
        self.renderer = renderer
        self._eval = self._eval_split()
        self._eval_keys = {p.key for p in self._eval}

    @classmethod
    def from_config(cls, cfg: ReasoningGymTaskConfig, renderer=None) -> ReasoningGymTask:
        return cls(cfg, renderer)

    def _generator(self, seed: int, size: int):
        import reasoning_gym

        return reasoning_gym.create_dataset(self.cfg.name, size=size, seed=seed, **self.cfg.params)

    def _problem(self, entry: dict) -> Problem:
        return Problem(
            prompt=entry["question"],
            answer=str(entry["answer"]),
            task=self.cfg.name,
            metadata=json.dumps(entry.get("metadata", {})),
        )

    def _fits(self, problem: Problem) -> bool:
        if self.renderer is None or len(self.renderer.encode_prompt(problem)) <= self.cfg.max_prompt_tokens:
            return True
        self.skipped_rows["too_long"] = self.skipped_rows.get("too_long", 0) + 1
        return False

    def _eval_split(self) -> list[Problem]:
        gen = self._generator(derived_seed("eval", self.cfg.seed), 4 * self.cfg.eval_size + 64)
        out, seen = [], set()
        for i in range(len(gen)):
            p = self._problem(gen[i])
            if p.key not in seen and self._fits(p):
                seen.add(p.key)
                out.append(p)
                if len(out) == self.cfg.eval_size:
                    return out
        raise ValueError(
            f"reasoning-gym {self.cfg.name!r} made only {len(out)} distinct eval questions that fit "
            f"task.max_prompt_tokens={self.cfg.max_prompt_tokens} (skipped: {self.skipped_rows}); lower "
            "task.eval_size, widen task.params or raise task.max_prompt_tokens"
        )

    def train_stream(self, seed: int | None = None) -> Iterator[Problem]:
        """Endless: passes over generators with derived seeds, eval questions and over-long prompts skipped."""
        base = self.cfg.seed if seed is None else seed
        misses = 0
        for chunk in itertools.count():
            gen = self._generator(derived_seed("train", base, chunk), _TRAIN_CHUNK)
            for i in range(len(gen)):
                p = self._problem(gen[i])
                if p.key in self._eval_keys:
                    self.skipped_rows["in_eval_split"] = self.skipped_rows.get("in_eval_split", 0) + 1
                elif self._fits(p):
                    misses = 0
                    yield p
                    continue
                misses += 1
                if misses == _MAX_MISSES:
                    raise ValueError(
                        f"reasoning-gym {self.cfg.name!r}: {_MAX_MISSES} draws in a row were eval questions or too "
                        f"long (skipped: {self.skipped_rows}); the generator's problem space is too small for "
                        "task.eval_size, or task.max_prompt_tokens too low"
                    )

    def eval_set(self) -> list[Problem]:
        return list(self._eval)
