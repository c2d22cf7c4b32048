"""Schedule-Free AdamW publishes its evaluation-mode (averaged) weights: after a broadcast the vLLM engine
scores a fixed completion like the learner's averaged x, not like the y its gradients are taken at.

Real actors: a DeepSpeed rank (gloo, ZeRO-0, Schedule-Free), a vLLM rollout worker, a replay shard; three
learner steps on one batch (after one step x and y coincide), one broadcast, then both sides score.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from replay.schema import Trace, traces_to_batch
from services.config import load_config
from services.driver import prepare_model
from services.placement import start_actors

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_published_weights_are_the_evaluation_mode_parameters():
    repo = Path(__file__).resolve().parents[2]
    overrides = [
        "learner.num_ranks=1",
        "learner.zero_stage=0",
        "learner.optimizer=schedule_free_adamw",
        "learner.lr=0.02",
    ]
    cfg = load_config(repo / "deploy/configs/e2e_small.yaml", overrides)
    cache = repo / ".cache"
    model_dir, _ = prepare_model(cfg, cache)
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(repo)}})
    try:
        replay, ranks, workers = start_actors(cfg, model_dir, cache)
        rank, worker = ranks[0], workers[0]
        prompt, completion = [1, 4, 5, 13, 6, 7, 16], [8, 9, 2]  # <bos>12+34= -> "56"<eos>

        def trace(i: int, completion_ids=tuple(completion)) -> Trace:
            return Trace(
                group_id=f"g{i // 4}",
                prompt_ids=tuple(prompt),
                completion_ids=completion_ids,
                behaviour_logprobs=(-1.0,) * len(completion_ids),
                reward=float(i % 2),
                policy_version=0,
            )

        fixed = traces_to_batch([trace(0)])
        batch = traces_to_batch([trace(i, (8 + i % 3, 9 + i % 2, 2)) for i in range(8)])
        for _ in range(3):
            assert ray.get(rank.train_step.remote(batch)).diagnostics["updates_applied"] == 1
        ray.get([rank.publish.remote(1), worker.receive_weights.remote()])
        served = ray.get(rank.logprobs.remote(fixed))[0].tolist()
        training = ray.get(rank.logprobs.remote(fixed, "training"))[0].tolist()
        engine = ray.get(worker.teacher_forced_logprobs.remote(prompt, completion))
        assert max(abs(a - b) for a, b in zip(served, training)) > 1e-3, "x and y should differ after 3 steps"
        assert max(abs(a - b) for a, b in zip(served, engine)) < 1e-4
        assert max(abs(a - b) for a, b in zip(training, engine)) > 1e-3
        ray.get([a.shutdown.remote() for a in ranks + workers])
    finally:
        ray.shutdown()
