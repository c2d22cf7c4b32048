"""A real local Ray head for e2e tests (services/ray_head.py), and `ray job submit` of our driver against it.

The head runs as `ray start --head --block` in its own session on free ports (every fixed default
port too: other Ray heads may run on this machine) and is stopped by signalling its own process
group only — `ray stop` would kill every Ray instance on the box.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

from services.ray_head import free_port, local_head, stop_process_group, wait_http  # noqa: F401 - re-exported

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@contextlib.contextmanager
def local_ray_head(metrics_port: int | None = None, num_cpus: int = 2):
    """Yield (env for the `ray` CLI, dashboard address) of a fresh token-authenticated head; stop it on exit."""
    # export every second, so a short job's last values get out
    with local_head(num_cpus, metrics_port=metrics_port, extra_env={"RAY_metrics_report_interval_ms": "1000"}) as addr:
        yield dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}"), addr


def submit_driver(
    env: dict, address: str, runs_dir: Path, name: str, config: str = "deploy/configs/e2e_small.yaml"
) -> str:
    """`ray job submit` the driver with the README's runtime env; return our own submission id."""
    job_id = f"flywheel-{name}-{uuid.uuid4().hex[:8]}"  # our own id: the CLI's printed one carries colour codes
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        f"--address={address}",
        f"--submission-id={job_id}",
        "--working-dir",
        str(REPO),
        "--runtime-env",
        str(REPO / "deploy/ray/runtime_env.yaml"),
        "--no-wait",
        "--",
        "python",
        "-m",
        "services.driver",
        "--config",
        config,
        f"run.runs_dir={runs_dir}",
        f"run.cache_dir={REPO / '.cache'}",
        f"run.name={name}",
    ]
    for _ in range(30):  # the head's job agent starts a little after its dashboard
        sub = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
        if sub.returncode == 0 or "No available agent" not in sub.stderr + sub.stdout:
            break
        time.sleep(3)
    if sub.returncode != 0:
        raise RuntimeError(f"ray job submit failed:\n{sub.stdout}\n{sub.stderr}\n{_agent_logs()}")
    return job_id


def _agent_logs() -> str:
    """The tail of every local head's dashboard-agent log, so a head whose job agent never came up is diagnosable."""
    tails = []
    for log in sorted(Path("/tmp").glob("fwhead-*/session_latest/logs/dashboard_agent*.log")):
        tails.append(f"--- {log} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))
    return "\n".join(tails) or "(no dashboard-agent log found under /tmp/fwhead-*)"


def wait_job(env: dict, address: str, job_id: str, timeout_s: float) -> str:
    """Poll `ray job status` until the job ends: SUCCEEDED, FAILED, STOPPED, or TIMEOUT."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(
            [str(BIN / "ray"), "job", "status", f"--address={address}", job_id], env=env, capture_output=True, text=True
        )
        text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)  # the CLI colours and logs to stderr
        found = re.findall(r"\b(SUCCEEDED|FAILED|STOPPED)\b", text, flags=re.IGNORECASE)
        if found:
            return found[-1].upper()
        time.sleep(3)
    return "TIMEOUT"


def job_logs(env: dict, address: str, job_id: str) -> str:
    out = subprocess.run(
        [str(BIN / "ray"), "job", "logs", f"--address={address}", job_id], env=env, capture_output=True, text=True
    )
    return out.stdout[-5000:]
