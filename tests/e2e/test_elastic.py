"""Elastic rollout end to end: kill -9 a rollout worker mid-rollout or mid-broadcast, scale 1 -> 2 mid-run.

The kills come from the loop's test hook (services/faults.py: `os.kill(pid, SIGKILL)` at a chosen
learner step), so they land at a known moment. The rollout engine is HF here: these tests are about
membership, not the engine (tests/integration/test_elastic_weights.py checks vLLM after re-forms).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.runs import REPO, driver_cmd

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
# HF on the tiny model runs ~10 learner steps/s here, and a replacement takes 5-10 s to start: the runs
# are bounded by RL wall time so the replacement joins and produces before the end.
SMALL = [
    "learner.num_ranks=1",
    "learner.zero_stage=0",
    "rollout.engine=hf",
    "rollout.num_workers=2",
    "run.max_learner_steps=100000",
    "run.max_wall_s=30",
    "run.eval_every_steps=100",
    "run.max_buffered_steps=4",
    "learner.weight_sync.timeout_s=15",
]


def _driver(tmp_path: Path, *overrides: str) -> list[str]:
    return driver_cmd(tmp_path, *overrides, name="elastic")


def _run(tmp_path: Path, fault: str, *overrides: str) -> Path:
    env = dict(os.environ, FLYWHEEL_FAULT_KILL_WORKER=fault)
    out = subprocess.run(
        _driver(tmp_path, *SMALL, f"replay.segment_dir={tmp_path / 'segments'}", *overrides),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return tmp_path / "elastic"


def _records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _check_versions_monotone(run: Path) -> None:
    steps = _records(run, "learner_step")
    assert [r["policy_version"] for r in steps] == sorted(r["policy_version"] for r in steps)
    by_worker: dict[int, list[int]] = {}
    for r in _records(run, "rollout"):
        by_worker.setdefault(r["worker_id"], []).append(r["policy_version"])
    for wid, versions in by_worker.items():  # an engine's weights never go back, a replacement's included
        assert versions == sorted(versions), (wid, versions)


def _check_replacement_started_current(run: Path, dead: int) -> int:
    events = _records(run, "membership")
    died = [e for e in events if e["event"] == "died" and e["worker"] == dead]
    assert len(died) == 1, events
    joined = [e for e in events if e["event"] == "joined" and e["t"] >= died[0]["t"]]
    assert joined, events
    new = joined[0]["worker"]
    assert new not in (0, dead)
    regroups = [
        e["policy_version"]
        for e in events
        if e["event"] == "regroup" and e["t"] <= joined[0]["t"] and new in e["group"]
    ]
    assert joined[0]["policy_version"] == regroups[-1]  # it holds the weights of the group it joined
    first = [r for r in _records(run, "rollout") if r["worker_id"] == new]
    assert first and first[0]["policy_version"] >= joined[0]["policy_version"], first[:1]
    return new


@pytest.mark.faults
def test_kill_9_mid_rollout_loses_no_acknowledged_trace(tmp_path):
    from replay.segments import read_dataset

    run = _run(tmp_path, "worker=1,after_step=2,at=rollout")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["learner_steps"] >= 8
    assert summary["worker_deaths"] == 1 and summary["worker_replacements"] == 1
    events = _records(run, "membership")
    died = [e for e in events if e["event"] == "died"]
    assert [(e["worker"], e["reissued_prompts"]) for e in died] == [(1, 4)]  # the killed call's problems
    # A kill that lands while a broadcast to the victim is in flight also breaks the survivors' update: a
    # survivor then refuses its next call on stale weights and that call's problems are re-issued too.
    refused = [e["reissued_prompts"] for e in events if e["event"] == "refused"]
    assert all(n == 4 for n in refused) and summary["reissued_prompts"] == 4 + sum(refused), (refused, summary)
    reissued = [e for e in events if e["event"] == "reissued"]
    assert [e["prompts"] for e in reissued] == [4] * (1 + len(refused)) and all(e["worker"] != 1 for e in reissued)
    _check_replacement_started_current(run, dead=1)
    _check_versions_monotone(run)
    # Every group a rollout call acknowledged is on disk; at most the killed call's own groups more
    # (it may have inserted before it died); every persisted group is whole.
    traces = read_dataset(str(tmp_path / "segments")).to_pylist()
    groups: dict[str, int] = {}
    for t in traces:
        groups[t["group_id"]] = groups.get(t["group_id"], 0) + 1
    acknowledged = sum(r["accepted_groups"] for r in _records(run, "rollout"))
    assert acknowledged <= len(groups) <= acknowledged + 4, (acknowledged, len(groups))
    assert set(groups.values()) == {4}
    assert summary["traces_consumed"] <= len(traces)


@pytest.mark.faults
def test_kill_9_during_a_broadcast_does_not_hang_the_learner(tmp_path):
    run = _run(tmp_path, "worker=1,after_step=2,at=broadcast")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["learner_steps"] >= 8 and summary["worker_deaths"] == 1 and summary["worker_replacements"] == 1
    events = _records(run, "membership")
    killed = next(e for e in events if e["event"] == "killed")
    died = next(e for e in events if e["event"] == "died")
    assert died["worker"] == 1 and died["during"] in ("broadcast", "rollout")
    after = [r for r in _records(run, "learner_step") if r["t"] > killed["t"]]
    assert len(after) >= 5  # training went on after the kill (it happened after step 2)
    gaps = [b["t"] - a["t"] for a, b in zip(after, after[1:])]
    assert max(gaps) < 15, max(gaps)  # never stalled for weight_sync.timeout_s
    _check_replacement_started_current(run, dead=1)
    _check_versions_monotone(run)


@pytest.mark.faults
def test_a_joiner_killed_in_the_rendezvous_is_dropped_and_the_run_goes_on(tmp_path):
    # Worker 1 dies; its replacement (2) is killed right after the group it joins is queued, so the
    # survivor and rank 0 wait in that rendezvous until weight_sync.timeout_s; replacement 3 joins.
    run = _run(
        tmp_path,
        "worker=1,after_step=2,at=rollout;worker=2,after_step=0,at=join",
        "run.max_wall_s=60",
        "learner.weight_sync.timeout_s=10",
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["worker_deaths"] == 2 and summary["worker_replacements"] == 2, summary
    events = _records(run, "membership")
    killed_2 = next(e for e in events if e["event"] == "killed" and e["worker"] == 2)
    assert any(e["event"] == "died" and e["worker"] == 2 for e in events)
    dropped = [e for e in events if e["event"] == "missed_broadcast" and e["worker"] == 0 and e["t"] > killed_2["t"]]
    assert dropped, events  # the survivor was dropped from the broadcast that never formed ...
    assert _check_replacement_started_current(run, dead=2) == 3  # ... and the group re-formed with 3
    assert [r for r in _records(run, "learner_step") if r["t"] > dropped[0]["t"] + 1]  # training went on
    _check_versions_monotone(run)


def test_scale_rollout_from_1_to_2_mid_run(tmp_path, monkeypatch):
    import ray

    from services import cli
    from services.control import RunNotFound, scale_rollout

    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the local Ray's workers serve the driver's job too
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        address = ray.get_runtime_context().gcs_address
        assert cli.main(["scale", "rollout", "2", "--run", "no-such-run"]) == 3  # clear error, no crash
        cmd = _driver(
            tmp_path,
            "learner.num_ranks=1",
            "learner.zero_stage=0",
            "rollout.engine=hf",
            "run.max_learner_steps=100000",
            "run.max_wall_s=45",
            "run.eval_every_steps=100",
        )
        cmd[3:3] = ["--address", address]  # before the overrides: argparse takes positionals in one run
        driver = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            report = None
            deadline = time.monotonic() + 300
            secret = tmp_path / "elastic" / "run_secret"  # this session's, written by the driver
            while report is None and time.monotonic() < deadline and driver.poll() is None:
                try:
                    report = scale_rollout("elastic", 2, wait_s=120, secret=secret.read_bytes().strip())
                except (RunNotFound, FileNotFoundError):
                    time.sleep(1)
            assert report is not None, driver.communicate(timeout=60)[0][-5000:]
            assert report.active == 2 and [m.worker_id for m in report.members] == [0, 1], report
            log, _ = driver.communicate(timeout=300)
        finally:
            driver.kill()
        assert driver.returncode == 0, log[-5000:]
    finally:
        ray.shutdown()
    run = tmp_path / "elastic"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["workers_added"] == 1 and summary["rollout_workers_final"] == 2 and summary["worker_deaths"] == 0
    assert {r["worker_id"] for r in _records(run, "rollout")} == {0, 1}
    scaled = [e for e in _records(run, "membership") if e["event"] == "scaled"]
    assert [(e["previous_target"], e["target"]) for e in scaled] == [(1, 2)]
    _check_versions_monotone(run)
