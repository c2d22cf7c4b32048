"""Rollout-worker membership as pure state: who is in the run, in the weight group, and owes what.

No Ray here (services/worker_pool.py drives it with actor handles and refs), so every rule is
unit-tested in tests/unit/services/test_membership.py.

A member's life (`MemberState`):
    starting --constructed--> joining --first receive in a group that holds it--> active
    active --scale down--> draining --its in-flight call done, no receive pending--> removed
    any --actor died or its call failed--> dead (replaced while the pool is below its target)
Roles: a `rollout` member takes rollout calls and is in the weight group; an `eval` member
(`run.eval_worker: dedicated`) only evaluates, on weights it is handed per evaluation (not through the
group, whose broadcasts wait for every member: an evaluating member would hold up everyone's update).
It is active once constructed. The target counts rollout members; the eval member is kept at one
(replaced like any other when it dies).
Invariants:
- only `active` rollout members get rollout calls; a joining member produces nothing before it holds the
  weights of the group's first broadcast (the current policy_version), nor does a member that missed a
  broadcast (an update that broke midway leaves its engine on the starting weights): an engine's
  policy_version never goes back in what it generates.
- the weight group is re-formed (`group_dirty`) whenever its membership would change: a member
  died or missed a broadcast, joined, or started draining. Until then nobody leaves it silently.
- a dead member's unfinished call's problems go to `reissue` and are given to the next call;
  groups it already got into replay stay there (at-least-once: a worker that died between its
  replay insert and its reply has its prompts sampled twice).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Literal

from rollout.tasks import Problem

MemberState = Literal["starting", "joining", "active", "draining", "dead", "removed"]
Role = Literal["rollout", "eval"]
_SERVING = ("starting", "joining", "active")  # count toward the target


class TooManyFailures(RuntimeError):
    """Rollout workers keep dying: more replacements than `run.max_worker_replacements`."""


@dataclasses.dataclass
class Member:
    worker_id: int
    state: MemberState = "starting"
    role: Role = "rollout"
    policy_version: int = 0  # weights in its engine, as last reported (a fresh engine holds version 0)
    in_group: bool = False  # a member of the weight group as last formed
    in_flight: tuple[Problem, ...] | None = None  # problems of its unfinished rollout call
    receiving: bool = False  # a receive_weights call is pending
    needs_weights: bool = False  # missed a broadcast: no rollout call until a receive succeeds
    last_dispatch: int = 0  # sequence number of its latest rollout call (0 = none yet)


@dataclasses.dataclass(frozen=True)
class MemberView:
    worker_id: int
    state: MemberState
    policy_version: int
    role: Role = "rollout"


@dataclasses.dataclass(frozen=True)
class MembershipReport:
    """What `flywheel scale` prints: the target and every member that is not gone."""

    run_name: str
    target: int
    members: tuple[MemberView, ...]

    @property
    def active(self) -> int:
        """Active rollout workers (what the target counts)."""
        return sum(m.state == "active" and m.role == "rollout" for m in self.members)

    def format(self) -> str:
        tag = {"rollout": "", "eval": " (eval)"}
        rows = ", ".join(
            f"worker {m.worker_id}{tag[m.role]}: {m.state} (policy_version {m.policy_version})" for m in self.members
        )
        members = rows or "no members"
        return f"run {self.run_name!r}: target {self.target} rollout worker(s), {self.active} active; {members}"


class Membership:
    def __init__(self, target: int, max_replacements: int, eval_members: int = 0):
        if target < 1:
            raise ValueError(f"rollout worker target={target}; a run needs at least 1 rollout worker")
        self.members: dict[int, Member] = {}
        self.target = target
        self.eval_target = eval_members
        self.max_replacements = max_replacements
        self.next_id = 0
        self.group_dirty = False
        self._dispatch_seq = 0
        self.reissue: collections.deque[tuple[Problem, ...]] = collections.deque()
        self.counters = dict.fromkeys(
            (
                "worker_replacements",
                "reissued_prompts",
                "broadcast_drops",
                "workers_added",
                "workers_removed",
                "worker_deaths",
            ),
            0,
        )

    # -- who is here ------------------------------------------------------------------------------
    def add_initial(self, n: int, role: Role = "rollout") -> list[int]:
        """`n` workers already constructed and in the weight group formed at start-up."""
        return [self._new(state="active", in_group=role == "rollout", role=role) for _ in range(n)]

    def _new(self, **fields) -> int:
        wid, self.next_id = self.next_id, self.next_id + 1
        self.members[wid] = Member(wid, **fields)
        return wid

    def live(self) -> list[Member]:
        return [m for m in self.members.values() if m.state not in ("dead", "removed")]

    def serving(self, role: Role = "rollout") -> list[Member]:
        return [m for m in self.members.values() if m.state in _SERVING and m.role == role]

    def active(self, role: Role) -> list[int]:
        return sorted(m.worker_id for m in self.members.values() if m.state == "active" and m.role == role)

    def idle_active(self) -> list[int]:
        """Active rollout workers with no call in flight, least recently dispatched first: when the replay
        backlog frees room for one call at a time, a fast worker must not starve the others."""
        idle = [
            m
            for m in self.members.values()
            if m.state == "active" and m.role == "rollout" and m.in_flight is None and not m.needs_weights
        ]
        return [m.worker_id for m in sorted(idle, key=lambda m: m.last_dispatch)]

    def report(self, run_name: str) -> MembershipReport:
        return MembershipReport(
            run_name,
            self.target,
            tuple(MemberView(m.worker_id, m.state, m.policy_version, m.role) for m in self.live()),
        )

    # -- scaling ----------------------------------------------------------------------------------
    def set_target(self, n: int) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"rollout worker target={n!r}; give an integer >= 1")
        self.target = n

    def reconcile(self) -> tuple[list[int], list[int]]:
        """Bring the serving count to the target: (ids to start, ids to drain). Drains the newest first.
        An eval member that died is replaced here too (its id is among those to start)."""
        to_start = [self._new(role="eval") for _ in range(self.eval_target - len(self.serving("eval")))]
        serving = self.serving()
        if len(serving) < self.target:
            return to_start + [self._new() for _ in range(self.target - len(serving))], []
        surplus = sorted(serving, key=lambda m: (m.state == "active", -m.worker_id))[: len(serving) - self.target]
        for m in surplus:
            m.state = "draining"
            self.group_dirty = True
        return to_start, [m.worker_id for m in surplus]

    def on_started(self, wid: int) -> None:
        m = self.members[wid]
        if m.state == "starting" and m.role == "eval":  # no weight group to join
            m.state = "active"
        elif m.state == "starting":
            m.state = "joining"
            self.group_dirty = True

    def removable(self, wid: int) -> bool:
        m = self.members[wid]
        return m.state == "draining" and m.in_flight is None and not m.receiving

    def on_removed(self, wid: int) -> None:
        self.members[wid].state = "removed"
        self.members[wid].in_group = False
        self.counters["workers_removed"] += 1

    # -- calls ------------------------------------------------------------------------------------
    def on_dispatch(self, wid: int, problems: tuple[Problem, ...]) -> None:
        self.members[wid].in_flight = tuple(problems)
        self._dispatch_seq += 1
        self.members[wid].last_dispatch = self._dispatch_seq

    def on_rollout_done(self, wid: int, policy_version: int) -> None:
        m = self.members[wid]
        m.in_flight = None
        m.policy_version = max(m.policy_version, policy_version)

    def on_refused(self, wid: int) -> int:
        """The member refused its call (an update broke midway; its engine is back on the starting weights):
        queue the call's problems again, re-send it the weights; return how many prompts were re-issued."""
        m = self.members[wid]
        problems, m.in_flight = m.in_flight or (), None
        m.needs_weights = self.group_dirty = True
        if problems:
            self.reissue.append(problems)
            self.counters["reissued_prompts"] += len(problems)
        return len(problems)

    def on_dead(self, wid: int) -> int:
        """The member's actor is gone. Queue its unfinished problems; return how many were re-issued."""
        m = self.members[wid]
        if m.state in ("dead", "removed"):
            return 0
        was_serving = m.state in _SERVING
        m.state, m.receiving = "dead", False
        self.counters["worker_deaths"] += 1
        if m.in_group:
            self.group_dirty = True
        m.in_group = False
        reissued = 0
        if m.in_flight:
            self.reissue.append(m.in_flight)
            reissued = len(m.in_flight)
            self.counters["reissued_prompts"] += reissued
        m.in_flight = None
        if was_serving:
            if self.counters["worker_replacements"] >= self.max_replacements:
                raise TooManyFailures(
                    f"rollout worker {wid} died and {self.counters['worker_replacements']} replacements were already "
                    "made "
                    f"(run.max_worker_replacements={self.max_replacements}); fix the cause (see the worker's log) or "
                    "raise the limit"
                )
            self.counters["worker_replacements"] += 1
        return reissued

    # -- the weight group -------------------------------------------------------------------------
    def plan_group(self) -> list[int]:
        """Members of the next weight group, in rank order (rank i + 1): the constructed serving ones."""
        return [m.worker_id for m in self.members.values() if m.state in ("joining", "active") and m.role == "rollout"]

    def on_group_formed(self, plan: list[int]) -> None:
        for m in self.members.values():
            m.in_group = m.worker_id in plan
        self.group_dirty = False

    def broadcast_to(self) -> list[int]:
        """Members a broadcast on the current group must reach."""
        return [m.worker_id for m in self.live() if m.in_group]

    def on_received(self, wid: int, policy_version: int) -> bool:
        """A receive succeeded; True if this made a joining member active."""
        m = self.members[wid]
        m.receiving = m.needs_weights = False
        m.policy_version = policy_version
        if m.state == "joining":
            m.state = "active"
            self.counters["workers_added"] += 1
            return True
        return False

    def on_missed(self, wid: int) -> None:
        """An alive member did not get a broadcast (timeout, broken group): re-form the group with it; it
        generates nothing until it holds the current weights again."""
        m = self.members[wid]
        m.receiving, m.needs_weights = False, True
        self.counters["broadcast_drops"] += 1
        self.group_dirty = True

    def wants_weights(self, policy_version: int) -> bool:
        """A re-formed group would bring someone the current weights: a joiner, or a member behind."""
        return self.group_dirty and any(
            m.state == "joining" or m.needs_weights or (m.state == "active" and m.policy_version < policy_version)
            for m in self.members.values()
            if m.role == "rollout"
        )
