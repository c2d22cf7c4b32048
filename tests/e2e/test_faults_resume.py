"""Faults on the real loop (e2e_small: 2 ZeRO-2 ranks, vLLM worker): kill -9 the driver after a
checkpoint and resume it; kill -9 a replay shard mid-run. Nothing acknowledged is lost, nothing hangs.

The audit reads replay's durable segments (every acknowledged trace, every removal) and the final
snapshot (what is still held): every acknowledged group was consumed, evicted by the staleness or
capacity policy (counted in summary.json), or is still in replay; and the traces the replay journal
says the learner took equal the loop's own count (summary.json, continued across the resume).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from replay.journal import MAGIC, frame, read_journal
from replay.segments import read_dataset

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.faults]


def _cmd(tmp_path: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "services.driver",
        "--config",
        "deploy/configs/e2e_small.yaml",
        f"run.runs_dir={tmp_path}",
        "run.name=ft",
        *overrides,
    ]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


def _wait(pred, proc: subprocess.Popen, log: Path, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the driver exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


def _session_pids(sid: int) -> dict[int, str]:
    """pid -> command line of every live process in session `sid` (the driver's: its Ray head, raylet, actors)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[3]) == sid:  # a zombie is dead, only not yet reaped
                out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            pass
    return out


def _kill_session(sid: int) -> None:
    for pid in _session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _shard_books(shard: Path) -> tuple[dict, set, set, dict[str, str], set]:
    """One shard from its segments: (counts at the oldest kept snapshot, groups held then, groups held at
    the newest snapshot, removals journalled after the oldest, groups acknowledged before the oldest).
    Snapshots and journals older than the oldest kept checkpoint are pruned with it, so the books before
    it are that snapshot's counters."""
    snaps = sorted(int(p.stem.split("-")[1]) for p in shard.glob("snapshot-*.json"))
    base, last = snaps[0], snaps[-1]

    def groups_in(k: int) -> set:
        return set(pa.ipc.open_file(str(shard / f"snapshot-{k:06d}.arrow")).read_all()["group_id"].to_pylist())

    removed: dict[str, str] = {}
    for events in sorted(shard.glob("events-*.log")):  # the live journal (rolled-back files excluded)
        if int(events.stem.split("-")[1]) > base:
            for b in read_journal(events).batches:
                removed.update(
                    (g, k) for g, k in zip(b["group_id"].to_pylist(), b["kind"].to_pylist()) if k != "sampled"
                )
    before = set()
    for seg in shard.glob("traces-*.parquet"):
        if int(seg.name.split("-")[1].split(".")[0]) < base:
            before |= set(pq.read_table(seg, columns=["group_id"])["group_id"].to_pylist())
    counts = json.loads((shard / f"snapshot-{base:06d}.json").read_text())["counts"]
    return counts, groups_in(base), groups_in(last), removed, before


def _audit(run: Path, quarantined: int = 0) -> dict:
    """Check the no-loss invariant from the segments; returns the per-kind counts."""
    acked = read_dataset(str(run / "replay"))
    acked_groups = set(acked["group_id"].to_pylist())
    removed: dict[str, str] = {}
    held: set[str] = set()
    gone_early, took_traces, stale = set(), 0, 0
    for shard in sorted((run / "replay").glob("shard-*")):
        counts, at_base, at_end, shard_removed, before = _shard_books(shard)
        removed.update(shard_removed)
        held |= at_end
        early = before - at_base  # left before the oldest kept snapshot: its counters account for them
        assert len(early) == sum(counts.get(k, 0) for k in ("removed_sampled", "evicted_stale", "evicted_capacity"))
        gone_early |= early
        took_traces += counts.get("sampled_traces", 0)
        stale += counts.get("evicted_stale", 0)
    lost = acked_groups - set(removed) - held - gone_early
    assert not lost, f"{len(lost)} acknowledged group(s) neither consumed, evicted nor held: {sorted(lost)[:5]}"
    assert not held & set(removed)
    summary = json.loads((run / "summary.json").read_text())
    took = [g for g, k in removed.items() if k == "removed_sampled"]
    took_traces += pc.sum(pc.is_in(acked["group_id"], value_set=pa.array(took))).as_py() or 0
    assert took_traces == summary["traces_consumed"] + summary["traces_skipped_nonfinite"], (took_traces, summary)
    kinds = {k: sum(1 for v in removed.values() if v == k) for k in set(removed.values())}
    assert stale + kinds.get("evicted_stale", 0) == summary["replay_evicted_stale_groups"]
    assert len(held) == summary["replay_groups_held_at_end"] and summary["replay_quarantined"] == quarantined
    return kinds


def test_kill_9_driver_after_checkpoint_then_resume_loses_nothing(tmp_path):
    run, log = tmp_path / "ft", tmp_path / "first.log"
    cmd = _cmd(tmp_path, "run.max_learner_steps=40", "run.checkpoint_every_steps=5", "run.eval_every_steps=10")
    first = _start(cmd, log)
    try:
        ckpts = lambda: [r["learner_step"] for r in _records(run) if r["kind"] == "checkpoint"]  # noqa: E731
        steps = lambda: [r["learner_step"] for r in _records(run) if r["kind"] == "learner_step"]  # noqa: E731
        _wait(lambda: ckpts() and max(steps()) >= max(ckpts()) + 2, first, log, 600, "a checkpoint and 2 more steps")
    finally:
        _kill_session(first.pid)  # kill -9 the driver and its whole local Ray (head, raylet, every actor)
        first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    time.sleep(1)
    assert not _session_pids(first.pid), "processes of the killed run survived"
    latest = (run / "checkpoints" / "latest").read_text().strip()
    ckpt_step = int(latest.split("-")[1].split(".")[0])
    killed_at = max(steps())

    out = subprocess.run(cmd + ["--resume", str(run)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    recs = _records(run)
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
    _audit(run)


def test_kill_9_a_replay_shard_mid_run_loses_nothing(tmp_path):
    run, log = tmp_path / "ft", tmp_path / "run.log"
    proc = _start(
        _cmd(
            tmp_path,
            "replay.num_shards=2",
            "run.max_learner_steps=30",
            "run.checkpoint_every_steps=10",
            "run.eval_every_steps=10",
        ),
        log,
    )
    try:
        shards = lambda: {p: c for p, c in _session_pids(proc.pid).items() if c.startswith("ray::ReplayShard")}  # noqa: E731
        steps = lambda: [r["learner_step"] for r in _records(run) if r["kind"] == "learner_step"]  # noqa: E731
        _wait(lambda: len(shards()) == 2 and len(steps()) >= 6, proc, log, 600, "2 shards and 6 learner steps")
        victim = min(shards())
        os.kill(victim, signal.SIGKILL)
        killed_at = len(steps())
        _wait(lambda: len(shards()) == 2 and victim not in shards(), proc, log, 120, "the shard to restart")
        proc.wait(timeout=600)
    finally:
        _kill_session(proc.pid)
    assert proc.returncode == 0, log.read_text()[-5000:]
    summary = json.loads((run / "summary.json").read_text())
    assert killed_at < 30 and summary["learner_steps"] == 30 and summary["stopped_by"] == "max_learner_steps"
    _audit(run)


def _live_journal(run: Path, min_records: int) -> Path | None:
    """The killed session's open traces journal of shard 0 with at least `min_records` inserts."""
    logs = sorted((run / "replay" / "shard-0").glob("traces-*.log"))
    return next((p for p in reversed(logs) if len(read_journal(p).batches) >= min_records), None)


def test_resume_after_a_torn_tail_and_a_corrupt_middle_record(tmp_path):
    """kill -9, then damage the open journal as a crash and a bad disk would: the last insert cut short,
    one in the middle flipped. The resumed run finishes; only the flipped insert is gone, and it is
    quarantined, counted and logged; everything around it is kept."""
    run, log = tmp_path / "ft", tmp_path / "first.log"
    cmd = _cmd(tmp_path, "run.max_learner_steps=30", "run.checkpoint_every_steps=5", "run.eval_every_steps=10")
    first = _start(cmd, log)
    try:
        ready = lambda: (run / "checkpoints" / "latest").exists() and _live_journal(run, 3)  # noqa: E731
        _wait(ready, first, log, 600, "a checkpoint and 3 inserts after it")
    finally:
        _kill_session(first.pid)
        first.wait(timeout=60)
    live = _live_journal(run, 3)
    records = read_journal(live).batches
    raw = bytearray(live.read_bytes())
    starts = [i for i in range(len(raw)) if raw[i : i + 4] == MAGIC]  # schema, insert 1, insert 2, ...
    lost = set(records[1]["group_id"].to_pylist())
    raw[starts[2] + 100] ^= 0x20  # a flipped bit in insert 2
    raw += frame(records[0].serialize())[:-40]  # and a last insert cut short by the crash
    live.write_bytes(raw)

    out = subprocess.run(cmd + ["--resume", str(run)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["learner_steps"] == 30 and summary["replay_quarantined"] == 1
    quarantine = run / "replay" / "shard-0" / "quarantine"
    assert (quarantine / f"{live.name}.{starts[2]}.bad").read_bytes() == raw[starts[2] : starts[3]]
    assert "corrupt record region(s) skipped" in out.stdout + out.stderr
    kept = set(read_dataset(str(run / "replay"))["group_id"].to_pylist())
    assert not lost & kept and set(records[0]["group_id"].to_pylist()) | set(records[2]["group_id"].to_pylist()) <= kept
    _audit(run, quarantined=1)
