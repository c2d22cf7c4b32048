"""Membership rules without Ray: deaths re-issue prompts, scaling drains the newest, the group re-forms on change."""

from __future__ import annotations

import pytest

from rollout.tasks import Problem
from services.membership import Membership, TooManyFailures

P = tuple(Problem(f"{i}+1=", str(i + 1), "arithmetic") for i in range(3))


def _pool(n: int = 2, max_replacements: int = 4) -> Membership:
    m = Membership(n, max_replacements)
    m.add_initial(n)
    return m


def test_dead_worker_with_a_call_in_flight_requeues_exactly_its_problems_and_dirties_the_group():
    m = _pool()
    m.on_dispatch(1, P)
    assert m.idle_active() == [0] and not m.group_dirty
    assert m.on_dead(1) == 3
    assert list(m.reissue) == [P] and m.counters["reissued_prompts"] == 3 and m.counters["worker_replacements"] == 1
    assert m.group_dirty and m.broadcast_to() == [0]
    assert m.on_dead(1) == 0  # a second report of the same death changes nothing
    assert m.counters["worker_deaths"] == 1


def test_replacement_joins_only_after_it_received_the_weights():
    m = _pool()
    m.on_dead(1)
    m.on_group_formed(m.plan_group())  # the survivors re-form first
    started, drained = m.reconcile()
    assert started == [2] and drained == []  # a new id: fresh seeds, its own metrics series
    assert m.members[2].state == "starting" and 2 not in m.plan_group()
    m.on_started(2)
    assert m.group_dirty and m.plan_group() == [0, 2] and m.wants_weights(policy_version=3)
    assert m.idle_active() == [0]  # a joiner gets no rollout call
    m.on_group_formed([0, 2])
    assert m.on_received(2, 3) and m.members[2].policy_version == 3 and m.idle_active() == [0, 2]
    assert m.counters["workers_added"] == 1


def test_scale_down_drains_the_newest_and_removes_it_only_when_idle():
    m = _pool(3)
    m.set_target(1)
    m.on_dispatch(2, P)
    started, drained = m.reconcile()
    assert started == [] and sorted(drained) == [1, 2] and m.group_dirty
    assert m.idle_active() == [0]
    assert m.removable(1) and not m.removable(2)  # 2 still owes its call
    m.on_rollout_done(2, 0)
    assert m.removable(2)
    assert m.plan_group() == [0]
    m.on_removed(1)
    assert m.reconcile() == ([], [])  # draining members do not count toward the target


def test_scale_down_prefers_members_that_are_not_active_yet():
    m = _pool(1)
    m.set_target(2)
    assert m.reconcile() == ([1], [])
    m.set_target(1)
    assert m.reconcile() == ([], [1])


def test_missed_broadcast_keeps_the_member_and_re_forms_the_group():
    m = _pool()
    m.members[1].receiving = True
    m.on_missed(1)
    assert m.group_dirty and m.members[1].state == "active" and m.counters["broadcast_drops"] == 1
    assert m.plan_group() == [0, 1] and m.wants_weights(policy_version=0)  # its weights are unknown now
    assert m.idle_active() == [0]  # an update that broke midway left it on the starting weights: no rollout
    m.on_group_formed([0, 1])
    assert not m.on_received(1, 3) and m.idle_active() == [0, 1] and not m.wants_weights(policy_version=3)


def test_too_many_deaths_stop_the_run_with_the_limit_named():
    m = _pool(1, max_replacements=1)
    m.on_dead(0)
    m.reconcile()
    with pytest.raises(TooManyFailures, match="max_worker_replacements=1"):
        m.on_dead(1)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_target_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="integer >= 1"):
        _pool().set_target(bad)


def test_report_lists_live_members_with_their_versions():
    m = _pool()
    m.on_dead(0)
    r = m.report("run-a")
    assert r.target == 2 and [(v.worker_id, v.state) for v in r.members] == [(1, "active")] and r.active == 1
    assert "worker 1: active" in r.format() and "run 'run-a'" in r.format()


def test_idle_workers_are_offered_least_recently_dispatched_first():
    m = Membership(2, max_replacements=4)
    a, b = m.add_initial(2)
    for wid in (a, b):
        m.on_started(wid)
        m.on_received(wid, 0)
    assert m.idle_active() == [a, b]
    for _ in range(3):  # a fast worker that is always idle first must not take every call
        first = m.idle_active()[0]
        m.on_dispatch(first, ())
        m.on_rollout_done(first, 0)
        assert m.idle_active()[0] != first


def _with_eval(n: int = 2) -> Membership:
    m = Membership(n, max_replacements=4, eval_members=1)
    m.add_initial(n)
    m.add_initial(1, role="eval")
    return m


def test_the_eval_member_takes_no_rollout_call_is_outside_the_group_and_not_counted_by_the_target():
    m = _with_eval()
    assert m.idle_active() == [0, 1] and m.active("eval") == [2]
    assert m.plan_group() == [0, 1] and m.broadcast_to() == [0, 1]
    assert m.reconcile() == ([], [])  # 2 rollout + 1 eval is the target
    report = m.report("r")
    assert report.active == 2 and "worker 2 (eval): active" in report.format()
    m.set_target(1)
    assert m.reconcile() == ([], [1])  # scaling drains rollout workers, never the eval worker


def test_a_dead_eval_member_is_replaced_by_an_eval_member_that_is_active_once_started():
    m = _with_eval()
    assert m.on_dead(2) == 0 and not m.group_dirty  # it was in no group: nobody's broadcast waits for it
    assert m.active("eval") == [] and m.counters["worker_replacements"] == 1
    started, drained = m.reconcile()
    assert started == [3] and drained == [] and m.members[3].role == "eval"
    m.on_started(3)
    assert m.active("eval") == [3] and not m.group_dirty and m.plan_group() == [0, 1]
    assert not m.wants_weights(policy_version=5)  # it is handed weights per evaluation, not by the group


def test_a_refused_call_is_reissued_and_the_member_waits_for_the_weights_alive():
    m = _pool()
    m.on_dispatch(1, P)
    assert m.on_refused(1) == 3
    assert list(m.reissue) == [P] and m.counters["reissued_prompts"] == 3 and m.counters["worker_deaths"] == 0
    assert m.members[1].state == "active" and m.members[1].in_flight is None
    assert m.group_dirty and m.wants_weights(policy_version=0) and m.idle_active() == [0]
    m.on_group_formed(m.plan_group())
    m.on_received(1, 4)
    assert m.idle_active() == [0, 1]
