"""kill -9 a replay shard while inserts flow: every acknowledged group survives the restart."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray

from replay.config import ReplayConfig
from replay.sharding import shard_of
from replay.synthetic import group_batch
from services.replay_client import create_replay

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _held_group_ids(client) -> set[str]:
    total = sum(s.groups for s in client.stats())
    result = client.sample(total, 0, timeout_s=5.0) if total else None
    return set(result.batch["group_id"].to_pylist()) if result else set()


def _wait_restarted(client, k: int, old_pid: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ray.get(client.shards[k].pid.remote(), timeout=2.0) != old_pid:
                return
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"shard {k} did not restart within {timeout_s} s")


def test_kill_9_during_inserts_loses_no_acknowledged_group(tmp_path):
    client = create_replay(ReplayConfig(num_shards=2, segment_dir=str(tmp_path), max_staleness=None))
    victim_pid = ray.get(client.shards[0].pid.remote())
    sent, acked = set(), set()
    for b in range(30):
        gids = [f"b{b}-g{g}" for g in range(4)]
        if b == 10:
            os.kill(victim_pid, signal.SIGKILL)
        res = client.insert(group_batch(gids, group_size=2, seed=b))
        sent |= set(gids)
        acked |= set(gids) - {g for g, _ in res.rejected}
    assert {g for g in sent if shard_of(g, 2) == 1} <= acked  # the healthy shard never stopped
    _wait_restarted(client, 0, victim_pid)
    held = _held_group_ids(client)
    assert acked <= held <= sent  # acknowledged => durable; nothing invented
    for shard in client.shards:
        ray.kill(shard)
