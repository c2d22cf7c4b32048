"""Hostile programs against rollout.sandbox, with host-side checks (stdlib + rollout.sandbox only).

Imported by test_sandbox.py, and run as a script by an unprivileged user there:
    python3 sandbox_battery.py CONTEXT.json   -> prints one JSON object: {program: findings}
Each program prints ESCAPED and exits 0 only if its attack worked inside the sandbox; otherwise it
exits 3. The host then checks what the program cannot see: no process of its pid namespace is left,
no file it tried to leave exists, the processes it tried to kill are alive, no connection arrived.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

from rollout.sandbox import run_sandboxed_code

TIMEOUT_S = 4.0
MEMORY_MB = 128
PRELUDE = "import os, socket, sys, time\nprint(os.readlink('/proc/self/ns/pid'), flush=True)\n"
TRY = (
    "def attempt(f):\n    try:\n        f()\n        return True\n"
    "    except Exception as e:\n        print(type(e).__name__, e)\n        return False\n"
)
VERDICT = "print('ESCAPED' if escaped else 'contained', flush=True)\nsys.exit(0 if escaped else 3)\n"


def programs(ctx: dict) -> dict[str, str]:
    """name -> program source; `ctx` names the host's secrets, pids, ports and the run's token."""
    tok, secrets = ctx["token"], ctx["secret_files"]
    reads = " or ".join(f"attempt(lambda: print(open({p!r}).read()))" for p in secrets)
    reads += " or " + " or ".join(f"attempt(lambda: os.listdir({os.path.dirname(p)!r}))" for p in secrets)
    kills = " or ".join(f"attempt(lambda: os.kill({pid}, 9))" for pid in ctx["victim_pids"])
    connects = " or ".join(
        f"attempt(lambda: socket.create_connection(({host!r}, {port}), timeout=1))" for host, port in ctx["listeners"]
    )
    return {
        "read_dataset_and_replay": f"escaped = {reads}\n",
        "write_dev_shm": f"escaped = attempt(lambda: open('/dev/shm/flywheel-escape-{tok}', 'w').write('x'))\n",
        "leave_a_file_in_tmp": (  # lands in the sandbox's private /tmp: the host must have no such file afterwards
            f"open('/tmp/flywheel-escape-{tok}', 'w').write('x')\nescaped = False\n"
        ),
        "fork_a_child_that_outlives_it": (
            "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(30)\n"
            "        os._exit(0)\n    os._exit(0)\ntime.sleep(0.2)\nescaped = False\n"
        ),
        # The runner, a process of the same user and another sandbox, by host pid; then everything the
        # program can address: its init (the kernel drops the SIGKILL) and kill(-1).
        "signal_the_parent_and_others": (
            f"escaped = {kills}\nattempt(lambda: os.kill(os.getppid(), 9))\n"
            "attempt(lambda: os.kill(-1, 9))\ntime.sleep(0.2)\n"
        ),
        "open_a_socket": f"escaped = {connects} or attempt(lambda: socket.getaddrinfo('example.com', 80))\n",
        "fork_bomb": "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "allocate_beyond_the_memory_limit": f"x = bytearray({4 * MEMORY_MB} << 20)\nescaped = True\n",
    }


def source(body: str) -> str:
    return PRELUDE + TRY + body + VERDICT


def processes_in(ns: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/ns/pid") == ns:
                found.append(int(pid))
        except OSError:
            pass
    return found


def files_with(token: str) -> list[str]:
    return [f"{d}/{n}" for d in ("/dev/shm", "/tmp") for n in os.listdir(d) if token in n]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


def run_one(name: str, body: str, ctx: dict) -> dict:
    t0 = time.monotonic()
    r = run_sandboxed_code(source(body), timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB)
    ns = r.stdout.splitlines()[0] if r.stdout.startswith("pid:[") else None
    time.sleep(0.1)  # anything that survived would still be there now
    return {
        "outcome": r.outcome,
        "escaped": "ESCAPED" in r.stdout,
        "seconds": round(time.monotonic() - t0, 2),
        "leftover_processes": r.leftover_processes,
        "ns_seen": ns is not None,
        "host_processes_left": processes_in(ns) if ns else [],
        "host_files_left": files_with(ctx["token"]),
        "victims_alive": all(alive(p) for p in ctx["host_victims"]),
        "stderr_tail": r.stderr[-300:],
    }


class _Listener:
    """A TCP listener on the host that counts connections (none may come from a sandbox)."""

    def __init__(self, host: str):
        self.sock = socket.create_server((host, 0))
        self.sock.settimeout(0.2)
        self.address = (host, self.sock.getsockname()[1])
        self.connections, self._stop = 0, False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                self.sock.accept()[0].close()
                self.connections += 1
            except OSError:
                pass

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


def _other_sandbox(ctx: dict) -> tuple[threading.Thread, dict]:
    """Sandbox A, which must finish untouched while the signal program runs in sandbox B."""
    out: dict = {}
    body = "time.sleep(3)\nprint('A finished')\nescaped = False\n"

    def run() -> None:
        out["result"] = run_sandboxed_code(source(body), timeout_s=TIMEOUT_S + 4, memory_mb=MEMORY_MB)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline and "pid" not in out:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            except OSError:
                continue
            if cmd.endswith(b"/work/main.py\0") and os.readlink(f"/proc/{pid}/ns/pid") != ctx["own_ns"]:
                out["pid"] = int(pid)
        time.sleep(0.05)
    return thread, out


def run_battery(secret_files: list[str]) -> dict:
    """Every hostile program, its findings, and the control facts that make the findings meaningful."""
    token = uuid.uuid4().hex[:12]
    sleeper = subprocess.Popen(["sleep", "60"])
    listeners = [_Listener("127.0.0.1")] + [_Listener(ip) for ip in _outside_ips()]
    ctx = {
        "token": token,
        "secret_files": secret_files,
        "host_victims": [sleeper.pid, os.getpid()],
        "victim_pids": [sleeper.pid, os.getpid()],
        "listeners": [lst.address for lst in listeners],
        "own_ns": os.readlink("/proc/self/ns/pid"),
    }
    findings: dict = {"uid": os.getuid()}
    try:
        for name in programs(ctx):
            other = _other_sandbox(ctx) if name.startswith("signal") else None
            ctx["victim_pids"] = ctx["host_victims"] + ([other[1]["pid"]] if other and "pid" in other[1] else [])
            findings[name] = run_one(name, programs(ctx)[name], ctx)
            if other is not None:
                other[0].join()
                a = other[1]["result"]
                findings[name]["other_sandbox_found"] = "pid" in other[1]
                findings[name]["other_sandbox_finished"] = a.outcome == "exit_nonzero" and "A finished" in a.stdout
        findings["connections_received"] = sum(lst.connections for lst in listeners)
        findings["listeners"] = len(listeners)
    finally:
        for lst in listeners:
            lst.close()
        sleeper.kill()
        sleeper.wait()
    return findings


def _outside_ips() -> list[str]:
    """This host's non-loopback IPv4 address, if it has one (a sandbox must not reach it either)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent, this only picks the route's source
            ip = s.getsockname()[0]
    except OSError:
        return []
    return [] if ip.startswith("127.") else [ip]


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        context = json.load(f)
    print(json.dumps(run_battery(context["secret_files"])))
