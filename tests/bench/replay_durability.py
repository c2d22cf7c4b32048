"""What durability costs a replay shard: appends/s with fsync (the default), without, and in memory only.

Called by tests/bench/replay.py (`--durability` runs only this part and updates the `durability` key
of tests/bench/results/replay.json). In process, no Ray: the cost measured is the table's own insert
and sample path with its journal, on the disk that holds `--dir` (default: the system temp dir).
Each insert is one rollout call's output (GROUPS_PER_INSERT groups); each sample call journals one
events record. Rounds alternate between the three modes (the box is shared); medians are reported.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from replay.config import ReplayConfig
from replay.synthetic import group_batch
from replay.table import ReplayTable

MODES = {"memory": None, "journal, no fsync": False, "journal, fsync": True}


def _round(mode: bool | None, batches: list, root: Path, tag: str) -> tuple[float, float]:
    """(insert calls/s, sample calls/s) of one fresh table in `mode`."""
    seg = root / tag
    cfg = ReplayConfig(segment_dir=None if mode is None else str(seg), fsync=bool(mode), max_times_sampled=None)
    table = ReplayTable(cfg)
    t0 = time.perf_counter()
    for b in batches:
        table.insert(b)
    t_insert = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(len(batches)):
        table.sample(1, 0)
    t_sample = time.perf_counter() - t0
    table.close()
    shutil.rmtree(seg, ignore_errors=True)
    return len(batches) / t_insert, len(batches) / t_sample


def measure(group: int, prompt: int, completion: int, groups_per_insert: int, n_insert: int, rounds: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="flywheel-bench-durability-"))
    batches = [
        group_batch([f"d{c}-{g}" for g in range(groups_per_insert)], group, prompt, completion, seed=c)
        for c in range(n_insert)
    ]
    rates: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    try:
        for r in range(rounds):
            for name, mode in MODES.items():
                rates[name].append(_round(mode, batches, root, f"{r}-{name.replace(' ', '')}"))
        fs = subprocess.run(["df", "-T", str(root)], capture_output=True, text=True).stdout.splitlines()[-1].split()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {m: (statistics.median(a for a, _ in v), statistics.median(s for _, s in v)) for m, v in rates.items()}
    traces = groups_per_insert * group
    return {
        "appends_per_s_memory": med["memory"][0],
        "appends_per_s_no_fsync": med["journal, no fsync"][0],
        "appends_per_s_fsync": med["journal, fsync"][0],
        "traces_per_s_fsync": med["journal, fsync"][0] * traces,
        "insert_ms_fsync": 1e3 / med["journal, fsync"][0],
        "insert_ms_no_fsync": 1e3 / med["journal, no fsync"][0],
        "fsync_over_no_fsync": med["journal, fsync"][0] / med["journal, no fsync"][0],
        "sample_calls_per_s_memory": med["memory"][1],
        "sample_calls_per_s_no_fsync": med["journal, no fsync"][1],
        "sample_calls_per_s_fsync": med["journal, fsync"][1],
        "traces_per_append": traces,
        "bytes_per_append": sum(b.nbytes for b in batches) / len(batches),
        "appends_per_round": n_insert,
        "rounds": rounds,
        "filesystem": f"{fs[1]} on {fs[0]}" if len(fs) > 1 else "unknown",
        "under_load": True,  # shared box: read the ratios; the lead re-runs final numbers on a quiet one
        "load_avg_1m": os.getloadavg()[0],
    }


def print_table(d: dict) -> None:
    print(
        f"\ndurability ({d['traces_per_append']} traces = {d['bytes_per_append'] / 2**20:.1f} MiB per append, "
        f"{d['filesystem']}, load {d['load_avg_1m']:.1f}):"
    )
    print(f"{'mode':22s} {'appends/s':>10s} {'ms/append':>10s} {'sample calls/s':>15s}")
    for name, key in (("memory only", "memory"), ("journal, no fsync", "no_fsync"), ("journal, fsync", "fsync")):
        rate = d[f"appends_per_s_{key}"]
        print(f"{name:22s} {rate:10.1f} {1e3 / rate:10.2f} {d[f'sample_calls_per_s_{key}']:15.1f}")
    print(f"fsync / no fsync appends: {d['fsync_over_no_fsync']:.2f}x")
