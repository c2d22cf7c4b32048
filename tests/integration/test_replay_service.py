"""Replay shards as real Ray actors: waiting samples, back-pressure, sharded client, concurrency, kill -9."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
import ray

from replay.config import ReplayConfig
from replay.parts import join_parts
from replay.synthetic import group_batch
from replay.table import ReplayTable
from services.replay_client import ReplayClient, create_replay
from services.replay_shard import ReplayShard

pytestmark = pytest.mark.integration
# The helper actors below are defined here; Ray workers cannot import this test module by name.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(n)]


def _kill(actors: list) -> None:
    for actor in actors:
        ray.kill(actor)


def _groups(result) -> list[str]:
    return list(dict.fromkeys(result.batch["group_id"].to_pylist()))


def test_waiting_sample_is_woken_by_an_insert():
    shard = ReplayShard.remote(ReplayConfig(), 0)
    start = time.monotonic()
    pending = shard.sample.remote(2, 0, 10.0)
    time.sleep(0.3)
    assert ray.get(shard.insert.remote(group_batch(_ids("g", 2)))).accepted_groups == 2
    result = ray.get(pending)
    assert _groups(result) == ["g000", "g001"] and time.monotonic() - start < 5.0
    assert ray.get(shard.sample.remote(1, 0, 0.2)) is None
    ray.kill(shard)


def test_blocked_insert_proceeds_when_a_sample_frees_room():
    shard = ReplayShard.remote(ReplayConfig(capacity_groups=2, on_full="block", insert_timeout_s=10.0), 0)
    ray.get(shard.insert.remote(group_batch(_ids("a", 2))))
    pending = shard.insert.remote(group_batch(["b"]))
    ready, _ = ray.wait([pending], timeout=0.5)
    assert not ready  # back-pressure: the insert waits
    assert _groups(ray.get(shard.sample.remote(1, 0))) == ["a000"]
    assert ray.get(pending).accepted_groups == 1
    assert ray.get(shard.stats.remote()).groups == 2
    ray.kill(shard)


def test_rate_limiter_blocks_and_unblocks_both_sides():
    # samples_per_insert=1, error_buffer=1: inserts - samples stays within [0, 2]
    cfg = ReplayConfig(samples_per_insert=1.0, error_buffer=1.0, max_times_sampled=None, insert_timeout_s=10.0)
    shard = ReplayShard.remote(cfg, 0)
    waiting_sample = shard.sample.remote(1, 0, 10.0)
    assert not ray.wait([waiting_sample], timeout=0.3)[0]  # nothing inserted yet
    ray.get(shard.insert.remote(group_batch(["a"])))
    assert _groups(ray.get(waiting_sample)) == ["a"]  # diff 1 - 1 = 0
    assert ray.get(shard.sample.remote(1, 0, 0.2)) is None  # would make diff -1: the learner may not run ahead
    ray.get(shard.insert.remote(group_batch(["b", "c"])))  # diff 2
    waiting_insert = shard.insert.remote(group_batch(["d"]))  # would make diff 3
    assert not ray.wait([waiting_insert], timeout=0.5)[0]  # rollout may not run ahead either
    assert ray.get(shard.sample.remote(1, 0)) is not None
    assert ray.get(waiting_insert).accepted_groups == 1
    ray.kill(shard)


def test_blocked_insert_times_out_with_a_clear_signal():
    shard = ReplayShard.remote(ReplayConfig(capacity_groups=1, on_full="block", insert_timeout_s=0.2), 0)
    ray.get(shard.insert.remote(group_batch(["a"])))
    res = ray.get(shard.insert.remote(group_batch(["b"])))
    assert res.accepted_groups == 0 and "replay full" in res.rejected[0][1]
    ray.kill(shard)


def test_client_spreads_groups_and_samples_across_shards():
    client = create_replay(ReplayConfig(num_shards=3))
    res = client.insert(group_batch(_ids("g", 60), group_size=2))
    assert (res.accepted_groups, res.accepted_traces, res.rejected) == (60, 120, ())
    sizes = [s.groups for s in client.stats()]
    assert sum(sizes) == 60 and min(sizes) > 0
    out = client.sample(30, 0, timeout_s=1.0)
    assert len(set(_groups(out))) == 30 and out.batch.num_rows == 60 and len(out.group_weights) == 30
    assert sum(s.groups for s in client.stats()) == 30
    assert client.sample(31, 0, timeout_s=0.2) is None
    start = time.monotonic()
    assert client.sample(31, 0, timeout_s=0.0) is None and time.monotonic() - start < 0.5  # a poll does not block
    with pytest.raises(ValueError, match="at least one group"):
        client.sample(0, 0)
    _kill(client.shards)


@ray.remote(num_cpus=0)
class _Producer:
    def run(self, client: ReplayClient, prefix: str, n_batches: int) -> int:
        accepted = 0
        for b in range(n_batches):
            accepted += client.insert(group_batch(_ids(f"{prefix}-{b}-", 4), group_size=2, seed=b)).accepted_groups
        return accepted


def test_sample_to_ranks_leaves_the_payload_in_the_shards():
    client = create_replay(ReplayConfig(num_shards=2, max_staleness=None))
    client.insert(group_batch(_ids("r", 12), group_size=2))
    routed = client.sample_to_ranks(6, 0, ranks=2, timeout_s=5.0)
    assert routed is not None and routed.meta.num_groups == 6
    assert all(len(ids) >= 1 for ids in routed.meta.group_ids)  # every rank gets groups
    assert all(isinstance(ref, ray.ObjectRef) for refs in routed.parts for ref in refs)
    seen = []
    for k, refs in enumerate(routed.parts):
        part = join_parts(ray.get(refs))  # what Ray resolves in rank k's process
        assert tuple(dict.fromkeys(part.traces.column("group_id").to_pylist())) == routed.meta.group_ids[k]
        assert part.traces.num_rows == routed.meta.traces[k]
        seen += routed.meta.group_ids[k]
    assert len(set(seen)) == 6 and sum(st.groups for st in client.stats()) == 6
    assert client.groups_known() <= 6  # the client's cached counts never overstate what is left
    assert client.sample_to_ranks(7, 0, ranks=2, timeout_s=0.3) is None  # 6 left: not enough
    _kill(client.shards)


def test_concurrent_producers_and_a_sampler_lose_and_duplicate_nothing():
    client = create_replay(ReplayConfig(num_shards=2))
    producers = [_Producer.remote() for _ in range(3)]
    runs = [p.run.remote(client, f"p{i}", 10) for i, p in enumerate(producers)]
    seen: list[str] = []
    while len(ray.wait(runs, num_returns=3, timeout=0)[0]) < 3 or sum(s.groups for s in client.stats()) >= 4:
        result = client.sample(4, 0, timeout_s=0.2)
        if result is not None:
            seen += _groups(result)
    assert sum(ray.get(runs)) == 120
    held = sum(s.groups for s in client.stats())
    assert len(seen) == len(set(seen)) and len(seen) + held == 120
    _kill(client.shards + producers)


@ray.remote(num_cpus=0)
class _SlowShard:
    """A shard whose probe takes `delay_s`: stands in for an overloaded or paused shard."""

    def __init__(self, delay_s: float):
        self.table, self.delay_s = ReplayTable(ReplayConfig()), delay_s

    def insert(self, batch):
        return self.table.insert(batch)

    def available(self, policy_version: int) -> int:
        time.sleep(self.delay_s)
        return self.table.available(policy_version)

    def sample(self, n_groups: int, policy_version: int, timeout_s: float = 0.0):
        return self.table.sample(n_groups, policy_version)


def test_client_keeps_sampling_when_one_shard_is_slow():
    fast = [ReplayShard.remote(ReplayConfig(), k) for k in range(2)]
    client = ReplayClient(fast + [_SlowShard.remote(5.0)], probe_timeout_s=0.3)
    client.insert(group_batch(_ids("g", 30)))
    start = time.monotonic()
    out = client.sample(4, 0, timeout_s=0.0)
    assert out is not None and len(_groups(out)) == 4 and time.monotonic() - start < 2.0
    _kill(client.shards)


@pytest.mark.faults
def test_kill_9_shard_restarts_with_every_acknowledged_trace(tmp_path):
    cfg = ReplayConfig(segment_dir=str(tmp_path), sampler="fifo")
    client = create_replay(cfg)
    batch = group_batch(_ids("g", 10), group_size=3)
    assert client.insert(batch).accepted_groups == 10
    assert _groups(client.sample(3, 0)) == _ids("g", 3)
    pid = ray.get(client.shards[0].pid.remote())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        try:
            stats = client.stats()
            if stats and ray.get(client.shards[0].pid.remote()) != pid:
                break
        except ray.exceptions.RayActorError:
            pass
        assert time.monotonic() < deadline, "shard did not restart within 30 s"
        time.sleep(0.2)
    assert (stats[0].groups, stats[0].traces) == (7, 21)
    rest = client.sample(7, 0)
    expected = batch.slice(9, 21)
    assert rest.batch.equals(expected)
    _kill(client.shards)
