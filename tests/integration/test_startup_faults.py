"""A rollout worker killed during the driver's start-up is replaced there: the run starts and ends with the
configured workers.

The kills come from the start-up test hook (services/faults.py: `at=start` once the engines are built,
`at=start_join` right after the first weight group's rendezvous is queued). Worker 0 dies before the
rendezvous and worker 1 in it, so rank 0 waits there until weight_sync.timeout_s, then both are replaced
under their own ids and the group forms on a fresh port. HF engine: this is about start-up, not vLLM.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.e2e.runs import REPO, driver_cmd

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]


def test_workers_killed_during_start_up_are_replaced_and_the_run_finishes(tmp_path):
    cmd = driver_cmd(
        tmp_path,
        "learner.num_ranks=1",
        "learner.zero_stage=0",
        "rollout.engine=hf",
        "rollout.num_workers=2",
        "run.max_learner_steps=4",
        "run.eval_every_steps=100",
        "learner.weight_sync.timeout_s=10",
        name="startup",
    )
    env = dict(os.environ, FLYWHEEL_FAULT_KILL_WORKER="worker=0,at=start;worker=1,at=start_join")
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    run = tmp_path / "startup"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["learner_steps"] == 4
    assert summary["rollout_workers_final"] == 2
    assert summary["worker_deaths"] == 2 and summary["worker_replacements"] == 2, summary
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    died = [(r["worker"], r["during"]) for r in records if r["kind"] == "membership" and r["event"] == "died"]
    assert died == [(0, "start-up join"), (1, "start-up join")], died  # both noticed in the rendezvous
    # The replacements kept the ids 0 and 1, both produced, and nobody died after start-up.
    assert {r["worker_id"] for r in records if r["kind"] == "rollout"} == {0, 1}
    # The RL clock (metrics' `t`, restarted after start-up and the initial eval) is what rl_wall_s reports,
    # without the stop checkpoint and the final model save that follow the last RL second.
    stop = next(r for r in records if r["kind"] == "checkpoint" and r["reason"] == "stop")
    assert summary["rl_wall_s"] <= stop["t"] - stop["seconds"] + 1e-3, (summary["rl_wall_s"], stop)
    # Start-up spent weight_sync.timeout_s=10 in the broken rendezvous alone; the clock began after it.
    assert min(r["t"] for r in records if r["kind"] == "rollout") < 10.0
