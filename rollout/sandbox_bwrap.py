"""bubblewrap mechanics of one sandbox run (see rollout/sandbox.py for the contract and the limits).

`BwrapRun` holds the run's file descriptors (anonymous files for the program, stdin and output;
pipes for bwrap's --info-fd and the init's wait status), starts bwrap, waits until the program
exits or the deadline passes (then SIGKILLs the sandbox's init, which ends its pid namespace),
and returns what happened as a `RawRun`. `host_uid` hands a root runner a host uid no other
sandbox holds. No Flywheel imports beyond the config's type: rollout/sandbox.py builds on this.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import select
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rollout.sandbox import SandboxConfig

INIT = Path(__file__).with_name("sandbox_launcher.py")
UID_SLOTS = 4096
SANDBOX_UID = 65534  # the program's uid inside its user namespace ("nobody")
SIGKILL = 9


class SandboxUnavailable(RuntimeError):
    """The sandbox itself cannot run here (not the program's fault); the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class RawRun:
    status: int | None  # the program's wait status from the init; None if the init was killed first
    timed_out: bool
    stdout: str
    stderr: str
    leftover_processes: int  # processes of the sandbox's pid namespace alive after bwrap ended (killed)


def bwrap_args(cfg: SandboxConfig, python: str, fds: dict[str, int], timeout_s: float) -> list[str]:
    """bubblewrap's command line: namespaces, the read-only view, scratch space, then init and the program."""
    scratch = str(cfg.scratch_mb << 20)
    cpu_s = cfg.cpu_s or max(1, math.ceil(timeout_s))
    limits = [cfg.memory_mb, cpu_s, cfg.file_size_mb, cfg.max_processes, cfg.max_open_files]
    return [
        *("--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--as-pid-1"),
        *("--cap-drop", "ALL", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox"),
        *("--info-fd", str(fds["info"])),
        *_system_view(python),
        *("--proc", "/proc", "--dev", "/dev"),
        *("--size", scratch, "--tmpfs", "/tmp", "--size", scratch, "--tmpfs", "/work"),
        *("--ro-bind-data", str(fds["program"]), "/work/main.py"),
        *("--ro-bind-data", str(fds["init"]), "/sandbox/init.py"),
        *("--remount-ro", "/dev", "--remount-ro", "/"),
        *("--chdir", "/work", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/work"),
        *("--setenv", "LANG", "C.UTF-8", "--"),
        *(python, "-I", "-S", "/sandbox/init.py", str(fds["status"]), *map(str, limits), "--"),
        *(python, "-I", "-S", "-B", "/work/main.py"),
    ]


def _system_view(python: str) -> list[str]:
    """/usr read-only, the top-level /bin, /lib... as the host has them, and the interpreter's own prefix."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/") / name
        if host.is_symlink():
            args += ["--symlink", os.readlink(host), str(host)]
        elif host.is_dir():
            args += ["--ro-bind", str(host), str(host)]
    prefix = Path(os.path.realpath(python)).parent.parent
    if not prefix.is_relative_to("/usr") and prefix != Path("/"):
        args += ["--ro-bind", str(prefix), str(prefix)]
    return args


@contextlib.contextmanager
def host_uid(cfg: SandboxConfig):
    """As root: a host uid no other sandbox holds now (a lock file per slot); otherwise None (keep ours)."""
    if os.geteuid() != 0:
        yield None
        return
    locks = Path("/run/flywheel-sandbox" if os.access("/run", os.W_OK) else f"{tempfile.gettempdir()}/flywheel-sandbox")
    locks.mkdir(mode=0o700, exist_ok=True)
    st = locks.stat()
    if st.st_uid != 0 or st.st_mode & 0o077:
        raise SandboxUnavailable(f"{locks} must be owned by root with mode 0700 (it holds the sandbox uid locks)")
    for slot in range(UID_SLOTS):
        fd = os.open(locks / f"uid-{slot}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield cfg.uid_base + slot
        finally:
            os.close(fd)
        return
    raise SandboxUnavailable(f"all {UID_SLOTS} sandbox uids are in use on this host; run fewer sandboxes at once")


class BwrapRun:
    """The file descriptors of one run (anonymous files and pipes) and the wait/kill/collect steps."""

    def __init__(self, cfg: SandboxConfig, source: str, stdin: str, timeout_s: float):
        self.cfg, self.timeout_s = cfg, timeout_s
        self._stack = contextlib.ExitStack()
        self._write_ends: list[int] = []
        self._stack.callback(self._close_write_ends)
        self.stdin = self._file(stdin.encode())
        self.stdout, self.stderr = self._file(b""), self._file(b"")
        self.info_r, info_w = self._pipe()
        self.status_r, status_w = self._pipe()
        self.fds = {
            "program": self._memfd(source.encode()),
            "init": self._memfd(INIT.read_bytes()),
            "info": info_w,
            "status": status_w,
        }

    def __enter__(self) -> BwrapRun:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _file(self, data: bytes):
        f = self._stack.enter_context(tempfile.TemporaryFile())  # O_TMPFILE: never has a name on disk
        f.write(data)
        f.seek(0)
        return f

    def _memfd(self, data: bytes) -> int:
        fd = os.memfd_create("sandbox", os.MFD_CLOEXEC)
        self._stack.callback(os.close, fd)
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def _pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        self._stack.callback(os.close, r)
        self._write_ends.append(w)
        return r, w

    def _close_write_ends(self) -> None:
        while self._write_ends:
            os.close(self._write_ends.pop())

    def execute(self, argv: list[str], uid: int | None) -> RawRun:
        t0 = time.monotonic()
        ids = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
        proc = subprocess.Popen(
            argv,
            stdin=self.stdin,
            stdout=self.stdout,
            stderr=self.stderr,
            pass_fds=tuple(self.fds.values()),
            start_new_session=True,
            env={"PATH": "/usr/bin:/bin"},
            **ids,
        )
        self._close_write_ends()  # only the sandbox holds them now: EOF once it is gone
        info = _read_info(self.info_r, t0 + self.timeout_s)
        timed_out = self._wait(proc, info, t0 + self.timeout_s)
        return self._collect(proc, info, timed_out)

    def _wait(self, proc: subprocess.Popen, info: dict, deadline: float) -> bool:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            return False
        except subprocess.TimeoutExpired:
            # SIGKILL the sandbox's init: the kernel ends its namespace, then bwrap reaps it and exits.
            # Killing bwrap first would orphan the init (a zombie where the host's pid 1 does not reap).
            _kill(info.get("child-pid") or proc.pid)
            proc.wait()
            return True

    def _collect(self, proc: subprocess.Popen, info: dict, timed_out: bool) -> RawRun:
        status = _read_status(self.status_r)
        err = _head(self.stderr, self.cfg.max_output_bytes)
        if not info and not timed_out:  # bwrap failed before the sandbox existed: nothing of the program ran
            raise SandboxUnavailable(_explain(err, proc.returncode))
        leftovers = _processes_in(info.get("pid-namespace"))
        for pid in leftovers:
            _kill(pid)
        out = _head(self.stdout, self.cfg.max_output_bytes)
        return RawRun(None if timed_out else status, timed_out, out, err, len(leftovers))


def _read_info(fd: int, deadline: float) -> dict:
    """bwrap's --info-fd JSON (host pid of the sandbox's init, namespace ids); {} if bwrap died first."""
    buf = b""
    while (left := deadline - time.monotonic()) > 0 and select.select([fd], [], [], left)[0]:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
        try:
            return json.loads(buf)
        except ValueError:
            continue
    return {}


def _read_status(fd: int) -> int | None:
    os.set_blocking(fd, False)
    try:
        text = os.read(fd, 64).decode().strip()
    except BlockingIOError:
        return None
    return int(text) if text else None


def _processes_in(pid_namespace: int | None) -> list[int]:
    """Host pids of processes still in that pid namespace (readable ones: ours, or any as root)."""
    if pid_namespace is None:
        return []
    target, found = f"pid:[{pid_namespace}]", []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry.name}/ns/pid") == target:
                    found.append(int(entry.name))
    return found


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, SIGKILL)


def _head(f, limit: int) -> str:
    f.seek(0)
    return f.read(limit).decode("utf-8", errors="replace")


def _explain(stderr: str, returncode: int) -> str:
    msg = stderr.strip().splitlines()[-1] if stderr.strip() else f"bwrap exited with {returncode}"
    hint = (
        "unprivileged user namespaces look disabled: enable them (sysctl kernel.unprivileged_userns_clone=1, "
        "user.max_user_namespaces > 0; on Ubuntu >= 23.10 also kernel.apparmor_restrict_unprivileged_userns=0; "
        "in a container allow unshare/clone of user namespaces in its seccomp profile)"
        if "namespace" in msg or "uid map" in msg or "Operation not permitted" in msg
        else "check that bwrap works here: bwrap --unshare-all --ro-bind /usr /usr /usr/bin/true"
    )
    return f"the code sandbox could not start ({msg}); {hint}"
