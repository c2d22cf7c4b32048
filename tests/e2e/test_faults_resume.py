"""Faults on the real loop (e2e_small: 2 ZeRO-2 ranks, vLLM worker): kill -9 the driver after a
checkpoint and resume it; kill -9 a replay shard mid-run. Nothing acknowledged is lost, nothing hangs
(the audit of replay's segments is tests/e2e/runs.py `audit_replay`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from replay.journal import MAGIC, frame, read_journal
from replay.segments import read_dataset
from tests.e2e.runs import (
    REPO,
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


def test_kill_9_driver_after_checkpoint_then_resume_loses_nothing(tmp_path):
    run, log = tmp_path / "ft", tmp_path / "first.log"
    cmd = driver_cmd(tmp_path, "run.max_learner_steps=40", "run.checkpoint_every_steps=5", "run.eval_every_steps=10")
    first = start(cmd, log)
    try:
        ckpts = lambda: [r["learner_step"] for r in records(run) if r["kind"] == "checkpoint"]  # noqa: E731
        steps = lambda: [r["learner_step"] for r in records(run) if r["kind"] == "learner_step"]  # noqa: E731
        wait_for(lambda: ckpts() and max(steps()) >= max(ckpts()) + 2, first, log, 600, "a checkpoint and 2 more steps")
    finally:
        kill_session(first.pid)  # kill -9 the driver and its whole local Ray (head, raylet, every actor)
        first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    wait_session_gone(first.pid)
    latest = (run / "checkpoints" / "latest").read_text().strip()
    ckpt_step = int(latest.split("-")[1].split(".")[0])
    killed_at = max(steps())

    out = subprocess.run(cmd + ["--resume", str(run)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    recs = records(run)
    cut = next(i for i, r in enumerate(recs) if r["kind"] == "resume")
    assert recs[cut]["learner_step"] == ckpt_step and ckpt_step < killed_at
    before = [r for r in recs[:cut] if r["kind"] == "learner_step" and r["learner_step"] <= ckpt_step]
    after = [r for r in recs[cut:] if r["kind"] == "learner_step"]
    assert [r["learner_step"] for r in before + after] == list(range(1, 41))  # continues at the checkpoint's step
    versions = [r["policy_version"] for r in before + after]
    assert versions == sorted(versions) and after[0]["policy_version"] == recs[cut]["policy_version"]
    assert recs[cut]["workers_at_version"] == [recs[cut]["policy_version"]]  # weights before any trace
    assert all(min(r["trace_versions"]) >= recs[cut]["policy_version"] - 2 for r in after)  # max_staleness=2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["learner_steps"] == 40 and summary["resumes"] == 1 and summary["policy_versions_published"] == 40
    audit_replay(run)


def test_kill_9_a_replay_shard_mid_run_loses_nothing(tmp_path):
    run, log = tmp_path / "ft", tmp_path / "run.log"
    proc = start(
        driver_cmd(
            tmp_path,
            "replay.num_shards=2",
            "run.max_learner_steps=30",
            "run.checkpoint_every_steps=10",
            "run.eval_every_steps=10",
        ),
        log,
    )
    try:
        shards = lambda: {p: c for p, c in session_pids(proc.pid).items() if c.startswith("ray::ReplayShard")}  # noqa: E731
        steps = lambda: [r["learner_step"] for r in records(run) if r["kind"] == "learner_step"]  # noqa: E731
        wait_for(lambda: len(shards()) == 2 and len(steps()) >= 6, proc, log, 600, "2 shards and 6 learner steps")
        victim = min(shards())
        os.kill(victim, signal.SIGKILL)
        killed_at = len(steps())
        wait_for(lambda: len(shards()) == 2 and victim not in shards(), proc, log, 120, "the shard to restart")
        proc.wait(timeout=600)
    finally:
        kill_session(proc.pid)
    assert proc.returncode == 0, log.read_text()[-5000:]
    summary = json.loads((run / "summary.json").read_text())
    assert killed_at < 30 and summary["learner_steps"] == 30 and summary["stopped_by"] == "max_learner_steps"
    audit_replay(run)


def _live_journal(run: Path, min_records: int) -> Path | None:
    """The killed session's open traces journal of shard 0 with at least `min_records` inserts."""
    logs = sorted((run / "replay" / "shard-0").glob("traces-*.log"))
    return next((p for p in reversed(logs) if len(read_journal(p).batches) >= min_records), None)


def test_resume_after_a_torn_tail_and_a_corrupt_middle_record(tmp_path):
    """kill -9, then damage the open journal as a crash and a bad disk would: the last insert cut short,
    one in the middle flipped. The resumed run finishes; only the flipped insert is gone, and it is
    quarantined, counted and logged; everything around it is kept."""
    run, log = tmp_path / "ft", tmp_path / "first.log"
    cmd = driver_cmd(tmp_path, "run.max_learner_steps=30", "run.checkpoint_every_steps=5", "run.eval_every_steps=10")
    first = start(cmd, log)
    try:
        ready = lambda: (run / "checkpoints" / "latest").exists() and _live_journal(run, 3)  # noqa: E731
        wait_for(ready, first, log, 600, "a checkpoint and 3 inserts after it")
    finally:
        kill_session(first.pid)
        first.wait(timeout=60)
    live = _live_journal(run, 3)
    inserts = read_journal(live).batches
    raw = bytearray(live.read_bytes())
    starts = [i for i in range(len(raw)) if raw[i : i + 4] == MAGIC]  # schema, insert 1, insert 2, ...
    lost = set(inserts[1]["group_id"].to_pylist())
    raw[starts[2] + 100] ^= 0x20  # a flipped bit in insert 2
    raw += frame(inserts[0].serialize())[:-40]  # and a last insert cut short by the crash
    live.write_bytes(raw)

    out = subprocess.run(cmd + ["--resume", str(run)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["learner_steps"] == 30 and summary["replay_quarantined"] == 1
    quarantine = run / "replay" / "shard-0" / "quarantine"
    assert (quarantine / f"{live.name}.{starts[2]}.bad").read_bytes() == raw[starts[2] : starts[3]]
    assert "corrupt record region(s) skipped" in out.stdout + out.stderr
    kept = set(read_dataset(str(run / "replay"))["group_id"].to_pylist())
    assert not lost & kept and set(inserts[0]["group_id"].to_pylist()) | set(inserts[2]["group_id"].to_pylist()) <= kept
    audit_replay(run, quarantined=1)
