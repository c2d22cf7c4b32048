"""Shared helpers of the fault e2e tests: start the driver in its own session, read its metrics, find
and kill -9 its processes through /proc, and audit replay's segments for lost acknowledged traces.

`audit_replay` reads replay's durable segments (every acknowledged trace, every removal) and the final
snapshot (what is still held): every acknowledged group was consumed, evicted by the staleness or
capacity policy (counted in summary.json), or is still in replay; and the traces the replay journal
says the learner took equal the loop's own count (summary.json, continued across resumes).
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

from replay.journal import read_journal
from replay.segments import read_dataset

REPO = Path(__file__).resolve().parents[2]


def driver_cmd(tmp_path: Path, *overrides: str, name: str = "ft") -> list[str]:
    """The driver on e2e_small as run `name` under `tmp_path`, with config `overrides` (key=value)."""
    return [
        sys.executable,
        "-m",
        "services.driver",
        "--config",
        "deploy/configs/e2e_small.yaml",
        f"run.runs_dir={tmp_path}",
        f"run.name={name}",
        *overrides,
    ]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def records(run: Path) -> list[dict]:
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


def wait_for(pred, proc: subprocess.Popen, log: Path, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the driver exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


def session_pids(sid: int) -> dict[int, str]:
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


def kill_session(sid: int) -> None:
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_session_gone(sid: int, timeout_s: float = 30.0) -> None:
    """Poll until no process of session `sid` is alive: the kernel reaps a kill -9'd tree asynchronously,
    and on a loaded box a big process (vLLM, DeepSpeed) can take seconds to go; fail naming the survivors."""
    deadline = time.monotonic() + timeout_s
    while (alive := session_pids(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"processes of the killed session {sid} survived {timeout_s:.0f} s: {alive}"


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


def audit_replay(run: Path, quarantined: int = 0) -> dict[str, int]:
    """Check the no-loss invariant from the segments; return the groups acknowledged, how each left
    replay (consumed, evicted_stale, evicted_capacity) or that it is still held at the end, and the lost."""
    acked = read_dataset(str(run / "replay"))
    acked_groups = set(acked["group_id"].to_pylist())
    removed: dict[str, str] = {}
    held: set[str] = set()
    gone_early, took_traces, stale = set(), 0, 0
    books = dict.fromkeys(("removed_sampled", "evicted_stale", "evicted_capacity"), 0)
    for shard in sorted((run / "replay").glob("shard-*")):
        counts, at_base, at_end, shard_removed, before = _shard_books(shard)
        removed.update(shard_removed)
        held |= at_end
        early = before - at_base  # left before the oldest kept snapshot: its counters account for them
        assert len(early) == sum(counts.get(k, 0) for k in books)
        books = {k: v + counts.get(k, 0) for k, v in books.items()}
        gone_early |= early
        took_traces += counts.get("sampled_traces", 0)
        stale += counts.get("evicted_stale", 0)
    lost = acked_groups - set(removed) - held - gone_early
    assert not lost, f"{len(lost)} acknowledged group(s) neither consumed, evicted nor held: {sorted(lost)[:5]}"
    assert not held & set(removed)
    summary = json.loads((run / "summary.json").read_text())
    took = [g for g, k in removed.items() if k == "removed_sampled"]
    took_traces += pc.sum(pc.is_in(acked["group_id"], value_set=pa.array(took))).as_py() or 0
    # a draw journalled by a shard that died before replying is handed back after its restart (reclaimed);
    # one it never got back would show here as sampled-but-not-consumed traces
    assert summary["replay_unrecovered_draws"] == 0, summary
    assert took_traces == summary["traces_consumed"] + summary["traces_skipped_nonfinite"], (took_traces, summary)
    kinds = {k: sum(1 for v in removed.values() if v == k) for k in set(removed.values())}
    assert stale + kinds.get("evicted_stale", 0) == summary["replay_evicted_stale_groups"]
    assert len(held) == summary["replay_groups_held_at_end"] and summary["replay_quarantined"] == quarantined
    out = {k: books[k] + kinds.get(k, 0) for k in books}
    return {
        "acknowledged": len(acked_groups),
        "consumed": out["removed_sampled"],
        "evicted_stale": out["evicted_stale"],
        "evicted_capacity": out["evicted_capacity"],
        "held": len(held),
        "reclaimed_after_a_shard_death": summary["replay_reclaimed_groups"],
        "lost": len(lost),  # asserted 0 above; reported so the table shows the measured count
    }
