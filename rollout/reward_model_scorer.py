"""A learned reward model as a reward: batched scoring, running normalisation, weighted mix with the verifier.

Contract:
- `RewardModelConfig` is `reward.model`: the checkpoint (a `python -m services.train_rm` output or any HF
  sequence-classification model with `num_labels=1` and the policy's tokenizer), where it runs (`actor`:
  `num_actors` Ray actors of their own resource spec shared by the rollout workers; `worker`: a copy inside
  each rollout worker), its batch size and the weights of the mix
  `reward = model_weight * normalised RM score + verifier_weight * verifier score`.
- `RewardModelScorer.score(items)` scores `(Problem, completion text)` pairs the way the RM was trained: the
  prompt rendered by the rollout `Renderer`, the completion as `Renderer.target_ids` (ending with the stop
  token). It never raises for a failing batch: an exception counts every item of that batch in `errors`,
  a non-finite score counts in `non_finite`, a batch finishing after `timeout_s` counts its items in
  `timeouts`; those items score `None` (the caller applies `reward.on_failure`).
- `RunningNormalizer` standardises scores with the running mean and variance of every score seen so far
  (Welford), updated before it is applied, as OpenRLHF's `normalize_reward`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rollout.problem import Problem


class RewardModelConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str = Field(description="a reward-model checkpoint (HF sequence classification, num_labels=1)")
    placement: Literal["actor", "worker"] = Field(
        "actor",
        description="actor: num_actors Ray actors score for all rollout workers (own CPUs/GPUs, scale them like "
        "workers); worker: each rollout worker holds a copy (no extra actors, more memory per worker)",
    )
    num_actors: int = Field(1, ge=1, description="placement=actor: reward-model actors (workers spread over them)")
    num_cpus_per_actor: float = Field(1.0, ge=0, description="placement=actor: Ray CPUs per reward-model actor")
    num_gpus_per_actor: float = Field(0.0, ge=0, description="placement=actor: Ray GPUs per reward-model actor")
    batch_size: int = Field(64, ge=1, description="sequences per reward-model forward pass")
    model_weight: float = Field(1.0, description="weight of the (normalised) reward-model score in the reward")
    verifier_weight: float = Field(
        0.0,
        description="weight of the verifier's score in the reward; 0 = pure RLHF (the verifier is still run and "
        "logged as the gold reward, to expose over-optimisation)",
    )
    normalize: Literal["none", "running"] = Field(
        "none", description="running: standardise RM scores by their running mean/std before mixing"
    )
    timeout_s: float = Field(120.0, gt=0, description="a scoring batch slower than this counts its items as timeouts")
    threads: int | None = Field(None, ge=1, description="torch threads for scoring (None = torch's default)")


class RunningNormalizer:
    """Welford running mean/variance; `__call__` folds a batch in, then standardises it."""

    def __init__(self, eps: float = 1e-6):
        self.count, self.mean, self.m2, self.eps = 0, 0.0, 0.0, eps

    def update(self, values: Sequence[float]) -> None:
        for x in values:
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0

    def __call__(self, values: Sequence[float]) -> list[float]:
        self.update(values)
        return [(x - self.mean) / (self.std + self.eps) for x in values]


def mix_rewards(
    model_scores: Sequence[float | None], verifier_scores: Sequence[float | None], cfg: RewardModelConfig
) -> list[float | None]:
    """The weighted reward; `None` where a needed part failed (a zero weight makes a part unneeded)."""
    out: list[float | None] = []
    for m, v in zip(model_scores, verifier_scores, strict=True):
        if (m is None and cfg.model_weight != 0) or (v is None and cfg.verifier_weight != 0):
            out.append(None)
            continue
        out.append(cfg.model_weight * (m or 0.0) + cfg.verifier_weight * (v or 0.0))
    return out


@dataclasses.dataclass(frozen=True)
class ModelScores:
    scores: list[float | None]
    ok: int = 0
    timeouts: int = 0
    errors: int = 0
    non_finite: int = 0
    seconds: float = 0.0


class RewardModelScorer:
    """Holds one reward model; scores rendered (prompt, completion) sequences in batches."""

    def __init__(self, cfg: RewardModelConfig, renderer):
        import torch

        from learner.reward_model import init_reward_model

        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.cfg, self.renderer = cfg, renderer
        self.model = init_reward_model(cfg.path).eval()
        self.pad_id = int(self.model.config.pad_token_id or 0)

    def _forward(self, items: Sequence[tuple[Problem, str]]) -> list[float]:
        import torch

        from learner.pair_training import pack_sequences
        from learner.reward_model import sequence_scores

        prompts = [self.renderer.encode_prompt(p) for p, _ in items]
        completions = [self.renderer.target_ids(p, text) for p, text in items]
        with torch.no_grad():
            return sequence_scores(self.model, pack_sequences(prompts, completions, self.pad_id)).tolist()

    def score(self, items: Sequence[tuple[Problem, str]]) -> ModelScores:
        t0 = time.perf_counter()
        scores: list[float | None] = []
        counts = {"ok": 0, "timeouts": 0, "errors": 0, "non_finite": 0}
        for start in range(0, len(items), self.cfg.batch_size):
            batch = items[start : start + self.cfg.batch_size]
            b0 = time.perf_counter()
            try:
                values: list[float | None] = list(self._forward(batch))
            except Exception:  # noqa: BLE001 - a failing batch is a counted outcome, as for verifiers
                counts["errors"] += len(batch)
                scores += [None] * len(batch)
                continue
            if time.perf_counter() - b0 > self.cfg.timeout_s:
                counts["timeouts"] += len(batch)
                scores += [None] * len(batch)
                continue
            for v in values:
                finite = math.isfinite(v)
                counts["ok" if finite else "non_finite"] += 1
                scores.append(v if finite else None)
        return ModelScores(scores, seconds=time.perf_counter() - t0, **counts)


class ModelRewardMix:
    """Turns verifier scores plus reward-model scores into the training reward, and keeps the gold/proxy means.

    `score_model(items) -> ModelScores` is a local `RewardModelScorer.score` or a call to a reward-model actor.
    Per `take_stats()` window it reports the mean verifier (gold) score, the mean raw RM (proxy) score and the
    RM's failure counts; a RM failure makes the item's reward `None` when `model_weight != 0`.
    """

    def __init__(self, cfg: RewardModelConfig, score_model):
        self.cfg, self.score_model = cfg, score_model
        self.normalizer = RunningNormalizer() if cfg.normalize == "running" else None
        self._reset()

    def _reset(self) -> None:
        self.gold: list[float] = []
        self.proxy: list[float] = []
        self.failures = {"timeouts": 0, "errors": 0, "non_finite": 0}

    def rewards(self, items: Sequence[tuple[Problem, str]], verifier: Sequence[float | None]) -> list[float | None]:
        result = self.score_model(list(items))
        for key in self.failures:
            self.failures[key] += getattr(result, key)
        ok = [s for s in result.scores if s is not None]
        self.proxy += ok
        self.gold += [v for v in verifier if v is not None]
        scores = result.scores
        if self.normalizer is not None and ok:
            normed = iter(self.normalizer(ok))
            scores = [None if s is None else next(normed) for s in scores]
        return mix_rewards(scores, verifier, self.cfg)

    def take_stats(self) -> dict[str, float | int | None]:
        """Means since the last call (None when nothing was scored) and the RM failure counts; then resets."""
        out = {
            "gold_reward_mean": sum(self.gold) / len(self.gold) if self.gold else None,
            "model_score_mean": sum(self.proxy) / len(self.proxy) if self.proxy else None,
            **{f"model_{k}": v for k, v in self.failures.items()},
        }
        self._reset()
        return out
