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

Code-execution rewards (`code_problem_reward`) run each program in `rollout.sandbox` (bubblewrap:
no host files, no network, its own pid namespace, rlimits). Every call carries its deadline into
the worker (`sandbox.call_budget`), so a sandbox never outlives the call that started it: the
scorer's timeout is strictly above the sandbox's by construction. Sandbox outcomes (ok,
exit_nonzero, signal, timeout) are counted per batch in `ScoreBatchResult.sandbox`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import multiprocessing as mp
import pickle
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rollout import sandbox
from rollout.reward_model_scorer import RewardModelConfig
from rollout.sandbox import SandboxConfig, SandboxResult, code_output_reward, run_sandboxed_code  # noqa: F401
from rollout.tasks import Problem

ScoreFn = Callable[[Problem, str], float]
WORKER_START_TIMEOUT_S = 60.0


class RewardConfig(BaseModel):
    """How rollout scores completions. `function` is "module:callable" taking (problem, completion) -> float;
    None = the task's own verifier. `isolation: inline` suits trusted cheap verifiers (exact match);
    anything that can hang or crash belongs in `process`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["verifier", "model"] = Field(
        "verifier",
        description="verifier: the score function below is the reward; model: a learned reward model "
        "(reward.model) scores completions, mixed with the verifier by weights, the verifier logged as gold",
    )
    model: RewardModelConfig | None = Field(
        None, description="kind=model: the reward-model checkpoint, where it runs and the mix weights"
    )
    function: str | None = Field(
        None,
        description="'package.module:callable' taking (problem, completion) -> float, used for rewards and "
        "evaluation instead of the task's verifier; null = the task's verifier",
    )
    timeout_s: float = Field(
        5.0,
        gt=0.0,
        description="wall-clock limit of one reward call; a sandboxed program in it gets at most this minus "
        "1 s (sandbox.TEARDOWN_MARGIN_S), so its teardown always runs first. Raise it for slow verifiers.",
    )
    on_failure: Literal["zero", "drop"] = Field(
        "zero",
        description="a reward call that raises, times out or returns a non-finite value: `zero` scores it "
        "failure_reward, `drop` drops the completion's group; both are counted in the metrics",
    )
    isolation: Literal["inline", "process"] = Field(
        "process",
        description="`process` runs reward calls in spawned processes killed at their deadline (anything that can "
        "hang or crash); `inline` calls them in the worker (trusted, cheap verifiers such as exact match)",
    )
    max_workers: int = Field(1, ge=1, description="isolation=process: reward processes per rollout worker")
    failure_reward: float = Field(0.0, description="on_failure=zero: the reward a failed call scores")
    sandbox: SandboxConfig = Field(
        default_factory=SandboxConfig,
        description="limits of code-execution rewards (rollout/sandbox.py); only used by verifiers that run code",
    )

    @model_validator(mode="after")
    def _model_given(self) -> RewardConfig:
        if (self.kind == "model") != (self.model is not None):
            raise ValueError(
                f"reward.kind={self.kind!r} with reward.model {'unset' if self.model is None else 'set'}: "
                "kind=model needs reward.model.path (a services.train_rm output); kind=verifier takes no model"
            )
        return self

    @model_validator(mode="after")
    def _sandbox_fits_in_a_call(self) -> RewardConfig:
        t = self.sandbox.timeout_s
        if t is not None and t + sandbox.TEARDOWN_MARGIN_S > self.timeout_s:
            raise ValueError(
                f"reward.sandbox.timeout_s={t} leaves no time for its teardown within reward.timeout_s="
                f"{self.timeout_s}: keep sandbox.timeout_s <= timeout_s - {sandbox.TEARDOWN_MARGIN_S:g} "
                "(or leave it unset: it then uses what the call has left)"
            )
        return self


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
    sandbox: dict[str, int] = dataclasses.field(default_factory=dict)  # sandboxed program runs by outcome


def _call(fn: ScoreFn, problem: Problem, completion: str, deadline: float) -> tuple[str, float | str]:
    """One reward call under its deadline; any failure of untrusted code is a counted outcome, not raised."""
    try:
        with sandbox.call_budget(deadline):
            return "ok", float(fn(problem, completion))
    except Exception as e:  # noqa: BLE001
        return "error", f"{type(e).__name__}: {e}"


def _worker_main(fn: ScoreFn, conn: Connection, sandbox_cfg: SandboxConfig) -> None:
    sandbox.configure(sandbox_cfg)
    conn.send(("ready", -1, None, {}))
    while (msg := conn.recv()) is not None:
        index, problem, completion, deadline = msg
        kind, value = _call(fn, problem, completion, deadline)
        conn.send((kind, index, value, sandbox.take_outcomes()))


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
        self._sandbox_outcomes: collections.Counter[str] = collections.Counter()
        if cfg.isolation == "inline":
            sandbox.configure(cfg.sandbox)
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
        if self.cfg.isolation == "inline":
            self._sandbox_outcomes.update(sandbox.take_outcomes())
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
            kind, value = _call(self.fn, problem, completion, time.monotonic() + self.cfg.timeout_s)
            outcomes.append((kind, value if kind == "ok" else None))
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
            process = self._ctx.Process(target=_worker_main, args=(self.fn, child, self.cfg.sandbox), daemon=True)
            process.start()
            child.close()
            self._workers.append(_Worker(process, parent, deadline=time.monotonic() + WORKER_START_TIMEOUT_S))

    def _dispatch(self, items: Sequence[tuple[Problem, str]], pending: list[int]) -> None:
        for w in self._workers:
            if w.ready and w.index is None and pending:
                w.index = pending.pop()
                w.deadline = time.monotonic() + self.cfg.timeout_s
                try:
                    w.conn.send((w.index, *items[w.index], w.deadline))
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
            kind, index, value, sandbox_outcomes = w.conn.recv()
        except (EOFError, OSError):  # died mid-send
            self._replace(w, outcomes, "error")
            return
        self._sandbox_outcomes.update(sandbox_outcomes)
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
        runs, self._sandbox_outcomes = dict(self._sandbox_outcomes), collections.Counter()
        return ScoreBatchResult(
            rewards,
            ok=counts["ok"],
            timeouts=counts["timeout"],
            errors=counts["error"],
            non_finite=counts["non_finite"],
            sandbox=runs,
        )


# --- code-execution rewards ------------------------------------------------------------------------


def code_problem_reward(problem: Problem, completion: str) -> float:
    """`RewardScorer`-ready verifier: `completion` is a Python program, `problem.answer` its expected stdout.
    It runs in the sandbox with the run's `reward.sandbox` limits, within this call's deadline."""
    return code_output_reward(problem.answer, completion)
