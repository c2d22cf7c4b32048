"""RolloutWorker's rule after a broken weight update, on the actor's class without Ray or an engine."""

from __future__ import annotations

import pytest

from rollout.engine import EngineNeedsWeights
from services.rollout_worker import RolloutWorker


class _Engine:
    def __init__(self):
        self.policy_version, self.fail = 3, False

    def load_weights(self, tensors, version):
        for i, _ in enumerate(tensors):
            if self.fail and i == 1:  # the second bucket never arrives
                raise ConnectionError("sender went away")
        self.policy_version = version

    def reload_initial_weights(self):
        self.policy_version = 0


def _worker() -> object:
    worker = object.__new__(RolloutWorker.__ray_metadata__.modified_class)  # the class Ray wraps, no __init__
    worker.worker_id, worker.engine, worker.needs_weights = 7, _Engine(), False
    return worker


def test_after_an_update_broke_midway_the_worker_refuses_rollouts_until_a_complete_one():
    worker = _worker()
    worker.engine.fail = True
    with pytest.raises(ConnectionError):
        worker._load(iter([("a", None), ("b", None)]), 4)
    assert worker.engine.policy_version == 0 and worker.needs_weights  # back on the starting weights
    with pytest.raises(EngineNeedsWeights, match="rollout worker 7"):
        worker.rollout(2)  # generating now would label traces with version 0 after version 3
    worker.engine.fail = False
    worker._load(iter([("a", None), ("b", None)]), 5)
    assert worker.engine.policy_version == 5 and not worker.needs_weights
