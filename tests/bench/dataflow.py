"""Benchmark: how a step's data reaches the learner ranks — through the driver (before) or replay -> rank (now).

    .venv/bin/python tests/bench/dataflow.py [--steps 6] [--rounds 2] [--groups 8] [--group-size 4]

Setup (one Ray cluster, in this run): 2 `ReplayShard`s, 2 `LearnerRank`s (DeepSpeed ZeRO-1 over gloo,
fp32) on the built-in byte-level BPE Qwen2 model (hidden 256, 4 layers, vocab ~2k, ~4M parameters,
built locally). Before each route runs, replay gets the synthetic groups it will train on
(`--group-size` traces sharing a 48-token prompt, completions of 32..64 tokens, ids inside the
vocabulary): with the prompt on every trace for the driver route (as before), held once per group
for the direct route (as rollout workers now insert them).
Routes, interleaved over `--rounds` so load from other jobs hits both alike:
- driver (a faithful re-creation of the previous loop): `ReplayClient.sample` returns the batch to the
  driver, which splits it round-robin by group and ships one Arrow table to each rank, then waits for
  the step before sampling the next (nothing prefetched);
- direct: `services.train_flow.TrainFlow` — replay cuts the sample into token-balanced per-rank parts
  kept in the shards' object stores, the driver passes their refs, and the next sample is drawn while
  the step trains.
Per step: payload bytes through the driver (Arrow trace data it received or sent), control bytes it
received (metas, ids, diagnostics, as pickled), learner idle fraction = 1 - (time inside
`LearnerCore.train_step`, mean over ranks) / (wall time of the steps), and learner samples (traces)/s
end to end. Also `collate` (Arrow buffers, prompt-once layout) against the `to_pydict` collate it
replaced (full layout), on one rank's share of a step; the JSON also has the Arrow collate on the full
layout. Writes tests/bench/results/dataflow.json. Numbers on a shared 2-core box.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "tests" / "bench" / "results" / "dataflow.json"
PROMPT, COMPLETION = 48, 64


def build_model(out: Path) -> Path:
    from learner.bpe_model import BPEModelSpec, build_bpe_model

    corpus = [f"{a} + {b} = {a + b}. The answer is {a + b}." for a in range(60) for b in range(40)]
    spec = BPEModelSpec(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4)
    return build_bpe_model(out, spec, corpus)


def make_groups(n_groups: int, group_size: int, vocab: int, seed: int, tag: str):
    """`n_groups` whole groups as one TRACE_SCHEMA batch (ids in [3, vocab), finite logprobs <= 0)."""
    import numpy as np
    import pyarrow as pa

    from replay.schema import TRACE_SCHEMA

    rng = np.random.default_rng(seed)
    n = n_groups * group_size
    c_len = rng.integers(COMPLETION // 2, COMPLETION + 1, n)

    def lists(lengths, values):
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))

    p_len = np.full(n, PROMPT)
    group_prompts = rng.integers(3, vocab, (n_groups, PROMPT), dtype=np.int32)  # one prompt per group
    cols = {
        "trace_id": [f"{tag}{i // group_size}/{i % group_size}" for i in range(n)],
        "group_id": [f"{tag}{i // group_size}" for i in range(n)],
        "prompt_ids": lists(p_len, np.repeat(group_prompts, group_size, axis=0).ravel()),
        "completion_ids": lists(c_len, rng.integers(3, vocab, c_len.sum(), dtype=np.int32)),
        "behaviour_logprobs": lists(c_len, (-rng.exponential(2.0, c_len.sum())).astype(np.float32)),
        "reward": rng.integers(0, 2, n).astype(np.float32),
        "token_rewards": pa.nulls(n, pa.list_(pa.float32())),
        "policy_version": np.zeros(n, dtype=np.int64),
        "policy_version_max": np.zeros(n, dtype=np.int64),
        "task": ["bench"] * n,
        "metadata": ["{}"] * n,
        "created_at": np.full(n, time.time()),
    }
    return pa.RecordBatch.from_pydict(cols, schema=TRACE_SCHEMA)


def split_round_robin(batch, parts: int):
    """The previous loop's `_split_groups`: round-robin by group, one filter per part."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = pa.Table.from_batches([batch])
    groups = pc.unique(table.column("group_id")).to_pylist()
    return [
        table.filter(pc.is_in(table.column("group_id"), value_set=pa.array(groups[i::parts]))) for i in range(parts)
    ]


