"""`EvalWorker`: a Ray actor holding one rollout engine that runs evaluation batches (`python -m services.evaluate`).

Thin by design: the work is `rollout.sampled_eval.BatchEvaluator`; the actor only builds it with the
run's rollout resources and returns typed `PromptOutcome` records. Shut it down (engine first) before
killing it, or vLLM leaks its /dev/shm segment.
"""

from __future__ import annotations

import os

import ray

from rollout.config import RolloutConfig
from rollout.sampled_eval import BatchEvaluator, EvalBatch, PromptOutcome


@ray.remote
class EvalWorker:
    def __init__(self, rollout_cfg: RolloutConfig, task_cfg, model_dir: str, render_cfg=None, reward_function=None):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.core = BatchEvaluator(rollout_cfg, task_cfg, model_dir, render_cfg, reward_function)

    def evaluate(self, batch: EvalBatch) -> list[PromptOutcome]:
        return self.core.evaluate(batch)

    def shutdown(self) -> None:
        self.core.shutdown()


def start_eval_workers(cfg, rollout_cfg: RolloutConfig, model_dir: str, count: int, cache_dir) -> list:
    """`count` workers with the run's per-worker rollout resources (`rollout.num_cpus_per_worker`, ...)."""
    from services.placement import actor_env

    return [
        EvalWorker.options(
            num_cpus=rollout_cfg.num_cpus_per_worker,
            num_gpus=rollout_cfg.num_gpus_per_worker,
            resources=dict(rollout_cfg.ray_resources),
            runtime_env={"env_vars": actor_env(cfg, cache_dir)},
        ).remote(rollout_cfg, cfg.task, model_dir, cfg.render, cfg.reward.function)
        for _ in range(count)
    ]


def run_on_workers(workers: list, batches: list[EvalBatch]) -> list[PromptOutcome]:
    """Hand each idle worker the next batch until all are done (ray.wait, one batch in flight per worker)."""
    queue, inflight, out = list(reversed(batches)), {}, []
    while queue or inflight:
        busy = set(inflight.values())
        for i, w in enumerate(workers):
            if queue and i not in busy:
                inflight[w.evaluate.remote(queue.pop())] = i
        done, _ = ray.wait(list(inflight), num_returns=1)
        for ref in done:
            inflight.pop(ref)
            out.extend(ray.get(ref))
    return out


def stop_workers(workers: list) -> None:
    ray.get([w.shutdown.remote() for w in workers], timeout=60)
    for w in workers:
        ray.kill(w, no_restart=True)
