"""The whole publish path (snapshot, send, receive, load into vLLM) per model size, old vs new: the part of
`tests/bench/weight_sync.py` that needs a live vLLM engine (`weight_sync.py --publish` runs it).

Per model size (Llama-shaped, random fp32 weights, vocab 32000, untied head) x wire dtype x method, one
fresh receiver process (a CPU vLLM engine, fp32, in-process core) and this process as learner rank 0:
- old (re-created): rank 0 copies every parameter to host fp32 (`named_weights`) on the training thread,
  then sends; the receiver up-casts each tensor to its own dtype, keeps the whole update in a list and
  hands the list to vLLM's reload (as `VLLMEngine.load_weights` did).
- new: rank 0 packs the weights into wire-dtype buckets on its device (buffers reused across publishes)
  and `send_packed`s them; the receiver streams each bucket into vLLM's reload in the wire dtype.
Measured: seconds the sender's training thread is held (copy / snapshot), receive+load seconds,
the receiver's memory during the update over the model's bytes as `receiver_peak_over_model_bytes` =
1 + (VmHWM during the update - VmRSS just before) / model bytes (the engine holds the model once; the
rest is what the update costs; VmHWM reset via /proc/self/clear_refs right before), and the sender's
extra memory over model bytes. Each receiver runs the update twice and reports the second (the first
allocates the engine's reload scratch once); what stayed resident after the first (receive buffers kept
for the next update, allocator caches) is reported next to it. The new sender keeps its snapshot (one model
in wire bytes) resident between publishes by design, so its extra at the second publish is ~0.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
ADDR = "127.0.0.1"
MODELS = {"10M": (128, 344, 4), "100M": (768, 2048, 8), "500M": (1536, 4096, 14)}  # hidden, mlp, layers


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def build_model(size: str) -> Path:
    out = REPO / f".cache/bench_publish_llama_{size}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from learner.tiny_model import build_tokenizer

    hidden, mlp, layers = MODELS[size]
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    build_tokenizer("abcdefghijklmnopqrstuvwxyz").save_pretrained(out)
    return out


def _engine(model_dir: Path):
    from rollout.config import RolloutConfig
    from rollout.engine_vllm import VLLMEngine

    cfg = RolloutConfig(engine="vllm", device="cpu", max_new_tokens=4, max_model_len=64, kv_cache_gib=1)
    return VLLMEngine(cfg, model_dir)


def _old_load(engine, tensors, version: int) -> None:
    """The receive path before streaming: restore each tensor's own dtype, hold the list, then reload."""
    import torch

    shapes = engine._shapes
    weights = [(n, t.to(torch.float32) if t.is_floating_point() else t) for n, t in tensors]
    for name, t in weights:
        assert tuple(t.shape) == tuple(shapes[name]), name
    engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
    engine.policy_version = version
    engine._reset_prefix_cache()


def receiver(size: str, method: str, wire: str, port: int) -> None:
    """Child: a vLLM engine that takes two updates by `method`; prints its measurements of the second."""
    import torch

    from learner.weight_transport import BroadcastTransport, WeightSyncConfig

    torch.set_num_threads(1)
    engine = _engine(build_model(size))
    cfg = WeightSyncConfig(bucket_bytes=32 * 2**20, wire_dtype=None if wire == "float32" else wire, timeout_s=600)
    transport = BroadcastTransport.create(cfg, ADDR, port, 1, 2)
    befores = []
    for _ in (1, 2):
        rss_before = _kib("VmRSS")
        befores.append(rss_before)
        Path("/proc/self/clear_refs").write_text("5")
        t0 = time.perf_counter()
        v, tensors = transport.receive(wait_s=600)
        t_announced = time.perf_counter()
        if method == "old":
            _old_load(engine, tensors, v)
        else:
            engine.load_weights(tensors, v)
        done = time.perf_counter()
        peak = _kib("VmHWM")
    print(
        "RESULT "
        + json.dumps(
            {
                "receive_load_s": done - t_announced,
                "waited_s": t_announced - t0,
                "transient_kib": peak - rss_before,
                "retained_kib": befores[1] - befores[0],
            }
        ),
        flush=True,
    )
    transport.close()
    engine.shutdown()


