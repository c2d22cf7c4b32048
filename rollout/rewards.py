"""Reward scoring as an untrusted code path: every call is bounded in time and its failures are counted.

Contract of `RewardScorer.score_batch(items)`:
- returns one entry per item, in order: a finite float, or `None` when the call failed and
  `on_failure="drop"` (with `"zero"` a failure scores `failure_reward`). Failures are: a timeout
  (`timeout_s` per call), an exception, a worker process that died (os._exit, segfault), and a
  non-finite reward (NaN/inf). Counters `ok + timeouts + errors + non_finite == len(items)`.
- `isolation="process"`: calls run in `max_workers` spawned processes. A call past its deadline is
  abandoned and its worker is killed and replaced, so a hung function never holds the pool; the batch
  takes at most about `timeout_s * ceil(len(items) / max_workers)` plus worker restarts.
- `isolation="inline"`: calls run in the caller's process (trusted, cheap verifiers such as exact
  match); exceptions and non-finite rewards are still counted, but `timeout_s` cannot be enforced.

`run_sandboxed_code` runs a model-written Python program in a confined child (see sandbox_launcher.py):
own network namespace (no interfaces up), rlimits on memory/CPU/file size/processes, `nobody` when
started as root, a fresh temp dir as cwd (removed afterwards), output truncated, wall timeout kills
the process group. Escape hatch left open: a program that calls setsid() and forks escapes the group
kill; its CPU rlimit still ends it after `cpu_s` of CPU time.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rollout.tasks import Problem

ScoreFn = Callable[[Problem, str], float]
WORKER_START_TIMEOUT_S = 60.0


class RewardConfig(BaseModel):
    """How rollout scores completions. `function` is "module:callable" taking (problem, completion) -> float;
    None = the task's own verifier. `isolation: inline` suits trusted cheap verifiers (exact match);
    anything that can hang or crash belongs in `process`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    function: str | None = None
    timeout_s: float = Field(5.0, gt=0.0)
    on_failure: Literal["zero", "drop"] = "zero"
    isolation: Literal["inline", "process"] = "process"
    max_workers: int = Field(1, ge=1)
    failure_reward: float = 0.0


def load_reward_function(spec: str) -> ScoreFn:
    """Import "package.module:callable"; the error names `reward.function` and the expected form."""
    import importlib

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward.function={spec!r} must look like 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(
            f"reward.function={spec!r} cannot be imported ({e}); it must be importable on every rollout node"
        ) from None
    if not callable(fn):
        raise ValueError(f"reward.function={spec!r} is not callable")
    return fn


@dataclasses.dataclass(frozen=True)
class ScoreBatchResult:
    rewards: list[float | None]
    ok: int = 0
    timeouts: int = 0
    errors: int = 0
    non_finite: int = 0


def _worker_main(fn: ScoreFn, conn: Connection) -> None:
    conn.send(("ready", -1, None))
    while (msg := conn.recv()) is not None:
        index, problem, completion = msg
        try:
            conn.send(("ok", index, float(fn(problem, completion))))
        except Exception as e:  # noqa: BLE001 - any failure of untrusted code is counted, not raised
            conn.send(("error", index, f"{type(e).__name__}: {e}"))


@dataclasses.dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: Connection
    ready: bool = False
    index: int | None = None  # item being scored
    deadline: float = math.inf

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


