"""GPU smoke tests (`pytest tests/gpu -m gpu`): a bf16 learner step on CUDA, the HF engine on CUDA, and an NCCL
weight transfer with its completion and timeout semantics. Skipped without CUDA (CI and the dev box have none);
a few minutes on one GPU, the NCCL transfer needs two (NCCL refuses two ranks on one device).

Each case runs in a child process, so a CUDA/NCCL failure cannot take pytest down with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _run(script: str, *args: str, timeout: int = 600, tmp_path: Path | None = None) -> dict:
    """Run `script` as a file (spawned children can re-import it) in a child Python; its last stdout line is JSON."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("DS_ACCELERATOR", None)  # the conftest sets cpu for the CPU suite; these children use cuda
    path = (tmp_path or Path(os.environ.get("TMPDIR", "/tmp"))) / f"gpu_case_{abs(hash(script))}.py"
    path.write_text(script)
    out = subprocess.run(
        [sys.executable, str(path), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-5000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


LEARNER = r"""
import json, os, sys
import torch
os.environ.update(DS_ACCELERATOR="cuda", MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
from learner.weight_transport import free_port
os.environ["MASTER_PORT"] = str(free_port())
from learner.config import LearnerConfig
from learner.step import LearnerCore
from replay.schema import Trace, traces_to_batch
cfg = LearnerConfig(device="cuda", num_gpus_per_rank=1, precision="bf16", zero_stage=1, lr=1e-3,
                    micro_batch_tokens=32, updates_per_batch=2, weight_sync={"backend": "nccl"},
                    objective={"kl_ref_coef": 0.05, "policy_loss": "decoupled_ppo"})
core = LearnerCore(cfg, sys.argv[1], 0, 1)
traces = [Trace(group_id=f"g{i // 4}", prompt_ids=(1, 4, 5, 13, 6), completion_ids=(8 + i % 3, 9, 2),
                behaviour_logprobs=(-1.5, -1.0, -0.5), reward=float(i % 2), policy_version=0) for i in range(8)]
before = {n: t.float().cpu().clone() for n, t in core.named_weights()}
diags = [core.train_step(traces_to_batch(traces)) for _ in range(2)]
after = dict(core.named_weights())
print(json.dumps({
    "loss": [d["loss"] for d in diags], "skipped": [d["skipped_nonfinite"] for d in diags],
    "updates": [d["updates_applied"] for d in diags], "grad_norm": [d["grad_norm"] for d in diags],
    "dtype": str(next(core.engine.module.parameters()).dtype), "device": str(core.engine.device),
    "changed": any(not torch.equal(after[n].float().cpu(), before[n]) for n in before),
}))
"""


def test_bf16_learner_step_on_cuda(tiny_model_dir, tmp_path):
    r = _run(LEARNER, str(tiny_model_dir), tmp_path=tmp_path)
    assert r["device"].startswith("cuda") and r["dtype"] == "torch.bfloat16"
    assert r["skipped"] == [0.0, 0.0] and r["updates"] == [2.0, 2.0]
    assert all(v == v and abs(v) < 1e3 for v in r["loss"] + r["grad_norm"])
    assert r["changed"]


HF_ENGINE = r"""
import json, sys
import torch
from rollout.config import RolloutConfig
from rollout.engine_hf import HFEngine
cfg = RolloutConfig(engine="hf", device="cuda", dtype="bfloat16", num_gpus_per_worker=1, max_new_tokens=6,
                    max_model_len=48)
eng = HFEngine(cfg, sys.argv[1])
(group,) = eng.generate([[1, 4, 5, 13, 6, 7, 16]], n=4, seed=0)
errs = [max(abs(a - b) for a, b in zip(c.logprobs, eng.teacher_forced_logprobs([1, 4, 5, 13, 6, 7, 16], c.token_ids)))
        for c in group]
eng.load_weights(((n, t.float()) for n, t in eng.model.state_dict().items()), policy_version=1)
print(json.dumps({"lengths": [len(c.token_ids) for c in group], "max_err": max(errs), "version": eng.policy_version,
                  "device": str(next(eng.model.parameters()).device)}))
"""


def test_hf_engine_on_cuda(tiny_model_dir, tmp_path):
    r = _run(HF_ENGINE, str(tiny_model_dir), tmp_path=tmp_path)
    assert r["device"].startswith("cuda") and r["version"] == 1
    assert all(1 <= n <= 6 for n in r["lengths"])
    assert r["max_err"] < 0.1  # bf16 sampling vs bf16 teacher forcing on the same weights


NCCL = r"""
import json, os, sys, time
import torch
import torch.multiprocessing as mp

def child(rank, port, out):
    torch.cuda.set_device(rank)
    from learner.weight_transport import BroadcastTransport, WeightSyncConfig, WeightSyncTimeout
    cfg = WeightSyncConfig(backend="nccl", bucket_bytes=1 << 20, wire_dtype="bfloat16", timeout_s=5.0)
    t = BroadcastTransport.create(cfg, "127.0.0.1", port, rank, 2)
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = [(f"w{i}", torch.randn(512, 1024, device="cuda", generator=g)) for i in range(6)]
    if rank == 0:
        res = {}
        stats = t.send(weights, 1)
        res["sent_buckets"] = stats.buckets
        t0 = time.monotonic()
        try:
            t.send(weights, 2)  # rank 1 gets ready but never joins the collectives
            res["second"] = "completed"
        except WeightSyncTimeout as e:
            res["second"] = "timeout"
        res["second_s"] = time.monotonic() - t0
        res["timeouts"] = t.timeouts
        res["alive_after_timeout"] = True
        out.put(res)
    else:
        v, tensors = t.receive(wait_s=60)
        got = [(n, x.clone()) for n, x in tensors]
        ok = all(torch.equal(x, w.bfloat16()) and x.dtype == torch.bfloat16 for (_, x), (_, w) in zip(got, weights))
        while not t.update_waiting():  # update 2 is announced ...
            time.sleep(0.01)
        t._seq += 1
        t._ready.mark(t._seq)  # ... this receiver says it is ready, then stalls instead of joining the broadcast
        out.put({"received_ok": ok, "version": v})
        time.sleep(20)

if __name__ == "__main__":
    from learner.weight_transport import free_port
    port, ctx = free_port(), mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=child, args=(r, port, out)) for r in (0, 1)]
    [p.start() for p in procs]
    reports = {}
    for _ in range(2):
        reports.update(out.get(timeout=300))
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    print(json.dumps(reports))
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs for two ranks")
def test_nccl_transfer_completes_on_the_host_and_a_stalled_peer_times_out_without_killing_rank_0(tmp_path):
    r = _run(NCCL, timeout=600, tmp_path=tmp_path)
    assert r["received_ok"] and r["version"] == 1 and r["sent_buckets"] >= 3
    assert r["second"] == "timeout" and r["timeouts"] >= 1 and r["alive_after_timeout"]
    assert r["second_s"] < 5.0 + 10