def sender_run(size: str, method: str, wire: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from learner.weight_packing import group_into_buckets
    from learner.weight_transport import BroadcastTransport, WeightSyncConfig, free_port, snapshot_update

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(build_model(size), dtype=torch.float32)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    port = free_port()
    child = subprocess.Popen(
        [sys.executable, __file__, "--receiver", size, method, wire, str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    cfg = WeightSyncConfig(bucket_bytes=32 * 2**20, wire_dtype=None if wire == "float32" else wire, timeout_s=600)
    transport = BroadcastTransport.create(cfg, ADDR, port, 0, 2)
    reuse, held, extra = None, [], []
    for version in (1, 2):
        before = _kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        t0 = time.perf_counter()
        if method == "old":
            weights = [(n, p.detach().to("cpu", copy=True)) for n, p in model.named_parameters()]
            held.append(time.perf_counter() - t0)
            transport.send(weights, version)
            del weights
        else:
            named = ((n, p.detach()) for n, p in model.named_parameters())
            buckets = group_into_buckets(named, cfg.bucket_bytes, cfg.wire_dtype)
            update = snapshot_update(buckets, cfg.wire_dtype, torch.device("cpu"), reuse)
            reuse = update.buckets
            held.append(time.perf_counter() - t0)
            transport.send_packed(update, version)
        extra.append((_kib("VmHWM") - before) * 1024)
    out, err = child.communicate(timeout=1200)
    transport.close()
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        return {"error": err[-3000:]}
    r = json.loads(lines[-1][7:])
    return {
        "model_bytes": model_bytes,
        "params": model_bytes // 4,
        "sender_blocked_s": held[-1],
        "sender_extra_over_model_bytes": extra[-1] / model_bytes,
        "receive_load_s": r["receive_load_s"],
        "receiver_peak_over_model_bytes": 1 + r["transient_kib"] * 1024 / model_bytes,
        "receiver_transient_mib": r["transient_kib"] / 1024,
        "receiver_retained_after_first_update_mib": r["retained_kib"] / 1024,
    }


def run(sizes: list[str], wires: list[str]) -> dict:
    cells = {}
    for size in sizes:
        for wire in wires:
            for method in ("old", "new"):
                key = f"{size}/{wire}/{method}"
                cells[key] = {"size": size, "wire_dtype": wire, "method": method, **sender_run(size, method, wire)}
                print(key, json.dumps(cells[key]), flush=True)
    new = [c for c in cells.values() if c["method"] == "new" and "error" not in c]
    return {
        "receiver_peak_over_model_bytes": {
            f"{c['size']}/{c['wire_dtype']}": c["receiver_peak_over_model_bytes"] for c in new
        },
        "receiver_peak_over_model_bytes_max_ge_100M": max(
            (c["receiver_peak_over_model_bytes"] for c in new if c["size"] != "10M"), default=None
        ),
        "goal": "receiver_peak_over_model_bytes <= 1.1",
        "cells": cells,
        "load_avg": os.getloadavg(),
    }


def print_table(report: dict) -> None:
    print(
        f"{'size':>5} {'wire':>9} {'method':>6} {'blocked s':>9} {'recv+load s':>11} {'recv peak/model':>15} "
        f"{'sender extra/model':>18}"
    )
    for c in report["cells"].values():
        if "error" in c:
            print(f"{c['size']:>5} {c['wire_dtype']:>9} {c['method']:>6} ERROR {c['error'][-300:]}")
            continue
        print(
            f"{c['size']:>5} {c['wire_dtype']:>9} {c['method']:>6} {c['sender_blocked_s']:9.3f} "
            f"{c['receive_load_s']:11.3f} {c['receiver_peak_over_model_bytes']:14.2f}x "
            f"{c['sender_extra_over_model_bytes']:17.2f}x"
        )


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--receiver":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    receiver(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
elif __name__ == "__main__":
    print_table(run(sys.argv[1].split(",") if len(sys.argv) > 1 else ["10M", "100M"], ["float32", "bfloat16"]))
