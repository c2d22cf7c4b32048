"""`python -m services.evaluate --workers N` on a local Ray: results do not depend on the worker count; vLLM path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _evaluate(tmp_path: Path, name: str, *args: str) -> dict:
    out = tmp_path / name
    cmd = [sys.executable, "-m", "services.evaluate", "--config", "deploy/configs/e2e_small.yaml", "--out", str(out)]
    cmd += [*args, f"run.cache_dir={REPO / '.cache'}", "run.num_cpus=2", "rollout.num_cpus_per_worker=0.5"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "passk.json").read_text())


def test_worker_count_does_not_change_results_hf(tiny_model_dir, tmp_path):
    common = [
        "--model",
        str(tiny_model_dir),
        "--n",
        "8",
        "--limit",
        "12",
        "--batch-sequences",
        "16",
        "rollout.engine=hf",
    ]
    one = _evaluate(tmp_path, "one", *common, "--workers", "1")
    two = _evaluate(tmp_path, "two", *common, "--workers", "2")
    a, b = one["models"][0], two["models"][0]
    assert len(a["correct_per_prompt"]) == 12
    assert a["correct_per_prompt"] == b["correct_per_prompt"]  # same batches, same seeds, any worker
    assert a["greedy_score_per_prompt"] == b["greedy_score_per_prompt"]
    assert a["curve"] == b["curve"]


def test_cold_start_on_vllm_workers(tmp_path):
    data = _evaluate(tmp_path, "vllm", "--model", "@coldstart", "--n", "16", "--limit", "16", "--workers", "2")
    (m,) = data["models"]
    assert m["label"] == "cold start" and data["settings"]["engine"] == "vllm"
    assert len(m["correct_per_prompt"]) == 16 and m["sampled_tokens"] >= 16 * 16
    ks = [p["k"] for p in m["curve"]]
    assert ks == [1, 2, 4, 8, 16]
    pk = [p["pass_at_k"] for p in m["curve"]]
    assert pk == sorted(pk)  # pass@k never falls with k
    assert (tmp_path / "vllm" / "passk.png").exists()
