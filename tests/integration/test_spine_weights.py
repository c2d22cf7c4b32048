"""After a weight broadcast, every vLLM engine scores a fixed completion like the learner does (1e-4, fp32).

Real actors: a DeepSpeed rank (gloo), a vLLM rollout worker, a replay shard; one rollout, one learner
step on it, one broadcast over the weight group, then both sides score the same tokens.
"""

from __future__ import annotations

import pyarrow as pa
import pytest
import ray

from replay.schema import Trace, traces_to_batch
from services.config import load_config
from services.driver import prepare_model
from services.placement import start_actors

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_engine_matches_learner_after_broadcast(tmp_path):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(
        repo / "deploy/configs/e2e_small.yaml", ["learner.num_ranks=1", "learner.zero_stage=1", "learner.lr=0.01"]
    )
    cache = repo / ".cache"
    model_dir, _ = prepare_model(cfg, cache)
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(repo)}})
    try:
        replay, ranks, workers = start_actors(cfg, model_dir, cache)
        rank, worker = ranks[0], workers[0]
        prompt, completion = [1, 4, 5, 13, 6, 7, 16], [8, 9, 2]  # <bos>12+34= -> "56"<eos>
        fixed = traces_to_batch(
            [
                Trace(
                    group_id="g",
                    prompt_ids=tuple(prompt),
                    completion_ids=tuple(completion),
                    behaviour_logprobs=(-1.0,) * 3,
                    reward=0.0,
                    policy_version=0,
                )
            ]
        )
        before = ray.get(rank.logprobs.remote(fixed))[0].tolist()
        assert (
            max(abs(a - b) for a, b in zip(before, ray.get(worker.teacher_forced_logprobs.remote(prompt, completion))))
            < 1e-4
        )
        ray.get(worker.rollout.remote(4))
        sample = replay.sample(4, 0, timeout_s=5.0)
        assert sample is not None
        # Rewards alternate within each group so GRPO has a gradient: the sampled ones after a short cold
        # start are often all 0, leaving only the k3 KL (gradient ~1e-9 at ratio 1), i.e. a step of noise.
        spread = pa.array([float(i % 2) for i in range(sample.batch.num_rows)], pa.float32())
        batch = sample.batch.set_column(sample.batch.schema.get_field_index("reward"), "reward", spread)
        ray.get(rank.train_step.remote(pa.Table.from_batches([batch])))
        ray.get([rank.publish.remote(1), worker.receive_weights.remote()])
        assert ray.get(worker.policy_version.remote()) == 1
        learner = ray.get(rank.logprobs.remote(fixed))[0].tolist()
        engine = ray.get(worker.teacher_forced_logprobs.remote(prompt, completion))
        assert max(abs(a - b) for a, b in zip(before, learner)) > 1e-3, "the step did not change the weights"
        assert max(abs(a - b) for a, b in zip(learner, engine)) < 1e-4
        ray.get([a.shutdown.remote() for a in ranks + workers])
    finally:
        ray.shutdown()
