"""Replay throughput and memory: Arrow shards (1, 2, 4) against a naive list-of-dicts actor, same run.

Run: `.venv/bin/python tests/bench/replay.py [--quick] [--durability]`. Prints a table and writes
`tests/bench/results/replay.json`. Benchmarks report; they never assert timings. The `durability`
key (tests/bench/replay_durability.py) is what fsync costs: appends/s with and without it, and in
memory only; `--durability` measures only that and updates that key of the existing JSON.

Workload: GRPO groups of `GROUP` traces, `PROMPT` prompt tokens and COMPLETION/2..`COMPLETION`
completion tokens each (a short-reasoning RL run); inserts of `GROUPS_PER_INSERT` groups per call
(one rollout worker's output); samples
of `GROUPS_PER_SAMPLE` groups (one learner step; also swept over `SAMPLE_SWEEP`), uniform, with
replacement across calls so the buffer stays full, with
`PIPELINE` calls in flight, as a learner that prefetches its next batch would issue them.
Sampling runs in rounds that alternate between the systems (the box is shared); each system's
median round is reported, as wall-clock traces/s and as traces per CPU-second of the driver and the
system's actors (robust to other load on the box).
Raw token bytes = 4 per prompt/completion token id + 4 per behaviour logprob (int32 + float32).
The naive baseline is what one writes in 20 minutes: one Ray actor, a list of groups, each a list
of per-trace dicts of Python lists (as `RecordBatch.to_pylist()` or a vLLM output gives them); it
gets the same pipelining and pre-built inputs. Memory is the unique set size (USS) a process gains
while holding the data (RSS would count Ray's shared object-store pages), and, for Arrow, the
table's own byte count.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pyarrow.compute as pc
import ray

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from replay.config import ReplayConfig  # noqa: E402
from replay.synthetic import group_batch  # noqa: E402
from services.replay_client import create_replay  # noqa: E402
from tests.bench import replay_durability  # noqa: E402

GROUP, PROMPT, COMPLETION, GROUPS_PER_INSERT, GROUPS_PER_SAMPLE, PIPELINE = 8, 128, 512, 16, 128, 4
SAMPLE_SWEEP = (32, 128, 256)  # groups per sample call; GROUPS_PER_SAMPLE is the headline
TRACES_PER_ROUND = 16384  # each sampling round moves about this many traces, whatever the call size


@ray.remote(num_cpus=0)
class NaiveReplay:
    def __init__(self, capacity_groups: int):
        self.capacity_groups = capacity_groups
        self.groups: list[list[dict]] = []

    def insert(self, traces: list[dict]) -> int:
        by_group: dict[str, list[dict]] = collections.defaultdict(list)
        for t in traces:
            by_group[t["group_id"]].append(t)
        self.groups.extend(by_group.values())
        del self.groups[: max(0, len(self.groups) - self.capacity_groups)]
        return len(by_group)

    def sample(self, n_groups: int) -> list[dict] | None:
        if len(self.groups) < n_groups:
            return None
        return [t for g in random.sample(self.groups, n_groups) for t in g]

    def size(self) -> int:
        return len(self.groups)

    def pid(self) -> int:
        return os.getpid()


def _batches(n_calls: int, tag: str) -> list:
    return [
        group_batch([f"{tag}{c}-{g}" for g in range(GROUPS_PER_INSERT)], GROUP, PROMPT, COMPLETION, seed=c)
        for c in range(n_calls)
    ]


def _tokens(batch) -> tuple[int, int]:
    return tuple(pc.sum(pc.list_value_length(batch[c])).as_py() for c in ("prompt_ids", "completion_ids"))


def _uss(pids: list[int]) -> int:
    return sum(psutil.Process(p).memory_full_info().uss for p in pids)


def _pipelined(submit, n_calls: int) -> tuple[float, list]:
    """Issue `n_calls` with PIPELINE in flight; returns (seconds, results)."""
    start, inflight, out = time.perf_counter(), collections.deque(), []
    for _ in range(n_calls):
        inflight.append(submit())
        if len(inflight) >= PIPELINE:
            out.append(ray.get(inflight.popleft()))
    out += ray.get(list(inflight))
    return time.perf_counter() - start, out


class _Naive:
    name = "naive (1 actor, list of dicts)"

    def __init__(self):
        self.actor = NaiveReplay.remote(10**6)
        self.pids = [ray.get(self.actor.pid.remote())]

    def fill(self, batches: list) -> float:
        it = iter([b.to_pylist() for b in batches])  # producers hand over dicts: not timed
        return _pipelined(lambda: self.actor.insert.remote(next(it)), len(batches))[0]

    def sample_round(self, n_calls: int, n_groups: int) -> tuple[float, int, int]:
        seconds, results = _pipelined(lambda: self.actor.sample.remote(n_groups), n_calls)
        tokens = sum(len(t["prompt_ids"]) + len(t["completion_ids"]) for r in results for t in r)
        return seconds, sum(len(r) for r in results), tokens

    def extra(self) -> dict:
        return {}

    def stop(self) -> None:
        ray.kill(self.actor)


class _Sharded:
    def __init__(self, num_shards: int):
        self.name = f"arrow, {num_shards} shard{'s' * (num_shards > 1)}"
        cfg = ReplayConfig(
            num_shards=num_shards, sampler="uniform", max_times_sampled=None, capacity_groups=10**6, max_staleness=None
        )
        self.client = create_replay(cfg)
        self.pids = ray.get([s.pid.remote() for s in self.client.shards])

    def fill(self, batches: list) -> float:
        it = iter(batches)
        return _threaded(lambda: self.client.insert(next(it)), len(batches))[0]

    def sample_round(self, n_calls: int, n_groups: int) -> tuple[float, int, int]:
        # the client's plan + draw runs in the caller: PIPELINE threads keep PIPELINE calls in flight
        seconds, results = _threaded(lambda: self.client.sample(n_groups, 0), n_calls)
        return seconds, sum(r.batch.num_rows for r in results), sum(sum(_tokens(r.batch)) for r in results)

    def extra(self) -> dict:
        pool = sum(ray.get([s.arrow_allocated_bytes.remote() for s in self.client.shards]))
        return {"held_bytes_arrow": sum(s.bytes for s in self.client.stats()), "held_bytes_arrow_pool": pool}

    def stop(self) -> None:
        for s in self.client.shards:
            ray.kill(s)


def _threaded(call, n_calls: int) -> tuple[float, list]:
    start = time.perf_counter()
    with ThreadPoolExecutor(PIPELINE) as pool:
        out = list(pool.map(lambda _: call(), range(n_calls)))
    return time.perf_counter() - start, out


def _fill_all(subjects: list, batches: list) -> dict[str, dict]:
    traces = sum(b.num_rows for b in batches)
    tokens = sum(sum(_tokens(b)) for b in batches)
    rows = {}
    for s in subjects:
        uss0 = _uss(s.pids)
        t_insert = s.fill(batches)
        rows[s.name] = {
            "name": s.name,
            "insert_traces_per_s": traces / t_insert,
            "insert_tokens_per_s": tokens / t_insert,
            "held_bytes_uss": _uss(s.pids) - uss0,
            **s.extra(),
        }
    return rows


def _cpu_s(pids: list[int]) -> float:
    """CPU seconds used so far by the driver and `pids` (the raylet's share, common to all, is left out)."""
    times = [psutil.Process(p).cpu_times() for p in [os.getpid(), *pids]]
    return sum(t.user + t.system for t in times)


def _sample_rates(subjects: list, n_groups: int, rounds: int) -> dict[str, tuple[float, float, float]]:
    """Median (traces/s, tokens/s, traces per CPU-second) per subject over `rounds` rounds that
    alternate between subjects, so load from other processes on the shared box hits all alike."""
    n_calls = max(PIPELINE, TRACES_PER_ROUND // (n_groups * GROUP))
    seen: dict[str, list] = {s.name: [] for s in subjects}
    for _ in range(rounds):
        for s in subjects:
            cpu0 = _cpu_s(s.pids)
            seconds, n_traces, n_tokens = s.sample_round(n_calls, n_groups)
            seen[s.name].append((n_traces / seconds, n_tokens / seconds, n_traces / (_cpu_s(s.pids) - cpu0)))
    return {name: tuple(float(np.median([x[i] for x in r])) for i in range(3)) for name, r in seen.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a smaller smoke run; does not write the JSON")
    ap.add_argument("--durability", action="store_true", help="only the fsync cost; updates that key of the JSON")
    args = ap.parse_args()
    n_insert, rounds = (40, 1) if args.quick else (120, 5)
    durability = replay_durability.measure(GROUP, PROMPT, COMPLETION, GROUPS_PER_INSERT, n_insert, rounds)
    replay_durability.print_table(durability)
    if args.durability:
        path = pathlib.Path(__file__).parent / "results" / "replay.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "durability": durability}, indent=1))
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    subjects = []
    try:
        batches = _batches(n_insert, "g")
        prompt_tok, completion_tok = map(sum, zip(*(_tokens(b) for b in batches)))
        raw_bytes = 4 * (prompt_tok + completion_tok) + 4 * completion_tok
        subjects = [_Naive()] + [_Sharded(k) for k in (1, 2, 4)]
        rows = _fill_all(subjects, batches)
        sweep = {n: _sample_rates(subjects, n, rounds) for n in SAMPLE_SWEEP}
    finally:
        for s in subjects:
            s.stop()
        ray.shutdown()
    for name, row in rows.items():
        row["sample_traces_per_s"], row["sample_tokens_per_s"], row["sample_traces_per_cpu_s"] = sweep[
            GROUPS_PER_SAMPLE
        ][name]
    _report(list(rows.values()), sweep, raw_bytes, prompt_tok + completion_tok, n_insert, not args.quick, durability)


def _print_tables(rows: list[dict], sweep: dict, tokens: int) -> None:
    print(f"{'replay':32s} {'ins tr/s':>9s} {'ins tok/s':>11s} {'smp tr/s':>9s} {'smp tok/s':>11s} {'USS B/tok':>9s}")
    for r in rows:
        print(
            f"{r['name']:32s} {r['insert_traces_per_s']:9.0f} {r['insert_tokens_per_s']:11.0f} "
            f"{r['sample_traces_per_s']:9.0f} {r['sample_tokens_per_s']:11.0f} {r['held_bytes_uss'] / tokens:9.2f}"
        )
    naive = rows[0]["name"]
    print("sample speedup vs naive by groups per sample call (wall clock; traces per CPU-second in brackets):")
    for n, rates in sweep.items():
        print(
            f"  {n:4d} groups: "
            + "  ".join(
                f"{r['name']} {rates[r['name']][0] / rates[naive][0]:5.1f}x "
                f"({rates[r['name']][2] / rates[naive][2]:.1f}x)"
                for r in rows[1:]
            )
        )


def _report(
    rows: list[dict], sweep: dict, raw_bytes: int, tokens: int, n_insert: int, write: bool, durability: dict
) -> None:
    _print_tables(rows, sweep, tokens)
    naive, one, four = rows[0], rows[1], rows[-1]
    out = {
        "workload": {
            "group_size": GROUP,
            "prompt_tokens": PROMPT,
            "completion_tokens_max": COMPLETION,
            "groups_per_insert": GROUPS_PER_INSERT,
            "groups_per_sample": GROUPS_PER_SAMPLE,
            "pipeline": PIPELINE,
            "insert_calls": n_insert,
            "tokens_held": tokens,
            "raw_token_bytes": raw_bytes,
            "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0],
        },
        "rows": rows,
        "sample_traces_per_s_by_groups_per_call": {str(n): rates for n, rates in sweep.items()},
        "speedup_vs_naive_at_4_shards": four["sample_traces_per_s"] / naive["sample_traces_per_s"],
        "speedup_vs_naive_at_1_shard": one["sample_traces_per_s"] / naive["sample_traces_per_s"],
        "cpu_efficiency_vs_naive_at_4_shards": four["sample_traces_per_cpu_s"] / naive["sample_traces_per_cpu_s"],
        "speedup_vs_naive_at_4_shards_by_groups_per_call": {
            str(n): rates[four["name"]][0] / rates[naive["name"]][0] for n, rates in sweep.items()
        },
        "insert_speedup_vs_naive_at_4_shards": four["insert_traces_per_s"] / naive["insert_traces_per_s"],
        "memory_over_raw": one["held_bytes_arrow_pool"] / raw_bytes,
        "table_bytes_over_raw": one["held_bytes_arrow"] / raw_bytes,
        "memory_over_raw_uss": one["held_bytes_uss"] / raw_bytes,
        "naive_memory_over_raw_uss": naive["held_bytes_uss"] / raw_bytes,
        "bytes_per_token_arrow": one["held_bytes_arrow"] / tokens,
        "durability": durability,
    }
    print(
        json.dumps({k: v for k, v in out.items() if k not in ("rows", "workload") and "by_groups" not in k}, indent=1)
    )
    if write:  # --quick is a smoke run: it must not replace the recorded results
        path = pathlib.Path(__file__).parent / "results" / "replay.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
