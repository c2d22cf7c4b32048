"""`RewardModelActor`: a Ray actor that scores completions with a learned reward model for the rollout workers.

Contract: a thin shell over `rollout.reward_model_scorer.RewardModelScorer` (all logic and counting lives
there). `start_reward_model_actors` creates `reward.model.num_actors` actors with their own resource spec,
named `flywheel-reward-model-<i>` (in the job's namespace) so a rollout worker, including one the pool adds
later, finds actor `worker_id % num_actors` by name; the driver keeps the handles in `LIVE_ACTORS` for the
run's lifetime.
"""

from __future__ import annotations

import math

import ray

from rollout.problem import Problem
from rollout.render import RenderConfig, Renderer
from rollout.reward_model_scorer import ModelScores, RewardModelConfig, RewardModelScorer

LIVE_ACTORS: list = []


def actor_name(index: int) -> str:
    # Named actors live in the job's namespace, so two runs on one cluster never see each other's.
    return f"flywheel-reward-model-{index}"


@ray.remote
class RewardModelActor:
    def __init__(self, cfg: RewardModelConfig, render_cfg: RenderConfig):
        self.scorer = RewardModelScorer(cfg, Renderer.from_pretrained(render_cfg, cfg.path))

    def ready(self) -> bool:
        return True

    def score(self, items: list[tuple[Problem, str]]) -> ModelScores:
        return self.scorer.score(items)


def start_reward_model_actors(cfg: RewardModelConfig, render_cfg: RenderConfig, env: dict) -> list:
    """Create and wait for the reward-model actors (placement=actor); returns their handles."""
    actors = [
        RewardModelActor.options(
            name=actor_name(i),
            num_cpus=cfg.num_cpus_per_actor,
            num_gpus=cfg.num_gpus_per_actor,
            runtime_env=env,
        ).remote(cfg, render_cfg)
        for i in range(cfg.num_actors)
    ]
    ray.get([a.ready.remote() for a in actors])
    LIVE_ACTORS.extend(actors)
    return actors


class ModelScoreSource:
    """What a rollout worker calls: a local scorer (placement=worker) or its reward-model actor, by name."""

    def __init__(self, cfg: RewardModelConfig, renderer: Renderer, worker_id: int):
        self.cfg = cfg
        if cfg.placement == "worker":
            self.local, self.actor = RewardModelScorer(cfg, renderer), None
        else:
            self.local, self.actor = None, ray.get_actor(actor_name(worker_id % cfg.num_actors))

    def score(self, items: list[tuple[Problem, str]]) -> ModelScores:
        if self.local is not None:
            return self.local.score(items)
        try:
            batches = max(1, math.ceil(len(items) / self.cfg.batch_size))  # timeout_s bounds one batch
            return ray.get(self.actor.score.remote(items), timeout=self.cfg.timeout_s * batches)
        except ray.exceptions.GetTimeoutError:
            return ModelScores([None] * len(items), timeouts=len(items))
        except ray.exceptions.RayError:
            return ModelScores([None] * len(items), errors=len(items))
