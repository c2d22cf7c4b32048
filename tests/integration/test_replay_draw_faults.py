"""A replay shard killed after journalling a draw and before replying: the client waits for its restart and
gets the same groups back, so every acknowledged group is sampled exactly once (none lost, none twice)."""

from __future__ import annotations

import os

import pytest
import ray

from replay.config import ReplayConfig
from replay.sharding import shard_of
from replay.synthetic import group_batch
from services import faults
from services.replay_client import create_replay

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@pytest.fixture()
def ray_session(tmp_path, monkeypatch):
    # Ray's workers inherit the environment of the process that starts the local cluster
    marker = tmp_path / "shard-died"
    monkeypatch.setenv(faults.SHARD_DRAW_ENV, f"shard=0,marker={marker}")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield marker
    ray.shutdown()


def _fill(client, n: int) -> set[str]:
    gids = [f"g{i:03d}" for i in range(n)]
    res = client.insert(group_batch(gids, group_size=2, seed=1))
    assert not res.rejected
    return set(gids)


def _cfg(tmp_path) -> ReplayConfig:
    return ReplayConfig(num_shards=2, segment_dir=str(tmp_path / "replay"), max_staleness=None, sampler="fifo")


def test_routed_draw_reclaimed_after_the_shard_dies_before_replying(tmp_path, ray_session):
    client = create_replay(_cfg(tmp_path))
    acked = _fill(client, 16)
    on_victim = {g for g in acked if shard_of(g, 2) == 0}
    got: list[str] = []
    while len(got) < len(acked):
        routed = client.sample_to_ranks(4, 0, ranks=2, timeout_s=30.0)
        assert routed is not None, f"replay ran dry after {len(got)} of {len(acked)} groups"
        parts = [p for refs in routed.parts for p in ray.get(refs)]
        got += [g for p in parts for g in dict.fromkeys(p.traces["group_id"].to_pylist())]
    assert ray_session.exists(), "the fault never fired: shard 0 was not drawn from"
    assert sorted(got) == sorted(acked)  # exactly once each
    assert client.reclaimed_groups >= 1 and client.unrecovered_draws == 0
    stats = {s.shard_id: s for s in client.stats()}
    assert stats[0].reclaimed_groups == client.reclaimed_groups and stats[0].groups == 0
    assert on_victim  # the hash put groups on the killed shard


def test_plain_sample_reclaimed_after_the_shard_dies_before_replying(tmp_path, ray_session):
    client = create_replay(_cfg(tmp_path))
    acked = _fill(client, 12)
    got: list[str] = []
    while len(got) < len(acked):
        result = client.sample(3, 0, timeout_s=30.0)
        assert result is not None, f"replay ran dry after {len(got)} of {len(acked)} groups"
        got += list(dict.fromkeys(result.batch["group_id"].to_pylist()))
    assert ray_session.exists() and sorted(got) == sorted(acked)
    assert client.reclaimed_groups >= 1 and client.unrecovered_draws == 0
    assert os.environ[faults.SHARD_DRAW_ENV]
