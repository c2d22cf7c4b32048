"""A private local Ray head for commands that submit Ray jobs without a cluster (`flywheel sweep`).

Contract: `local_head(num_cpus)` starts `ray start --head --block` in its own session, on free ports
(every default port too: other Ray heads may run on this machine), with token authentication on and a
fresh random token that only this head, its jobs and this process know (Ray 2.60 heads require a token;
`RAY_AUTH_TOKEN` carries it to the job submission client). It yields the dashboard address for the Job
Submission API and stops the head by signalling its own process group on exit — never `ray stop`,
which would end every Ray instance on the machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_OWN_PORT_FLAGS = (
    "port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "ray-client-server-port",
    "runtime-env-agent-port",
    "node-manager-port",
    "object-manager-port",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the local Ray head exited early (code {proc.returncode}); see its logs")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers (e.g. 401 without a token): it is up
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"the local Ray head at {url} did not answer within {timeout_s:.0f}s")


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group `proc` leads, SIGKILL it after 60 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def local_head(
    num_cpus: float,
    start_timeout_s: float = 180.0,
    metrics_port: int | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Yield `http://127.0.0.1:<dashboard port>` of a fresh head; `RAY_AUTH_TOKEN` is set here meanwhile.

    `metrics_port`: the head exports Prometheus metrics there; `extra_env`: more environment for the head."""
    bin_dir = Path(sys.executable).parent
    token = secrets.token_hex(32)
    env = dict(
        os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", RAY_AUTH_MODE="token", **(extra_env or {})
    )
    env["RAY_AUTH_TOKEN"] = token
    dash = free_port()
    temp = tempfile.mkdtemp(prefix="fwhead-", dir="/tmp")  # AF_UNIX socket paths must stay < 108 bytes
    cmd = [str(bin_dir / "ray"), "start", "--head", "--block", "--dashboard-host=127.0.0.1"]
    cmd += [f"--dashboard-port={dash}", f"--num-cpus={num_cpus:g}", "--disable-usage-stats", f"--temp-dir={temp}"]
    cmd += [f"--{flag}={free_port()}" for flag in _OWN_PORT_FLAGS]
    if metrics_port is not None:
        cmd.append(f"--metrics-export-port={metrics_port}")
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    try:
        wait_http(f"{address}/api/version", head, start_timeout_s)
        log.info(f"local Ray head up at {address} ({num_cpus:g} logical CPUs, logs under {temp})")
        yield address
    finally:
        stop_process_group(head)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(temp, ignore_errors=True)
