"""Code sandbox: run a model-written Python program that can read nothing of the host and leaves nothing behind.

Contract of `run_sandboxed_code(source, stdin, cfg)`. The program runs under bubblewrap (`bwrap`) in
fresh user, mount, pid, network, ipc and uts namespaces, as uid 65534 of its own user namespace,
with no capabilities:
- Files: read-only /usr (the interpreter and its stdlib) plus the interpreter's prefix if it lives
  elsewhere, a private read-only /dev (null, zero, urandom, ...), its own /proc, and two private
  tmpfs of `scratch_mb` each: `/work` (its cwd, holding a read-only main.py) and `/tmp`. The root
  is read-only. Nothing else of the host exists there: not the run directory, the dataset, the
  replay segments, the repo, nor the host's /tmp or /dev/shm.
- Identity: as root, each concurrent sandbox also gets a host uid of its own (`uid_base` + a slot
  held under a lock for the sandbox's life), so two sandboxes share not even a uid. Not as root,
  the user namespace is the identity: on the host it is the Flywheel user, but it can see no host
  process (pid namespace) or file (mount namespace) to act on.
- Process tree: the sandbox's init (rollout/sandbox_launcher.py) is pid 1 of its pid namespace;
  when the program exits, or when the runner SIGKILLs that init on timeout, the kernel kills every
  process left in the namespace (pid_namespaces(7)). No cgroup is needed, so this holds unprivileged.
  The runner then looks for survivors in that namespace; `leftover_processes` counts (and kills) any.
- Limits, per process, set inside the sandbox's user namespace: address space `memory_mb`, CPU time
  `cpu_s`, file size `file_size_mb` (captured stdout/stderr included), `max_open_files`, and
  `max_processes` at once (init included). Memory in all is at most
  `max_processes * memory_mb + 2 * scratch_mb`.
- Network: a private network namespace with only loopback: nothing outside is reachable.
- Disk: program text, stdin and output are anonymous files (memfd, O_TMPFILE): nothing to clean up
  even if the runner is killed.
- Time: `timeout_s` of wall time, and never more than the budget left to the reward call running it
  (`call_budget`, set by `rollout.rewards.RewardScorer`) minus `TEARDOWN_MARGIN_S`: the scorer's
  timeout is strictly above the sandbox's by construction, so a sandbox is always ended by its own
  runner rather than orphaned by a scorer that killed its worker.
A sandbox that cannot start (bwrap missing, user namespaces disabled) raises `SandboxUnavailable`
naming the fix; whatever the program does is a `SandboxResult`.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import os
import shutil
import sys
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rollout.sandbox_bwrap import SIGKILL, UID_SLOTS, BwrapRun, SandboxUnavailable, bwrap_args, host_uid

__all__ = ["SandboxConfig", "SandboxResult", "SandboxUnavailable", "call_budget", "run_sandboxed_code"]

TEARDOWN_MARGIN_S = 1.0  # bwrap set-up and teardown take ~30 ms; the rest is slack for a loaded machine
STANDALONE_TIMEOUT_S = 5.0  # timeout_s=None outside any reward call (e.g. a verifier tried by hand)
_INTERPRETERS = ("/usr/bin/python3", "/usr/local/bin/python3")


class SandboxConfig(BaseModel):
    """Limits of one sandboxed program run (`reward.sandbox` in a run config)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    timeout_s: float | None = Field(
        None,
        gt=0.0,
        description="wall-clock seconds per program run; None = what is left of the reward call "
        "(reward.timeout_s) minus a 1 s teardown margin. Lower it to run several programs per call.",
    )
    memory_mb: int = Field(256, ge=32, description="address space per process (RLIMIT_AS), MiB")
    cpu_s: int | None = Field(None, ge=1, description="CPU seconds per process (RLIMIT_CPU); None = ceil(timeout)")
    max_processes: int = Field(
        8, ge=2, description="processes at once, the sandbox's init included; bounds fork bombs and total memory"
    )
    file_size_mb: int = Field(16, ge=1, description="largest file the program may write, stdout/stderr included")
    max_open_files: int = Field(64, ge=8, description="open file descriptors per process (RLIMIT_NOFILE)")
    scratch_mb: int = Field(16, ge=1, description="size of each private writable tmpfs (/work and /tmp), MiB")
    max_output_bytes: int = Field(65_536, ge=1, description="stdout/stderr bytes returned to the verifier")
    interpreter: str | None = Field(
        None,
        description="Python that runs the program (only its stdlib is visible); None = /usr/bin/python3, "
        "else /usr/local/bin/python3, else this process's interpreter. It must be readable by an unprivileged user.",
    )
    uid_base: int = Field(
        2_130_706_432,
        ge=65_536,
        le=2**31 - UID_SLOTS - 1,
        description="root only: concurrent sandbox i runs as host uid uid_base + i (i < 4096); pick a range "
        "no account or subordinate-uid range of the host uses",
    )


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    returncode: int  # the program's exit code, or -N if signal N ended it (as subprocess does)
    stdout: str
    stderr: str
    timed_out: bool
    killed_by_signal: int | None  # e.g. 9 after a wall timeout or the hard CPU limit, 24 at the soft one
    leftover_processes: int = 0  # processes of the sandbox found alive after it ended (killed); 0 by design

    @property
    def outcome(self) -> Literal["ok", "exit_nonzero", "signal", "timeout"]:
        if self.timed_out:
            return "timeout"
        if self.killed_by_signal is not None:
            return "signal"
        return "ok" if self.returncode == 0 else "exit_nonzero"