class RewardScorer:
    """Scores (problem, completion) pairs with a picklable module-level `score` function."""

    def __init__(self, fn: ScoreFn, cfg: RewardConfig):
        self.fn, self.cfg = fn, cfg
        # forkserver: workers fork from a single-threaded server (fork from a threaded Ray actor or vLLM
        # process can deadlock) and a replacement starts in milliseconds instead of a fresh interpreter.
        self._ctx = mp.get_context("forkserver")
        self._workers: list[_Worker] = []
        if cfg.isolation == "process":
            try:
                pickle.dumps(fn)
            except Exception as e:
                raise ValueError(
                    f"reward function {fn!r} is not picklable ({e}); with reward.isolation='process' "
                    "pass a module-level function, or use isolation='inline'"
                ) from e

    def score_batch(self, items: Sequence[tuple[Problem, str]]) -> ScoreBatchResult:
        """Score every item; never raises for a failing reward function (see module contract)."""
        outcomes = self._inline(items) if self.cfg.isolation == "inline" else self._pooled(items)
        return self._summarise(outcomes)

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
            w.process.join(timeout=1.0)
            w.kill()
        self._workers = []

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _inline(self, items: Sequence[tuple[Problem, str]]) -> list[tuple[str, float | None]]:
        outcomes = []
        for problem, completion in items:
            try:
                outcomes.append(("ok", float(self.fn(problem, completion))))
            except Exception:  # noqa: BLE001
                outcomes.append(("error", None))
        return outcomes

    def _pooled(self, items: Sequence[tuple[Problem, str]]) -> list[tuple[str, float | None]]:
        if not items:
            return []
        outcomes: list[tuple[str, float | None] | None] = [None] * len(items)
        pending = list(range(len(items)))[::-1]
        self._fill_pool()
        while pending or any(w.index is not None for w in self._workers):
            self._dispatch(items, pending)
            self._collect(outcomes)
        return outcomes  # type: ignore[return-value]

    def _fill_pool(self) -> None:
        while len(self._workers) < self.cfg.max_workers:
            parent, child = self._ctx.Pipe()
            process = self._ctx.Process(target=_worker_main, args=(self.fn, child), daemon=True)
            process.start()
            child.close()
            self._workers.append(_Worker(process, parent, deadline=time.monotonic() + WORKER_START_TIMEOUT_S))

    def _dispatch(self, items: Sequence[tuple[Problem, str]], pending: list[int]) -> None:
        for w in self._workers:
            if w.ready and w.index is None and pending:
                w.index = pending.pop()
                w.deadline = time.monotonic() + self.cfg.timeout_s
                try:
                    w.conn.send((w.index, *items[w.index]))
                except OSError:  # died while idle: `_collect` sees the death and counts the item
                    pass

    def _collect(self, outcomes: list) -> None:
        """Wait for one event (a reply, a death or the earliest deadline) and record what happened."""
        earliest = min(w.deadline for w in self._workers)
        timeout = None if earliest == math.inf else max(0.0, earliest - time.monotonic())
        wait([w.conn for w in self._workers] + [w.process.sentinel for w in self._workers], timeout=timeout)
        for w in list(self._workers):
            if w.conn.poll():
                self._receive(w, outcomes)
            elif not w.process.is_alive():
                self._replace(w, outcomes, "error")
            elif time.monotonic() >= w.deadline:
                self._replace(w, outcomes, "timeout")

    def _receive(self, w: _Worker, outcomes: list) -> None:
        try:
            kind, index, value = w.conn.recv()
        except (EOFError, OSError):  # died mid-send
            self._replace(w, outcomes, "error")
            return
        if kind == "ready":
            w.ready, w.deadline = True, math.inf
            return
        outcomes[index] = (kind, value)
        w.index, w.deadline = None, math.inf

    def _replace(self, w: _Worker, outcomes: list, kind: str) -> None:
        if not w.ready:
            w.kill()
            self._workers.remove(w)
            raise RuntimeError(
                f"reward worker for {self.fn!r} did not start (exit code {w.process.exitcode}); "
                "is the function importable in a fresh interpreter (module-level, no __main__)?"
            )
        if w.index is not None:
            outcomes[w.index] = (kind, None)
        w.kill()
        self._workers.remove(w)
        self._fill_pool()

    def _summarise(self, outcomes: list[tuple[str, float | None]]) -> ScoreBatchResult:
        counts = {"ok": 0, "timeout": 0, "error": 0, "non_finite": 0}
        rewards: list[float | None] = []
        for kind, value in outcomes:
            if kind == "ok" and not math.isfinite(value):
                kind = "non_finite"
            counts[kind] += 1
            fallback = self.cfg.failure_reward if self.cfg.on_failure == "zero" else None
            rewards.append(value if kind == "ok" else fallback)
        return ScoreBatchResult(
            rewards,
            ok=counts["ok"],
            timeouts=counts["timeout"],
            errors=counts["error"],
            non_finite=counts["non_finite"],
        )


# --- code-execution rewards ------------------------------------------------------------------------

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
EXIT_SANDBOX_FAILED = 125


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    killed_by_signal: int | None  # signal number, e.g. 9 after a wall or CPU timeout


