"""Benchmark: weight sync from learner rank 0 to one rollout receiver, bucketed vs naive vs memcpy.

Run: `python tests/bench/weight_sync.py [--sizes 10M,100M,500M]`. Prints a table and writes
`tests/bench/results/weight_sync.json`. `--publish 10M,100M` instead measures the whole publish path into a
live vLLM engine, old vs new (`tests/bench/publish.py`), and merges it there under `publish`.
Two processes on this host over gloo/loopback: the sender
(this process) and one spawned receiver. Per model size (Llama-shaped fp32 tensor lists) it times:
- `naive`: what a competent engineer writes without bucketing (the common OpenRLHF-style loop): both
  sides know the layout, the sender broadcasts each parameter in place (no copy), the receiver
  broadcasts into a fresh `torch.empty` per parameter and hands it on; no headers.
- `naive_prealloc`: the same, but the receiver keeps one persistent receive tensor per parameter
  (a whole extra model of memory per rollout worker; avoids fresh-page faults on CPU).
  `bucketed_over_naive*` compare against the faster of the two naive variants.
- `bucket_<N>MB`: `BroadcastTransport.send`/`receive` (pack, header, unpack into views).
- `bucket_32MB_bf16`: the same with `wire_dtype="bfloat16"` (half the wire bytes, cast both ends).
- `memcpy`: the same bytes copied tensor by tensor into one preallocated flat buffer, in-process.
A sync's time runs from the sender's first byte until the receiver's 1-int ack arrives, so it covers
the receiver's unpack. Each method runs `repeats` times after one warm-up; GB/s and every ratio use
the fastest repeat (this box is shared, so the minimum is the least-disturbed estimate); the JSON
keeps every repeat and the median too. `gb_per_s` counts fp32 model bytes (also for the bf16 wire).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from learner.weight_transport import BroadcastTransport, WeightSyncConfig, free_port  # noqa: E402

MB = 2**20
# name -> (hidden, intermediate, layers, vocab, repeats); parameter counts printed in the table
SIZES = {"10M": (128, 344, 4, 32000, 9), "100M": (768, 2048, 8, 32000, 5), "500M": (1536, 4096, 14, 32000, 3)}
BUCKET_MB = (1, 32, 256)
ADDR = "127.0.0.1"


def llama_shapes(hidden: int, intermediate: int, layers: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + f"self_attn.{x}_proj.weight", (hidden, hidden)) for x in "qkvo"]
        shapes += [
            (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", (hidden, intermediate)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    return shapes + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def methods() -> list[tuple[str, int | None, str | None]]:
    """(name, bucket_bytes or None for naive/memcpy, wire_dtype)."""
    return (
        [("naive", None, None), ("naive_prealloc", None, None)]
        + [(f"bucket_{mb}MB", mb * MB, None) for mb in BUCKET_MB]
        + [("bucket_32MB_bf16", 32 * MB, "bfloat16"), ("memcpy", None, None)]
    )


def _transports(rank: int, ports: dict[str, int]) -> tuple[dict[str, BroadcastTransport], object]:
    """One BroadcastTransport per bucketed method plus a plain gloo group for naive broadcasts and acks."""
    out = {}
    for name, bucket_bytes, wire_dtype in methods():
        if bucket_bytes is not None:
            cfg = WeightSyncConfig(bucket_bytes=bucket_bytes, wire_dtype=wire_dtype, timeout_s=300)
            out[name] = BroadcastTransport.create(cfg, ADDR, ports[name], rank, 2)
    store = dist.TCPStore(ADDR, ports["naive"], 2, rank == 0, timedelta(seconds=300))
    return out, dist.ProcessGroupGloo(store, rank, 2, timedelta(seconds=300))


def _ack(group, rank: int) -> None:
    group.broadcast(torch.ones(1) if rank == 1 else torch.zeros(1), 1).wait()


def _small_op_latency_s(group, n: int = 300) -> float:
    """Seconds per broadcast of one float: the per-collective cost a per-tensor loop pays per tensor."""
    x = torch.zeros(1)
    for _ in range(20):
        group.broadcast(x, 0).wait()
    start = time.perf_counter()
    for _ in range(n):
        group.broadcast(x, 0).wait()
    return (time.perf_counter() - start) / n


def _receiver(ports: dict[str, int], sizes: list[str]) -> None:
    torch.set_num_threads(1)
    transports, group = _transports(1, ports)
    _small_op_latency_s(group)
    for size in sizes:
        shapes = llama_shapes(*SIZES[size][:4])
        prealloc = [torch.empty(shape) for _, shape in shapes]
        for name, _bucket_bytes, _ in methods():
            for _ in range(1 + SIZES[size][4]):
                if name == "memcpy":
                    continue
                if name == "naive":
                    for _, shape in shapes:
                        group.broadcast(torch.empty(shape), 0).wait()
                elif name == "naive_prealloc":
                    for t in prealloc:
                        group.broadcast(t, 0).wait()
                else:
                    _, tensors = transports[name].receive()
                    for _ in tensors:
                        pass
                _ack(group, 1)


def _time_sync(fn, group) -> float:
    start = time.perf_counter()
    fn()
    if group is not None:
        _ack(group, 0)
    return time.perf_counter() - start


def _bench_size(size: str, transports, group) -> dict:
    hidden, intermediate, layers, vocab, repeats = SIZES[size]
    named = [(n, torch.full(s, 0.5)) for n, s in llama_shapes(hidden, intermediate, layers, vocab)]
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    flat = torch.empty(nbytes, dtype=torch.uint8)
    runs = {
        "naive": lambda: [group.broadcast(t, 0).wait() for _, t in named],
        "naive_prealloc": lambda: [group.broadcast(t, 0).wait() for _, t in named],
        "memcpy": lambda: _memcpy(named, flat),
        **{name: (lambda tr=tr: tr.send(named, 0)) for name, tr in transports.items()},
    }
    row = {"params": sum(t.numel() for _, t in named), "bytes": nbytes, "tensors": len(named), "methods": {}}
    for name, _, wire_dtype in methods():
        seconds = [_time_sync(runs[name], None if name == "memcpy" else group) for _ in range(1 + repeats)][1:]
        best = min(seconds)
        row["methods"][name] = {
            "seconds": seconds,
            "median_s": statistics.median(seconds),
            "min_s": best,
            "gb_per_s": nbytes / best / 1e9,
            "wire_bytes": nbytes // 2 if wire_dtype else nbytes,
        }
    return _summarise(row)


def _memcpy(named, flat: torch.Tensor) -> None:
    offset = 0
    for _, t in named:
        n = t.numel() * t.element_size()
        flat[offset : offset + n].view(t.dtype).view(t.shape).copy_(t)
        offset += n


def _summarise(row: dict) -> dict:
    m = row["methods"]
    naive_s = min(m["naive"]["min_s"], m["naive_prealloc"]["min_s"])
    speedups = {f"{mb}MB": naive_s / m[f"bucket_{mb}MB"]["min_s"] for mb in BUCKET_MB}
    best = max(m[f"bucket_{mb}MB"]["gb_per_s"] for mb in BUCKET_MB)
    return {
        **row,
        "bucketed_over_naive": speedups,
        "bucketed_over_naive_min": min(speedups.values()),
        "bucketed_over_naive_max": max(speedups.values()),
        "naive_fraction_of_memcpy": max(m["naive"]["gb_per_s"], m["naive_prealloc"]["gb_per_s"])
        / m["memcpy"]["gb_per_s"],
        "fraction_of_memcpy": best / m["memcpy"]["gb_per_s"],
    }


def _print_table(results: dict) -> None:
    print(
        f"{'size':>5} {'params':>7} {'tensors':>7}  {'method':<17} {'min_s':>9} {'median_s':>9} {'GB/s':>6} "
        f"{'vs best naive':>13} {'of memcpy':>9}"
    )
    for size, row in results.items():
        m = row["methods"]
        naive_s = min(m["naive"]["min_s"], m["naive_prealloc"]["min_s"])
        for name, cell in m.items():
            print(
                f"{size:>5} {row['params'] / 1e6:6.1f}M {row['tensors']:>7}  {name:<17} {cell['min_s']:9.4f} "
                f"{cell['median_s']:9.4f} {cell['gb_per_s']:6.2f} {naive_s / cell['min_s']:12.2f}x "
                f"{cell['gb_per_s'] / m['memcpy']['gb_per_s']:9.3f}"
            )
    for size, row in results.items():
        print(
            f"{size}: bucketed_over_naive_min={row['bucketed_over_naive_min']:.2f} "
            f"fraction_of_memcpy={row['fraction_of_memcpy']:.3f}"
        )


def headline(results: dict) -> dict:
    """The issue's figures: bucketed (at the default `bucket_bytes`) over the best naive variant, its
    smallest value over the model sizes, and the best bucketed bandwidth as a fraction of memcpy per size."""
    mb = WeightSyncConfig.model_fields["bucket_bytes"].default // 2**20
    return {
        "bucket_mb": mb,
        "bucketed_over_naive_min": min(row["bucketed_over_naive"][f"{mb}MB"] for row in results.values()),
        "bucketed_over_naive": {size: row["bucketed_over_naive"][f"{mb}MB"] for size, row in results.items()},
        "fraction_of_memcpy": {size: row["fraction_of_memcpy"] for size, row in results.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated subset of {list(SIZES)}")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "weight_sync.json"))
    parser.add_argument(
        "--publish",
        metavar="SIZES",
        help="run only the whole publish path into vLLM, old vs new (tests/bench/publish.py), for these sizes "
        "(e.g. 10M,100M), and merge it into the JSON under 'publish'",
    )
    args = parser.parse_args()
    if args.publish:
        _publish(args.publish.split(","), Path(args.out))
        return
    sizes = args.sizes.split(",")
    if unknown := set(sizes) - set(SIZES):
        raise SystemExit(f"unknown --sizes {sorted(unknown)}; choose from {list(SIZES)}")
    torch.set_num_threads(1)  # one core each for sender and receiver on this 2-core box
    ports = {name: free_port() for name, _, _ in methods()}
    load_at_start = os.getloadavg()
    receiver = mp.get_context("spawn").Process(target=_receiver, args=(ports, sizes))
    receiver.start()
    try:
        transports, group = _transports(0, ports)
        started = time.time()
        latency_s = _small_op_latency_s(group)
        results = {size: _bench_size(size, transports, group) for size in sizes}
        receiver.join(timeout=60)
    finally:
        if receiver.is_alive():
            receiver.kill()
    _print_table(results)
    print(f"gloo loopback latency per small broadcast: {latency_s * 1e6:.0f} us")
    meta = {
        "small_broadcast_latency_s": latency_s,
        "host_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "backend": "gloo",
        "receivers": 1,
        "torch_threads_per_process": 1,
        "load_avg_at_start": load_at_start,
        "load_avg_at_end": os.getloadavg(),
        "wall_s": time.time() - started,
        "timing": "min (and median) of repeats after 1 warm-up; sender start -> receiver ack",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**headline(results), "meta": meta, "sizes": results}, indent=2))
    print(f"wrote {args.out}")


def _publish(sizes: list[str], out: Path) -> None:
    from tests.bench import publish

    report = publish.run(sizes, ["float32", "bfloat16"])
    publish.print_table(report)
    data = json.loads(out.read_text()) if out.exists() else {}
    data["publish"] = report
    data["receiver_peak_over_model_bytes"] = report["receiver_peak_over_model_bytes"]
    out.write_text(json.dumps(data, indent=2))
    print(f"wrote {out} (publish)")


if __name__ == "__main__":
    main()
