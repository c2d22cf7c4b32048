"""`weight_sync.inflight: pause`: a vLLM worker swaps weights between engine steps of a running rollout.

Real actors (a DeepSpeed rank, one vLLM worker, replay): an update announced before a rollout starts
is taken after the generation's first engine step, so every trace of that call records
policy_version 0 (first) and policy_version_max 1 (last); the receive queued for version 1 returns at
once; afterwards the engine scores like the learner (the prefix cache was reset when the generation ended).
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pytest
import ray

from replay.schema import Trace, traces_to_batch
from services.config import load_config
from services.driver import prepare_model
from services.placement import start_actors

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def test_pause_swaps_weights_mid_generation_and_records_first_and_last_version():
    cfg = load_config(
        REPO / "deploy/configs/e2e_small.yaml",
        [
            "learner.num_ranks=1",
            "learner.zero_stage=1",
            "learner.lr=0.01",
            "learner.weight_sync.inflight=pause",
            "rollout.max_new_tokens=16",
        ],
    )
    cache = REPO / ".cache"
    model_dir, _ = prepare_model(cfg, cache)
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        replay, ranks, workers = start_actors(cfg, model_dir, cache)
        rank, worker = ranks[0], workers[0]
        ray.get(worker.rollout.remote(4))
        sample = replay.sample(4, 0, timeout_s=5.0)
        ray.get(rank.train_step.remote(pa.Table.from_batches([sample.batch])))
        ray.get(rank.publish.remote(1))  # rank 0 announces version 1 and waits in its send thread
        time.sleep(0.5)  # the announcement is a store write on that thread: let it land before the rollout
        st = ray.get(worker.rollout.remote(4))
        assert st.policy_version == 1
        assert ray.get(worker.receive_weights.remote(None, None, 1)) == 1  # taken in flight: no second receive
        assert ray.get(rank.wait_published.remote()).error is None
        got = replay.sample(4, 1, timeout_s=5.0).batch
        pairs = set(zip(got.column("policy_version").to_pylist(), got.column("policy_version_max").to_pylist()))
        assert pairs == {(0, 1)}, pairs
        prompt, completion = [1, 4, 5, 13, 6, 7, 16], [8, 9, 2]
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
        learner = ray.get(rank.logprobs.remote(fixed))[0].tolist()
        engine = ray.get(worker.teacher_forced_logprobs.remote(prompt, completion))
        assert max(abs(a - b) for a, b in zip(learner, engine)) < 1e-4
        ray.get([a.shutdown.remote() for a in ranks + workers])
    finally:
        ray.shutdown()
