"""After every re-formed broadcast, each vLLM engine scores a fixed completion like the learner (1e-4, fp32):
a worker that joined mid-run, and a removed worker's re-added replacement that got the current version
from a re-send of the same policy_version.

Real actors driven through `WorkerPool` (no loop): a DeepSpeed rank, up to 2 vLLM workers, replay.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import ray

from replay.schema import Trace, traces_to_batch
from services.config import load_config
from services.driver import prepare_model
from services.placement import start_actors
from services.report import MetricsLog
from services.worker_pool import WorkerPool

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
PROMPT, COMPLETION = [1, 4, 5, 13, 6, 7, 16], [8, 9, 2]  # <bos>12+34= -> "56"<eos>


def _settle(pool: WorkerPool, until, timeout_s: float = 180.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    pool.reconcile()
    while not until():
        assert time.monotonic() < deadline, pool.report()
        refs = pool.refs()
        ready = ray.wait(refs, num_returns=len(refs), timeout=0.5)[0] if refs else []
        pool.process(set(ready))
        pool.reconcile()


def _train(pool: WorkerPool, rank, replay, version: int) -> None:
    wid = pool.idle_active()[0]
    pool.dispatch(wid, 4)
    _settle(pool, lambda: not pool.rollouts)
    sample = replay.sample(4, version, timeout_s=5.0)
    assert sample is not None
    # Rewards alternate within each group so the step has a real gradient (sampled ones after a short
    # cold start are often all 0, leaving a k3-KL step of numerical noise).
    spread = pa.array([float(i % 2) for i in range(sample.batch.num_rows)], pa.float32())
    batch = sample.batch.set_column(sample.batch.schema.get_field_index("reward"), "reward", spread)
    ray.get(rank.train_step.remote(pa.Table.from_batches([batch])))


def _sync(pool: WorkerPool, rank, version: int) -> None:
    group = pool.begin_broadcast(version)
    ray.get(rank.publish.remote(version, group))
    _settle(pool, lambda: not pool.receiving())
    assert ray.get(rank.wait_published.remote()).error is None


def _check(pool: WorkerPool, rank, fixed, version: int, expect_workers: list[int]) -> None:
    learner = ray.get(rank.logprobs.remote(fixed))[0].tolist()
    active = sorted(m.worker_id for m in pool.m.live() if m.state == "active")
    assert active == expect_workers, pool.report()
    for wid in active:
        h = pool.handles[wid]
        assert ray.get(h.policy_version.remote()) == version
        engine = ray.get(h.teacher_forced_logprobs.remote(PROMPT, COMPLETION))
        assert max(abs(a - b) for a, b in zip(learner, engine)) < 1e-4, (wid, learner, engine)


def test_joined_and_re_added_engines_match_the_learner_after_each_sync(tmp_path):
    cfg = load_config(
        REPO / "deploy/configs/e2e_small.yaml",
        ["learner.num_ranks=1", "learner.zero_stage=1", "learner.lr=0.01", "learner.weight_sync.timeout_s=60"],
    )
    cache = REPO / ".cache"
    model_dir, _ = prepare_model(cfg, cache)
    fixed = traces_to_batch(
        [
            Trace(
                group_id="g",
                prompt_ids=tuple(PROMPT),
                completion_ids=tuple(COMPLETION),
                behaviour_logprobs=(-1.0,) * 3,
                reward=0.0,
                policy_version=0,
            )
        ]
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        replay, ranks, workers = start_actors(cfg, model_dir, cache)
        rank = ranks[0]
        pool = WorkerPool(cfg, workers, replay, rank, model_dir, cache, MetricsLog(tmp_path / "metrics.jsonl"))
        before = ray.get(rank.logprobs.remote(fixed))[0].tolist()
        _train(pool, rank, replay, 0)
        _sync(pool, rank, 1)
        _check(pool, rank, fixed, 1, [0])
        assert max(abs(a - b) for a, b in zip(before, ray.get(rank.logprobs.remote(fixed))[0].tolist())) > 1e-3

        pool.set_target(2)  # a worker joins mid-run: it gets version 2 in the re-formed group's first broadcast
        _settle(pool, lambda: pool.m.members[1].state == "joining")
        _train(pool, rank, replay, 1)
        _sync(pool, rank, 2)
        _check(pool, rank, fixed, 2, [0, 1])

        pool.set_target(1)  # removed: drained, shut down, left out of the next group
        _settle(pool, lambda: pool.m.members[1].state == "removed")
        _train(pool, rank, replay, 2)
        _sync(pool, rank, 3)
        _check(pool, rank, fixed, 3, [0])

        pool.set_target(2)  # re-added (a fresh actor), synced by re-sending version 3 without a learner step
        _settle(pool, lambda: pool.m.members[2].state == "joining")
        _sync(pool, rank, 3)
        _check(pool, rank, fixed, 3, [0, 2])
        _train(pool, rank, replay, 3)
        _sync(pool, rank, 4)  # and the group as re-formed keeps working
        _check(pool, rank, fixed, 4, [0, 2])
        assert pool.m.counters["workers_added"] == 2 and pool.m.counters["workers_removed"] == 1
        ray.get([a.shutdown.remote() for a in ranks + pool.actors()])
    finally:
        ray.shutdown()