def _arrow_bytes(obj) -> int:
    import pyarrow as pa

    if isinstance(obj, (pa.Table, pa.RecordBatch)):
        return obj.nbytes
    return getattr(getattr(obj, "batch", None), "nbytes", 0)


def run_driver_route(replay, ranks, steps: int, groups: int, group_size: int) -> dict:
    import ray

    payload = control = 0
    busy = []
    t0 = time.perf_counter()
    for _ in range(steps):
        res = replay.sample(groups, 0, timeout_s=10.0)  # the whole batch comes to the driver
        parts = split_round_robin(res.batch, len(ranks))
        payload += _arrow_bytes(res) + sum(p.nbytes for p in parts)  # received, then sent on
        control += len(pickle.dumps((res.group_weights, res.staleness)))
        results = ray.get([r.train_step.remote(p) for r, p in zip(ranks, parts)])
        control += len(pickle.dumps(results))
        busy.append(sum(r.diagnostics["step_s"] for r in results) / len(results))
    wall = time.perf_counter() - t0
    return _summary("driver", steps, groups * group_size, wall, busy, payload, control)


def run_direct_route(replay, ranks, steps: int, groups: int, group_size: int) -> dict:
    import ray

    from services.train_flow import TrainFlow

    flow = TrainFlow(replay, ranks, groups, None, prefetch=True, feed_priorities=False)
    control, busy = 0, []
    t0 = time.perf_counter()
    for i in range(steps):
        if not flow.busy:
            while flow.start(0) is None:
                time.sleep(0.01)
        if i + 1 < steps:
            flow.prefetch(0)
        ray.wait(flow.refs(), num_returns=len(flow.refs()))
        done = flow.finish()
        if i + 1 < steps:
            flow.start(0)  # the prefetched sample goes out at once
        control += done.driver_bytes
        busy.append(sum(r.diagnostics["step_s"] for r in done.results) / len(done.results))
    wall = time.perf_counter() - t0
    return _summary("direct", steps, groups * group_size, wall, busy, 0, control)


def _summary(route, steps, traces_per_step, wall, busy, payload, control) -> dict:
    return {
        "route": route,
        "steps": steps,
        "wall_s": wall,
        "step_busy_s": sum(busy),
        "learner_idle_fraction": max(0.0, 1.0 - sum(busy) / wall),
        "driver_payload_bytes_per_step": payload / steps,
        "driver_control_bytes_per_step": control / steps,
        "samples_per_s": steps * traces_per_step / wall,
    }


def collate_bench(batch, repeats: int = 20) -> dict:
    """Seconds per collate (fastest of `repeats`: the least disturbed by other jobs): the to_pydict collate on
    the full layout (before) against the Arrow collate on the prompt-once layout the learner now receives,
    and on the full layout. One torch thread, as in a learner rank (Ray sets OMP_NUM_THREADS=1 in actors)."""
    import torch

    from learner.batch import collate
    from replay.schema import prompt_once
    from tests.unit.learner.test_batch import reference_collate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    cases = (
        ("to_pydict", reference_collate, batch),
        ("arrow", collate, prompt_once(batch)),
        ("arrow_full", collate, batch),
    )
    for name, fn, data in cases:
        fn(data, 0)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(data, 0)
            times.append(time.perf_counter() - t0)
        out[name] = min(times)
    torch.set_num_threads(threads)
    return out


def start(model_dir: Path, groups: int):
    import ray

    from learner.config import LearnerConfig
    from replay.config import ReplayConfig
    from services.learner_rank import LearnerRank
    from services.replay_client import create_replay

    replay = create_replay(ReplayConfig(num_shards=2, max_staleness=None, capacity_groups=100_000))
    cfg = LearnerConfig(num_ranks=2, zero_stage=1, groups_per_step=groups, lr=1e-5)
    ranks = [LearnerRank.options(num_cpus=1).remote(cfg, str(model_dir), r, 2) for r in range(2)]
    addr, port = ray.get(ranks[0].node_address.remote())
    ray.get([r.setup.remote(addr, port) for r in ranks])
    return replay, ranks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--collate-only", action="store_true", help="re-measure collate; keep the JSON's route rows")
    args = ap.parse_args()
    if args.collate_only:
        old = json.loads(RESULTS.read_text())
        report(old["rows"], collate_sizes(args, 2048), args)
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    import ray

    import learner.batch  # noqa: F401  (imported up front: the measured code is the code at start)
    from replay.schema import prompt_once

    model_dir = build_model(REPO / ".cache" / "bench_dataflow_model")
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    try:
        replay, ranks = start(model_dir, args.groups)
        g, gs = args.groups, args.group_size
        seq = iter(range(10**6))

        def fill(steps: int, once: bool) -> None:  # fifo: each route trains on the groups inserted for it
            batch = make_groups(steps * g, gs, vocab, seed=next(seq), tag=f"r{next(seq)}-")
            replay.insert(prompt_once(batch) if once else batch)  # the direct route stores prompts once

        fill(1, False)
        run_driver_route(replay, ranks, 1, g, gs)  # warm-up: DeepSpeed's first step, Ray workers
        fill(1, True)
        run_direct_route(replay, ranks, 1, g, gs)
        rows = []
        for _ in range(args.rounds):
            fill(args.steps, False)
            rows.append(run_driver_route(replay, ranks, args.steps, g, gs))
            fill(args.steps, True)
            rows.append(run_direct_route(replay, ranks, args.steps, g, gs))
        for r in ranks:
            ray.get(r.shutdown.remote())
    finally:
        ray.shutdown()
    report(rows, collate_sizes(args, vocab), args)


