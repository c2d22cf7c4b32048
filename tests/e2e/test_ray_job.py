"""`ray job submit` against a real local head runs the driver to SUCCEEDED and writes summary.json."""
from __future__ import annotations

import json
import re
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A real `ray start --head --block` on loopback; stopped by signalling its own process group only
    (`ray stop` would also kill other Ray instances on the machine)."""
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", RAY_AUTH_MODE="token")
    port, dash = _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="fwray-", dir="/tmp")  # AF_UNIX socket paths must stay < 108 bytes
    head = subprocess.Popen([str(bindir / "ray"), "start", "--head", "--block", f"--port={port}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_dashboard(address, head, timeout_s=180)
        yield env, address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_dashboard(address: str, head: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert head.poll() is None, "ray start --head exited early"
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return  # the server answers (e.g. 401 without a token): it is up
        except OSError:
            time.sleep(1)
    pytest.fail(f"Ray dashboard at {address} did not come up within {timeout_s}s")


def test_ray_job_submit_small_config(ray_head, tmp_path):
    env, address = ray_head
    ray = str(Path(sys.executable).parent / "ray")
    runs = tmp_path / "runs"
    job_id = f"flywheel-e2e-{uuid.uuid4().hex[:8]}"
    cmd = [ray, "job", "submit", f"--address={address}", f"--submission-id={job_id}", "--working-dir", str(REPO),
           "--runtime-env", str(REPO / "deploy/ray/runtime_env.yaml"), "--no-wait", "--",
           "python", "-m", "services.driver", "--config", "deploy/configs/e2e_small.yaml",
           f"run.runs_dir={runs}", f"run.cache_dir={REPO / '.cache'}", "run.name=job"]
    for _ in range(30):  # the head's job agent starts a little after its dashboard
        sub = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
        if sub.returncode == 0 or "No available agent" not in sub.stderr + sub.stdout:
            break
        time.sleep(3)
    assert sub.returncode == 0, sub.stdout + sub.stderr
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
        text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)  # the CLI colours and logs to stderr
        found = re.findall(r"\b(SUCCEEDED|FAILED|STOPPED)\b", text, flags=re.IGNORECASE)
        if found:
            return found[-1].upper()
        time.sleep(3)
    return "TIMEOUT"