_DEFAULT = SandboxConfig()
OUTCOMES: collections.Counter[str] = collections.Counter()  # this process's runs by outcome, see take_outcomes
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("sandbox_call_deadline", default=None)


def configure(cfg: SandboxConfig) -> None:
    """Set this process's default limits (a reward worker does this with the run's `reward.sandbox`)."""
    global _DEFAULT
    _DEFAULT = cfg


@contextlib.contextmanager
def call_budget(deadline: float | None):
    """Within this block no sandbox outlives `deadline` (a `time.monotonic()` value) minus the margin."""
    token = _deadline.set(deadline)
    try:
        yield
    finally:
        _deadline.reset(token)


def effective_timeout(cfg: SandboxConfig) -> float:
    """The wall time a run may take now: `cfg.timeout_s` clamped to the reward call's remaining budget."""
    deadline, t = _deadline.get(), cfg.timeout_s
    if deadline is not None:
        left = deadline - time.monotonic() - TEARDOWN_MARGIN_S
        t = left if t is None else min(t, left)
    return STANDALONE_TIMEOUT_S if t is None else t


def take_outcomes() -> dict[str, int]:
    """This process's sandbox runs by `SandboxResult.outcome` since the last call (then reset)."""
    out = dict(OUTCOMES)
    OUTCOMES.clear()
    return out


def interpreter(cfg: SandboxConfig) -> str:
    if cfg.interpreter is not None:
        if not os.path.exists(cfg.interpreter):
            raise SandboxUnavailable(f"reward.sandbox.interpreter={cfg.interpreter!r} does not exist")
        return cfg.interpreter
    return next((p for p in _INTERPRETERS if os.path.exists(p)), os.path.realpath(sys.executable))


def run_sandboxed_code(source: str, stdin: str = "", cfg: SandboxConfig | None = None, **limits) -> SandboxResult:
    """Run `source` as a Python program reading `stdin`; see the module contract. `limits` override `cfg` fields."""
    cfg = cfg or _DEFAULT
    if limits:
        cfg = SandboxConfig(**{**cfg.model_dump(), **limits})
    timeout_s = effective_timeout(cfg)
    if timeout_s <= 0:  # the reward call's budget is spent: do not start what could not finish
        OUTCOMES["timeout"] += 1
        return SandboxResult(-SIGKILL, "", "", True, SIGKILL)
    bwrap = shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin")
    if bwrap is None:
        raise SandboxUnavailable(
            "bubblewrap (bwrap) is not installed; the code sandbox needs it for its file, process and network "
            "isolation: install it (Debian/Ubuntu: apt-get install bubblewrap; `make system-deps` does)"
        )
    with host_uid(cfg) as uid, BwrapRun(cfg, source, stdin, timeout_s) as run:
        raw = run.execute([bwrap, *bwrap_args(cfg, interpreter(cfg), run.fds, timeout_s)], uid)
    if raw.status is None:
        code, sig = -SIGKILL, SIGKILL
    elif os.WIFSIGNALED(raw.status):
        code, sig = -os.WTERMSIG(raw.status), os.WTERMSIG(raw.status)
    else:
        code, sig = os.waitstatus_to_exitcode(raw.status), None
    result = SandboxResult(code, raw.stdout, raw.stderr, raw.timed_out, sig, raw.leftover_processes)
    OUTCOMES[result.outcome] += 1
    return result


def code_output_reward(expected_stdout: str, program: str, stdin: str = "", cfg: SandboxConfig | None = None) -> float:
    """1.0 iff `program` exits 0 in time and prints `expected_stdout` (trailing whitespace ignored), else 0.0.
    Sandbox set-up failures raise `SandboxUnavailable`: they are not the program's fault."""
    result = run_sandboxed_code(program, stdin, cfg)
    return 1.0 if result.outcome == "ok" and result.stdout.rstrip() == expected_stdout.rstrip() else 0.0
