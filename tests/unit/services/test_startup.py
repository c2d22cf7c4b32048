"""Start-up replacement logic with fake actors: dead workers are replaced under their own id, the
rendezvous is retried with everyone, the budget bounds it and the error names the worker and the cause."""

from __future__ import annotations

import pytest

from services.startup import Rendezvous, ReplacementBudget, StartupDeath, StartupFailed, form_group, settle


class FakeCluster:
    """Actors are strings "w<id>#<generation>"; `die` lists the actors that are dead when probed."""

    def __init__(self, die=(), die_in_join=()):
        self.die, self.die_in_join = set(die), set(die_in_join)
        self.started: list[str] = []
        self.attempts: list[dict] = []

    def restart(self, wid: int) -> str:
        gen = sum(a.startswith(f"w{wid}#") for a in self.started) + 1
        self.started.append(f"w{wid}#{gen}")
        return self.started[-1]

    def probe(self, handles: dict) -> dict[int, str]:
        return {wid: f"ActorDiedError: {a}" for wid, a in handles.items() if a in self.die}

    def attempt(self, handles: dict) -> Rendezvous:
        self.attempts.append(dict(handles))
        dead = {wid: f"ActorDiedError: {a} in join" for wid, a in handles.items() if a in self.die_in_join}
        return Rendezvous(dead, TimeoutError("rank 0 timed out") if dead else None)


def test_dead_workers_are_replaced_under_their_own_id_until_all_are_up():
    c = FakeCluster(die={"w1#1", "w1#2", "w2#1"})
    handles = settle({w: c.restart(w) for w in range(3)}, c.probe, c.restart, budget := ReplacementBudget(5))
    assert handles == {0: "w0#1", 1: "w1#3", 2: "w2#2"}
    assert budget.deaths == [
        StartupDeath(1, "start", "ActorDiedError: w1#1"),
        StartupDeath(2, "start", "ActorDiedError: w2#1"),
        StartupDeath(1, "start", "ActorDiedError: w1#2"),
    ]
    assert c.started == ["w0#1", "w1#1", "w2#1", "w1#2", "w2#2", "w1#3"]  # only the dead ones restarted


def test_a_worker_that_keeps_dying_fails_start_up_naming_it_and_the_cause():
    c = FakeCluster(die={"w1#1", "w1#2", "w1#3"})
    with pytest.raises(StartupFailed, match=r"rollout worker 1 died during start-up \(start\): ActorDiedError: w1#3"):
        settle({w: c.restart(w) for w in range(2)}, c.probe, c.restart, ReplacementBudget(2))
    with pytest.raises(StartupFailed, match=r"run.max_worker_replacements=0"):
        settle({0: "w0#1"}, lambda h: {0: "boom"}, c.restart, ReplacementBudget(0))


def test_a_member_dead_in_the_rendezvous_is_replaced_and_everyone_retries():
    c = FakeCluster(die={"w0#2"}, die_in_join={"w0#1"})  # w0 dies joining; its first replacement at build
    handles = {w: c.restart(w) for w in range(2)}
    out = form_group(handles, c.attempt, c.restart, c.probe, budget := ReplacementBudget(4))
    assert out == {0: "w0#3", 1: "w1#1"}
    assert c.attempts == [{0: "w0#1", 1: "w1#1"}, {0: "w0#3", 1: "w1#1"}]  # same ranks, fresh actor for w0
    assert [(d.worker_id, d.during) for d in budget.deaths] == [(0, "join"), (0, "start")]


def test_a_failed_rendezvous_with_nobody_dead_is_raised_not_retried():
    c = FakeCluster()
    err = RuntimeError("weight-sync group: bad secret")
    attempts = []

    def attempt(handles):
        attempts.append(handles)
        return Rendezvous({}, err)

    with pytest.raises(RuntimeError, match="bad secret"):
        form_group({0: c.restart(0)}, attempt, c.restart, c.probe, ReplacementBudget(4))
    assert len(attempts) == 1


def test_rendezvous_deaths_spend_the_same_budget():
    c = FakeCluster(die_in_join={"w1#1", "w1#2"})
    with pytest.raises(StartupFailed, match=r"rollout worker 1 died during start-up \(join\)"):
        form_group({w: c.restart(w) for w in range(2)}, c.attempt, c.restart, c.probe, ReplacementBudget(1))
