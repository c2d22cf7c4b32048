"""Chaos on the real loop: one run (e2e_small with 2 rollout workers and 2 replay shards) during which a
seeded random schedule kill -9s a rollout worker process, a replay shard process and the whole driver
session (then `--resume`), in a seeded order, each at a learner step drawn from the schedule. 12 learner
steps with a checkpoint every 3 keep it at a few minutes of 2 cores (most of it is the two sessions'
start-up); a run with FLYWHEEL_CHAOS_RESULTS=<path> also writes its audit table there as JSON.

The seed is printed; set FLYWHEEL_CHAOS_SEED to replay a failure's schedule (the kills land at the same
learner steps and on the same kind of process; which worker or shard, and what it was doing then, is
up to timing). The audit (tests/e2e/runs.py `audit_replay`, tests/e2e/chaos_audit.py) then shows from
what the run left on disk: zero acknowledged traces lost, every drawn prompt inserted exactly once,
policy_version monotone across the resumes, and the run finishing by its step budget.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.chaos_audit import audit_prompts, audit_versions, sessions
from tests.e2e.runs import (
    audit_replay,
    driver_cmd,
    kill_session,
    records,
    session_pids,
    start,
    wait_for,
    wait_session_gone,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.faults]

SEED_ENV = "FLYWHEEL_CHAOS_SEED"
RESULTS_ENV = "FLYWHEEL_CHAOS_RESULTS"  # a path: the audit table is also written there as JSON (the bench table)
STEPS = 12
CHECKPOINT_EVERY = 3
PROMPTS_PER_CALL = 4  # rollout.prompts_per_step of e2e_small
GROUP_SIZE = 4  # rollout.group_size of e2e_small
PREFIX = {"worker": "ray::RolloutWorker", "shard": "ray::ReplayShard"}


@dataclasses.dataclass(frozen=True)
class Kill:
    at_step: int  # learner step of the current session after which the kill happens
    kind: str  # "worker" | "shard" | "driver"


def schedule(rng: random.Random) -> list[Kill]:
    """One kill of each kind, in a seeded order, at distinct learner steps after the first checkpoint (a
    driver kill needs one to resume from) and early enough for the run to recover before its last step."""
    kinds = ["worker", "shard", "driver"]
    rng.shuffle(kinds)
    steps = sorted(rng.sample(range(CHECKPOINT_EVERY + 1, STEPS - 2), len(kinds)))
    if steps[kinds.index("driver")] > STEPS - 5:  # leave the driver kill room to wait for newer groups
        d = kinds.index("driver")
        kinds[0], kinds[d] = kinds[d], kinds[0]
    return [Kill(s, k) for s, k in zip(steps, kinds)]


def _session_steps(run: Path) -> list[int]:
    return [r["learner_step"] for r in sessions(records(run))[-1] if r["kind"] == "learner_step"]


def _driver_kill_due(run: Path, at_step: int) -> bool:
    """Kill the driver once replay holds groups of a version newer than the last checkpoint's (acknowledged,
    so the resume keeps them, but the policy that sampled them is discarded with the steps it rolls back:
    the case `ReplayTable.evict_newer` exists for), or at the latest 3 steps on (never at the run's end)."""
    session = sessions(records(run))[-1]
    steps = [r["learner_step"] for r in session if r["kind"] == "learner_step"]
    if max(steps, default=0) >= min(at_step + 3, STEPS - 2):
        return True
    ckpts = [i for i, r in enumerate(session) if r["kind"] == "checkpoint"]
    if not ckpts or max(steps, default=0) < at_step:
        return False
    version = session[ckpts[-1]]["policy_version"]
    return any(r["kind"] == "rollout" and r["policy_version"] > version for r in session[ckpts[-1] :])


def _kill_actor(proc: subprocess.Popen, log: Path, kind: str, rng: random.Random) -> None:
    """kill -9 one live actor process of `kind` (drawn by `rng`). Its replacement is not waited for: near
    the end the run may finish without it, and a later kill may well hit the survivor."""
    live = lambda: sorted(p for p, c in session_pids(proc.pid).items() if c.startswith(PREFIX[kind]))  # noqa: E731
    wait_for(lambda: len(live()) >= 1, proc, log, 180, f"a live {kind} process")
    victim = rng.choice(live())
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while victim in live() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert victim not in live(), f"{kind} process {victim} survived kill -9"


def _kill_driver(proc: subprocess.Popen) -> None:
    kill_session(proc.pid)  # the driver and its whole local Ray: head, raylet, every actor
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    wait_session_gone(proc.pid)


def _run_with_chaos(tmp_path: Path, plan: list[Kill], rng: random.Random) -> tuple[Path, subprocess.Popen, Path]:
    run = tmp_path / "ft"
    cmd = driver_cmd(
        tmp_path,
        f"run.max_learner_steps={STEPS}",
        f"run.checkpoint_every_steps={CHECKPOINT_EVERY}",
        f"run.eval_every_steps={STEPS}",
        "run.max_wall_s=3600",
        "rollout.num_workers=2",
        "rollout.drop_uniform_groups=false",
        "replay.num_shards=2",
    )
    log = tmp_path / "session-0.log"
    proc = start(cmd, log)
    try:
        for i, kill in enumerate(plan):
            what = f"learner step {kill.at_step} (kill {i}: {kill.kind})"
            wait_for(lambda k=kill: max(_session_steps(run), default=0) >= k.at_step, proc, log, 900, what)
            if kill.kind != "driver":
                _kill_actor(proc, log, kill.kind, rng)
                continue
            wait_for(lambda k=kill: _driver_kill_due(run, k.at_step), proc, log, 900, what + ": newer groups")
            _kill_driver(proc)
            log = tmp_path / f"session-{i + 1}.log"
            proc = start(cmd + ["--resume", str(run)], log)
            # until its `resume` record, the new session's steps are the killed one's: a kill due at a step the
            # killed session passed would fire into the new session's start-up
            owed = sum(k.kind == "driver" for k in plan[: i + 1])
            resumed = lambda n=owed: sum(r["kind"] == "resume" for r in records(run)) >= n  # noqa: E731
            wait_for(resumed, proc, log, 600, f"the resume after kill {i}")
        proc.wait(timeout=900)
    finally:
        kill_session(proc.pid)
    return run, proc, log


def test_chaos_kills_lose_nothing_and_every_prompt_is_inserted_once(tmp_path):
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**31))
    rng = random.Random(seed)
    plan = schedule(rng)
    print(f"chaos seed {seed} (replay with {SEED_ENV}={seed}); schedule: {[(k.at_step, k.kind) for k in plan]}")
    t0 = time.monotonic()
    run, proc, log = _run_with_chaos(tmp_path, plan, rng)
    assert proc.returncode == 0, log.read_text()[-5000:]
    summary = json.loads((run / "summary.json").read_text())
    kills = {k: sum(p.kind == k for p in plan) for k in ("worker", "shard", "driver")}
    assert summary["stopped_by"] == "max_learner_steps" and summary["learner_steps"] == STEPS, summary
    assert summary["resumes"] == kills["driver"]

    recs = records(run)
    table = {
        "seed": seed,
        **{f"kills_{k}": n for k, n in kills.items()},
        "resumes": summary["resumes"],
        **audit_prompts(run, recs, PROMPTS_PER_CALL, GROUP_SIZE),
        **{f"groups_{k}": n for k, n in audit_replay(run).items()},
        **audit_versions(run, recs, STEPS),
        "wall_s": round(time.monotonic() - t0),
    }
    if out := os.environ.get(RESULTS_ENV):
        note = os.environ.get("FLYWHEEL_CHAOS_LOAD_NOTE") or f"load average {os.getloadavg()[0]:.1f} at the end"
        Path(out).write_text(json.dumps({**table, "load_note": note}, indent=2) + "\n")
    width = max(map(len, table))
    print("\n| chaos audit | value |\n|---|---|\n" + "\n".join(f"| {k:<{width}} | {v} |" for k, v in table.items()))
