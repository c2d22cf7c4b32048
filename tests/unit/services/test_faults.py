"""The loop's fault hook, with a fake pool: a planned kill fires once, at its moment, on its worker only."""

from __future__ import annotations

from types import SimpleNamespace

from services import faults


class FakePool:
    def __init__(self):
        self.killed: list[int] = []
        self.pids_fetched = False
        self.m = SimpleNamespace(
            members={
                0: SimpleNamespace(state="active", in_group=True),
                1: SimpleNamespace(state="active", in_group=True),
                2: SimpleNamespace(state="joining", in_group=True),
            }
        )

    def kill(self, worker: int) -> None:
        self.killed.append(worker)

    def fetch_pids(self) -> None:
        self.pids_fetched = True


def test_no_plan_is_the_no_op_hook():
    pool = FakePool()
    assert faults.hook(pool, environ={}) is faults.no_faults and not pool.pids_fetched


def test_a_planned_kill_fires_once_at_its_step_and_point():
    pool = FakePool()
    hook = faults.hook(pool, environ={faults.ENV: "worker=1,after_step=2,at=rollout;worker=2,after_step=0,at=join"})
    assert pool.pids_fetched
    hook("rollout", 1, 1)  # too early
    hook("rollout", 0, 5)  # another worker's rollout
    hook("broadcast", None, 5)  # another moment
    assert pool.killed == []
    hook("rollout", 1, 2)
    hook("rollout", 1, 3)  # used up
    assert pool.killed == [1]
    hook("join", None, 0)  # worker 2 is joining and in the re-formed group
    assert pool.killed == [1, 2]


def test_startup_kills_fire_once_at_their_point_and_the_loop_hook_ignores_them():
    env = {faults.ENV: "worker=1,at=start_join;worker=0,at=start"}
    pool = FakePool()
    assert faults.hook(pool, environ=env) is faults.no_faults  # the loop has nothing to do with these
    hook = faults.startup_hook(environ=env)
    killed: list[int] = []
    hook.kill_pid = killed.append
    hook("start", {1: 11})  # worker 0 not among these workers
    hook("start", {0: 10, 1: 11})
    hook("start", {0: 20, 1: 11})  # used up: the replacement under id 0 lives
    assert killed == [10]
    hook("start_join", {0: 20, 1: 11})
    hook("start_join", {0: 20, 1: 21})
    assert killed == [10, 11]
    assert faults.startup_hook(environ={faults.ENV: "worker=1,after_step=2,at=rollout"}) is faults._no_startup_faults
