"""Test-only fault injection: kill -9 a rollout worker at a chosen moment, or a replay shard mid-draw.

Set `FLYWHEEL_FAULT_KILL_WORKER="worker=1,after_step=2,at=rollout"` in the driver's environment
(several faults: separate them with `;`): once the learner has finished `after_step` steps, the
loop kills worker `worker`'s process right after handing it a rollout call (`at=rollout`: that call
is unfinished), right after queueing a weight broadcast to it (`at=broadcast`), or right after
queueing the re-formed group it is joining (`at=join`: the others wait for it in the rendezvous).
Two points come before the loop, in the driver's start-up (services/placement.py, `after_step` unused):
`at=start` once every engine is built, before the first weight group's rendezvous; `at=start_join`
right after that rendezvous is queued. Each planned fault fires once (a replacement under the same
id is not killed again). Unset (the default), nothing extra happens. The worker must run on the driver's host.
"""

from __future__ import annotations

import os
import signal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ENV = "FLYWHEEL_FAULT_KILL_WORKER"


class KillWorker(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    worker: int = Field(ge=0)
    after_step: int = Field(0, ge=0)
    at: Literal["rollout", "broadcast", "join", "start", "start_join"] = "rollout"


def parse(text: str) -> KillWorker:
    """`"worker=1,after_step=2,at=rollout"` -> KillWorker; ValueError naming the variable and the bad part."""
    fields = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{ENV}={text!r}: {part!r} is not key=value (e.g. worker=1,after_step=2,at=rollout)")
        fields[key.strip()] = value.strip()
    try:
        return KillWorker.model_validate(fields)
    except ValidationError as e:
        bad = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ValueError(f"{ENV}={text!r} is invalid ({bad}); e.g. worker=1,after_step=2,at=rollout") from None


def from_env(environ=os.environ) -> list[KillWorker]:
    return [parse(part) for part in environ.get(ENV, "").split(";") if part.strip()]


class FaultHook:
    """The loop's test hook: at each injection point the loop calls `hook(at, worker_id, learner_steps)`;
    a planned fault whose moment it is kills that worker (through the pool) and is used up."""

    def __init__(self, faults: list[KillWorker], pool):
        self.faults, self.pool = list(faults), pool

    def __call__(self, at: str, wid: int | None, learner_steps: int) -> None:
        for f in self.faults:
            member = self.pool.m.members.get(f.worker)
            if (
                f.at == at
                and learner_steps >= f.after_step
                and wid in (None, f.worker)
                and member is not None
                and member.state == ("joining" if at == "join" else "active")
                and (at != "join" or member.in_group)
            ):
                self.faults.remove(f)
                self.pool.kill(f.worker)
                return


STARTUP_POINTS = ("start", "start_join")


def no_faults(at: str, wid: int | None, learner_steps: int) -> None:
    """The production hook: nothing."""


def hook(pool, environ=os.environ):
    """The loop's fault hook: `FaultHook` when `FLYWHEEL_FAULT_KILL_WORKER` plans faults, else `no_faults`."""
    planned = [f for f in from_env(environ) if f.at not in STARTUP_POINTS]
    if not planned:
        return no_faults
    pool.fetch_pids()
    return FaultHook(planned, pool)


class StartupFaults:
    """The start-up's test hook: `hook(at, pids)` (worker id -> process id, read while the workers were idle:
    a worker busy in the rendezvous cannot answer) kills -9 each planned worker whose point `at` is; each
    fault is used up when it fires."""

    def __init__(self, faults: list[KillWorker], kill_pid=None):
        self.faults, self.kill_pid = list(faults), kill_pid or _kill_pid

    def __call__(self, at: str, pids: dict[int, int]) -> None:
        for f in [f for f in self.faults if f.at == at and f.worker in pids]:
            self.faults.remove(f)
            self.kill_pid(pids[f.worker])


def _kill_pid(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def startup_hook(environ=os.environ):
    """The start-up's fault hook: `StartupFaults` for the planned `at=start`/`at=start_join` kills, else a no-op."""
    planned = [f for f in from_env(environ) if f.at in STARTUP_POINTS]
    return StartupFaults(planned) if planned else _no_startup_faults


def _no_startup_faults(at: str, pids: dict[int, int]) -> None:
    """The production start-up hook: nothing."""


SHARD_DRAW_ENV = "FLYWHEEL_FAULT_KILL_SHARD_AFTER_DRAW"


def shard_draw_hook(shard_id: int, environ=os.environ) -> None:
    """Called by a replay shard right after it journalled a non-empty draw, before it replies. With
    `FLYWHEEL_FAULT_KILL_SHARD_AFTER_DRAW="shard=<k>,marker=<path>"` set (in the environment Ray's workers
    inherit), shard k kills itself with SIGKILL the first time, leaving `marker` so that its restarted
    process does not die again. Unset (the default), nothing happens."""
    spec = environ.get(SHARD_DRAW_ENV)
    if not spec:
        return
    fields = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    if "shard" not in fields or "marker" not in fields:
        raise ValueError(f"{SHARD_DRAW_ENV}={spec!r}: expected shard=<k>,marker=<path>")
    marker = fields["marker"]
    if int(fields["shard"]) != shard_id or os.path.exists(marker):
        return
    with open(marker, "x") as f:
        f.write(str(os.getpid()))
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
