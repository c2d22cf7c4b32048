"""Start-up of the rollout workers and the first weight group, replacing workers that die on the way.

Contract: `start_workers` returns exactly the requested worker ids, each an actor whose engine is built
(its `pid` answered); `form_start_group` returns once learner rank 0 and every worker hold one weight
group (world 1 + len(workers), ranks in worker-id order). A worker that dies meanwhile (its call fails
with `RayActorError`) is replaced by a fresh actor under the same worker id (nothing of it reached replay
yet, so its seeds stay the run's), and the rendezvous is retried on a fresh port with everyone. Each
replacement spends one of `run.max_worker_replacements` (the pool later counts on from there); when
they run out, `StartupFailed` names the worker, the phase and the cause.

A rendezvous with a dead member cannot complete: the survivors leave it after `weight_sync.timeout_s`
(gloo/NCCL offer no way to cancel a member's join). A failed rendezvous in which nobody died is not a
start-up death (a port, the secret, a timeout too short for the node): its error is raised as before.

The retry logic (`settle`, `form_group`) is pure, driven by callables, so it is unit-tested without Ray.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class StartupFailed(RuntimeError):
    """Rollout workers kept dying during start-up: more replacements than `run.max_worker_replacements`."""


@dataclasses.dataclass(frozen=True)
class StartupDeath:
    """A rollout worker that died during start-up and was replaced (the pool logs and counts it)."""

    worker_id: int
    during: str  # "start" (engine build) or "join" (the first weight group's rendezvous)
    error: str


class ReplacementBudget:
    """Replacements allowed during start-up; `spend` records a death or raises `StartupFailed`."""

    def __init__(self, max_replacements: int):
        self.max_replacements = max_replacements
        self.deaths: list[StartupDeath] = []

    def spend(self, death: StartupDeath) -> None:
        if len(self.deaths) >= self.max_replacements:
            raise StartupFailed(
                f"rollout worker {death.worker_id} died during start-up ({death.during}): {death.error}; "
                f"{len(self.deaths)} replacement(s) were already made (run.max_worker_replacements="
                f"{self.max_replacements}). Fix the cause (see the worker's log: `ray logs`, or the driver's "
                "output above) or raise run.max_worker_replacements"
            )
        self.deaths.append(death)
        log.warning(
            f"rollout worker {death.worker_id} died during start-up ({death.during}): {death.error}; "
            f"starting a replacement ({len(self.deaths)}/{self.max_replacements})"
        )


def settle(
    handles: dict,
    probe: Callable[[dict], dict[int, str]],
    restart: Callable[[int], object],
    budget: ReplacementBudget,
    during: str = "start",
) -> dict:
    """Probe `handles` (worker id -> actor) until every one is up; each dead one (`probe` returns
    worker id -> cause) is replaced by `restart(worker_id)` and probed again. Returns `handles`, updated."""
    pending = dict(handles)
    while pending:
        dead = probe(pending)
        pending = {}
        for wid, cause in sorted(dead.items()):
            budget.spend(StartupDeath(wid, during, cause))
            handles[wid] = pending[wid] = restart(wid)
    return handles


@dataclasses.dataclass(frozen=True)
class Rendezvous:
    """How one attempt at the start-up weight group ended: `dead` worker id -> cause; `error`: the first
    failure of a member that did not die (None: the group formed)."""

    dead: dict[int, str]
    error: BaseException | None = None


def form_group(
    handles: dict,
    attempt: Callable[[dict], Rendezvous],
    restart: Callable[[int], object],
    probe: Callable[[dict], dict[int, str]],
    budget: ReplacementBudget,
) -> dict:
    """Retry the rendezvous until it forms with every worker; members that died are replaced (and their
    replacements' engines built) before the next attempt. An attempt that failed with nobody dead raises."""
    while True:
        outcome = attempt(handles)
        if not outcome.dead:
            if outcome.error is not None:
                raise outcome.error
            return handles
        for wid, cause in sorted(outcome.dead.items()):
            budget.spend(StartupDeath(wid, "join", cause))
            handles[wid] = restart(wid)
        settle(handles, probe, restart, budget, during="start")