def _others_can_execute(path: str) -> bool:
    real = Path(os.path.realpath(path))
    dirs_ok = all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)
    return dirs_ok and real.stat().st_mode & (stat.S_IXOTH | stat.S_IROTH) == (stat.S_IXOTH | stat.S_IROTH)


def sandbox_interpreter() -> str:
    """A Python the sandbox user can run: ours unless we are root and it is private (e.g. under /root)."""
    if os.geteuid() != 0 or _others_can_execute(sys.executable):
        return sys.executable
    for candidate in ("/usr/local/bin/python3", "/usr/bin/python3"):
        if os.path.exists(candidate) and _others_can_execute(candidate):
            return candidate
    raise RuntimeError(
        f"no Python interpreter executable by 'nobody' ({sys.executable} is private); "
        "install python3 under /usr/bin or /usr/local/bin"
    )


def _workdir(base: Path, source: str) -> Path:
    work = base / "work"
    work.mkdir(mode=0o700)
    (work / "main.py").write_text(source)
    if os.geteuid() == 0:  # the program runs as nobody and needs its own cwd
        os.chmod(base, 0o711)
        for p in (work, work / "main.py"):
            os.chown(p, 65534, 65534)
    return work


def run_sandboxed_code(
    source: str,
    stdin: str = "",
    *,
    timeout_s: float,
    memory_mb: int = 256,
    cpu_s: int | None = None,
    file_size_mb: int = 16,
    max_processes: int = 64,
    max_output_bytes: int = 65_536,
    allow_network: bool = False,
) -> SandboxResult:
    """Run `source` as a Python program with `stdin`; see module docstring. `cpu_s` defaults to ceil(timeout_s)."""
    cpu = cpu_s if cpu_s is not None else max(1, math.ceil(timeout_s))
    base = Path(tempfile.mkdtemp(prefix="flywheel-sandbox-"))
    try:
        work = _workdir(base, source)
        (base / "stdin").write_text(stdin)
        args = [
            str(memory_mb),
            str(cpu),
            str(file_size_mb),
            str(max_processes),
            "1" if allow_network else "0",
            sandbox_interpreter(),
            str(work / "main.py"),
        ]
        with (
            open(base / "stdin", "rb") as fin,
            open(base / "stdout", "wb+") as fout,
            open(base / "stderr", "wb+") as ferr,
        ):
            # Output goes to files, not pipes: RLIMIT_FSIZE bounds them and no reader thread can hang.
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(LAUNCHER), *args],
                stdin=fin,
                stdout=fout,
                stderr=ferr,
                cwd=work,
                start_new_session=True,
                env={"PATH": "/usr/bin:/bin"},
            )
            timed_out = _wait_or_kill(proc, timeout_s)
            out, err = (_head(f, max_output_bytes) for f in (fout, ferr))
        if proc.returncode == EXIT_SANDBOX_FAILED and err.startswith("sandbox:"):
            raise RuntimeError(err.strip())
        signum = -proc.returncode if proc.returncode < 0 else None
        return SandboxResult(proc.returncode, out, err, timed_out, signum)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _wait_or_kill(proc: subprocess.Popen, timeout_s: float) -> bool:
    try:
        proc.wait(timeout=timeout_s)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def _head(f, limit: int) -> str:
    f.seek(0)
    return f.read(limit).decode("utf-8", errors="replace")


def code_output_reward(problem_expected_stdout: str, program: str, stdin: str = "", timeout_s: float = 5.0) -> float:
    """1.0 iff `program` exits 0 within `timeout_s` and its stdout equals the expected text (trailing
    whitespace ignored), else 0.0. Sandbox set-up failures raise; they are not the program's fault."""
    result = run_sandboxed_code(program, stdin, timeout_s=timeout_s)
    ok = result.returncode == 0 and not result.timed_out
    return 1.0 if ok and result.stdout.rstrip() == problem_expected_stdout.rstrip() else 0.0


def code_problem_reward(problem: Problem, completion: str) -> float:
    """`RewardScorer`-ready verifier: `completion` is the program, `problem.answer` its expected stdout.
    Keep the scorer's `timeout_s` above 5 s so the sandbox's own kill and clean-up always run first."""
    return code_output_reward(problem.answer, completion)
