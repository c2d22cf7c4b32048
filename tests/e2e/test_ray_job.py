"""`ray job submit` against a real local head runs the driver to SUCCEEDED and writes summary.json."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", RAY_AUTH_MODE="token")
    port, dash = _free_port(), _free_port()
    ray = str(bindir / "ray")
    start = subprocess.run([ray, "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                            "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={tmp_path / 'ray'}"],
                           env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield env, f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_job_submit_small_config(ray_head, tmp_path):
    env, address = ray_head
    ray = str(Path(sys.executable).parent / "ray")
    runs = tmp_path / "runs"
    cmd = [ray, "job", "submit", f"--address={address}", "--working-dir", str(REPO),
           "--runtime-env", str(REPO / "deploy/ray/runtime_env.yaml"), "--no-wait", "--",
           "python", "-m", "services.driver", "--config", "deploy/configs/e2e_small.yaml",
           f"run.runs_dir={runs}", f"run.cache_dir={REPO / '.cache'}", "run.name=job"]
    sub = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job_id = next(w for w in sub.stdout.split() if w.startswith("raysubmit_")).strip("'\"")
    status = _wait_terminal(ray, address, job_id, env, timeout_s=900)
    if status != "SUCCEEDED":
        logs = subprocess.run([ray, "job", "logs", f"--address={address}", job_id], env=env, capture_output=True, text=True)
        pytest.fail(f"job {job_id} ended {status}:\n{logs.stdout[-5000:]}")
    summary = json.loads((runs / "job" / "summary.json").read_text())
    assert summary["learner_steps"] == 6
    assert summary["policy_versions_published"] >= 6
    assert 0.0 <= summary["eval_accuracy_final"] <= 1.0


def _wait_terminal(ray: str, address: str, job_id: str, env: dict, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run([ray, "job", "status", f"--address={address}", job_id], env=env, capture_output=True, text=True)
        for status in ("SUCCEEDED", "FAILED", "STOPPED"):
            if f"'{status}'" in out.stdout or f"status: {status}" in out.stdout or out.stdout.strip().endswith(status):
                return status
        time.sleep(3)
    return "TIMEOUT"
