"""`LearnerRank.abandon_weight_group` is served while rank 0 is blocked in a weight-group call.

The owner abandons the group when a member died, typically while rank 0 waits in `publish` for the
previous send to that member; on a one-thread actor the abandon would queue behind that call and training
would stall for the whole weight_sync.timeout_s. Here rank 0 blocks in `join_weight_group` (a rendezvous
whose second member never comes), the cheapest call that holds the actor's main thread.
"""

from __future__ import annotations

import time

import pytest
import ray

from learner.config import LearnerConfig
from learner.weight_transport import WeightSyncConfig, free_port
from services.learner_rank import LearnerRank

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_abandon_is_served_while_rank_0_is_blocked_in_a_weight_group_call():
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        rank = LearnerRank.options(num_cpus=0).remote(LearnerConfig(), "unused", 0, 1)
        ray.get(rank.node_address.remote())  # the actor is up
        blocked = rank.join_weight_group.remote(WeightSyncConfig(timeout_s=60), "127.0.0.1", free_port(), 2)
        time.sleep(1.0)
        # On a one-thread actor this get times out (GetTimeoutError): the abandon queues behind the rendezvous.
        ray.get(rank.abandon_weight_group.remote(), timeout=30)
        assert ray.wait([blocked], timeout=0)[0] == []  # ... which still holds the main thread
        ray.kill(rank)
    finally:
        ray.shutdown()
