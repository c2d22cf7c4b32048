"""WorkerPool's prompt cursors on resume, without Ray actors (fake handles record the calls they get)."""

from __future__ import annotations

import collections
import itertools
import types

import services.placement
import services.worker_pool as worker_pool
from rollout.tasks import TaskConfig, make_task
from services.membership import Membership
from services.worker_pool import WorkerPool


class _Method:
    def __init__(self, calls: list, name: str):
        self.calls, self.name = calls, name

    def remote(self, *args):
        self.calls.append((self.name, args))
        return object()  # a stand-in for the ObjectRef


class _Handle:
    def __init__(self):
        self.calls: list = []

    def __getattr__(self, name: str) -> _Method:
        return _Method(self.calls, name)


def _pool(n: int) -> WorkerPool:
    """A pool of `n` running workers as a resumed run has them at start (ids 0..n-1), no Ray."""
    pool = WorkerPool.__new__(WorkerPool)
    pool.cfg = types.SimpleNamespace(task=TaskConfig(seed=3))
    pool.task = make_task(pool.cfg.task)
    pool.m = Membership(n, 4)
    pool.handles = {wid: _Handle() for wid in pool.m.add_initial(n)}
    pool.streams = {wid: pool._stream(wid) for wid in pool.handles}
    pool.drawn, pool.cursors, pool.starts, pool.stops, pool.call_origin, pool.rollouts = {}, {}, {}, {}, {}, {}
    pool.reissue_origins = collections.deque()
    pool.log = types.SimpleNamespace(write=lambda *a, **k: None)
    return pool


def _nth(pool: WorkerPool, wid: int, n: int):
    """The n-th problem (0-based) a fresh stream of worker `wid` gives."""
    return next(itertools.islice(pool._stream(wid), n, None))


def test_resume_skips_each_streams_drawn_prompts_and_restores_batches(monkeypatch):
    monkeypatch.setattr(worker_pool.ray, "get", lambda refs: refs)
    pool = _pool(2)
    pool.restore_cursors({0: (8, 2), 1: (4, 1)})
    assert pool.drawn == {0: 8, 1: 4}
    assert next(pool.streams[0]) == _nth(pool, 0, 8) and next(pool.streams[1]) == _nth(pool, 1, 4)
    assert pool.handles[0].calls == [("restore_batches", (2,))] and pool.handles[1].calls == [("restore_batches", (1,))]


def test_a_replacement_after_resume_continues_the_stream_its_id_had_before_the_kill(monkeypatch):
    """Worker 2 replaced worker 0 before the driver was killed and drew 12 prompts from stream 2. The
    resumed run starts workers 0 and 1; when one of them dies its replacement is id 2 again, and must
    go on from prompt 12 and batch 3, not insert stream 2's first 12 prompts a second time."""
    monkeypatch.setattr(worker_pool.ray, "get", lambda refs: refs)
    monkeypatch.setattr(services.placement, "start_rollout_worker", lambda *a: _Handle())
    pool = _pool(2)
    pool.model_dir = pool.cache_dir = pool.replay = None
    pool.restore_cursors({0: (8, 2), 1: (4, 1), 2: (12, 3)})
    assert 2 not in pool.drawn  # no worker 2 yet
    pool.m.on_dead(0)
    pool.reconcile()
    assert pool.drawn[2] == 12 and next(pool.streams[2]) == _nth(pool, 2, 12)
    assert pool.handles[2].calls[0] == ("restore_batches", (3,))  # before its first rollout
    pool.dispatch(2, 4)
    assert pool.handles[2].calls[-1][0] == "rollout" and pool.handles[2].calls[-1][1][2] == (2, 16)


def test_a_replacement_id_new_to_the_run_starts_its_stream_at_zero(monkeypatch):
    monkeypatch.setattr(worker_pool.ray, "get", lambda refs: refs)
    monkeypatch.setattr(services.placement, "start_rollout_worker", lambda *a: _Handle())
    pool = _pool(2)
    pool.model_dir = pool.cache_dir = pool.replay = None
    pool.m.on_dead(1)
    pool.reconcile()
    assert pool.drawn.get(2, 0) == 0 and next(pool.streams[2]) == _nth(pool, 2, 0)
    assert [c[0] for c in pool.handles[2].calls] == ["pid"]


def test_requeued_calls_are_dispatched_first_with_their_problems_and_origin():
    pool = _pool(2)
    pool.requeue([(1, 8)], num_prompts=4)
    pool.dispatch(0, 4)
    name, (n, problems, origin) = pool.handles[0].calls[-1]
    assert name == "rollout" and origin == (1, 8) and n == 4
    assert problems == [_nth(pool, 1, p) for p in range(4, 8)]  # stream 1's prompts 4..7
    assert pool.drawn == {}  # nothing new was drawn
    pool.dispatch(0, 4)
    assert pool.handles[0].calls[-1][1][2] == (0, 4)  # then the worker's own stream