def collate_sizes(args, vocab: int) -> dict:
    """Collate timings on this bench's rank share and on a production-sized one (32 groups of 8 per rank)."""
    small = make_groups(args.groups // 2, args.group_size, vocab, seed=1, tag="c")
    large = make_groups(32, 8, vocab, seed=2, tag="C")
    return {"rank_share": collate_bench(small), "rank_share_256": collate_bench(large)}


def _mean(rows, route, key):
    vals = [r[key] for r in rows if r["route"] == route]
    return sum(vals) / len(vals)


def report(rows: list[dict], collate_s: dict, args) -> None:
    print(
        f"{'route':8} {'steps':>5} {'wall_s':>7} {'idle':>6} {'payload B/step':>15} "
        f"{'control B/step':>15} {'samples/s':>10}"
    )
    for r in rows:
        print(
            f"{r['route']:8} {r['steps']:>5} {r['wall_s']:>7.2f} {r['learner_idle_fraction']:>6.1%} "
            f"{r['driver_payload_bytes_per_step']:>15,.0f} {r['driver_control_bytes_per_step']:>15,.0f} "
            f"{r['samples_per_s']:>10.1f}"
        )
    small, large = collate_s["rank_share"], collate_s["rank_share_256"]
    speedup = large["to_pydict"] / large["arrow"]
    for name, c in (("this step's rank share", small), ("256 traces per rank", large)):
        print(
            f"collate ({name}): to_pydict {c['to_pydict'] * 1e3:.2f} ms, arrow (prompt once) "
            f"{c['arrow'] * 1e3:.2f} ms = {c['to_pydict'] / c['arrow']:.1f}x, "
            f"arrow (full) {c['arrow_full'] * 1e3:.2f} ms"
        )
    out = {
        "driver_payload_bytes_per_step": _mean(rows, "direct", "driver_payload_bytes_per_step"),
        "driver_payload_bytes_per_step_baseline": _mean(rows, "driver", "driver_payload_bytes_per_step"),
        "driver_control_bytes_per_step": _mean(rows, "direct", "driver_control_bytes_per_step"),
        "learner_idle_fraction": _mean(rows, "direct", "learner_idle_fraction"),
        "learner_idle_fraction_baseline": _mean(rows, "driver", "learner_idle_fraction"),
        "collate_speedup": speedup,
        "collate_s": collate_s,
        "collate_speedup_full_layout": large["to_pydict"] / large["arrow_full"],
        "collate_speedup_this_step": small["to_pydict"] / small["arrow"],
        "learner_samples_per_s": _mean(rows, "direct", "samples_per_s"),
        "learner_samples_per_s_baseline": _mean(rows, "driver", "samples_per_s"),
        "samples_per_s_ratio": _mean(rows, "direct", "samples_per_s") / _mean(rows, "driver", "samples_per_s"),
        "rows": rows,
        "setup": {
            "model": "built-in byte-level BPE Qwen2 (hidden 256, 4 layers, vocab 2048, ~4M params), fp32",
            "learner": "2 LearnerRanks, DeepSpeed ZeRO-1 over gloo, 1 CPU each",
            "replay": "2 ReplayShards",
            "groups_per_step": args.groups,
            "group_size": args.group_size,
            "tokens": f"prompt {PROMPT}, completion {COMPLETION // 2}..{COMPLETION}",
            "steps_per_round": args.steps,
            "rounds": args.rounds,
        },
        "note": "measured on a shared 2-core box under load from other jobs; read the ratios",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1))
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
