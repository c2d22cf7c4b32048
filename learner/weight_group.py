"""The weight-sync group's plumbing: building the stateless gloo/NCCL group, waiting for a collective,
tearing a group down, and the store protocol that starts an update only when every receiver is ready.

Contract:
- `make_group` builds a `ProcessGroupGloo`/`ProcessGroupNCCL` on a store, outside torch.distributed's
  default group. NCCL groups get TORCH_NCCL_ASYNC_ERROR_HANDLING=2 (CleanUpOnly: a watchdog timeout
  aborts the communicator and fails the work instead of killing the process) and a watchdog timeout
  30 s past `timeout_s`, since the host enforces `timeout_s` first (`await_completion`).
- `await_completion(work, ...)` returns once the work completed on its device; NCCL's `Work.wait()`
  only orders the current CUDA stream, so the host polls `is_completed()`; past `timeout_s` it calls
  `on_timeout` (which aborts the communicator) and raises `WeightSyncTimeout`.
- `destroy_group`: `shutdown` when members leave together, `abort` when a peer may be gone.
- `Readiness` (store keys `ready/<seq>/<rank>`, `alive/<rank>`): a receiver marks update `seq` ready
  when it calls `receive` and waits until all receivers have; the sender waits for all of them, failing
  only if one's heartbeat (bumped every second by a thread while the receiver lives) stops for
  `timeout_s`, or past `ready_timeout_s` if set, or when the group is abandoned.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import DistError

from learner.weight_packing import WeightSyncError, WeightSyncTimeout

HEARTBEAT_S = 1.0


def wrap_error(err: BaseException, what: str) -> WeightSyncError:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    cls = WeightSyncTimeout if "timeout" in text.lower() or "timed out" in text.lower() else WeightSyncError
    return cls(f"{what}: {text}")


def group_device(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def make_group(backend: str, timeout_s: float, store: dist.Store, rank: int, world_size: int):
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timedelta(seconds=timeout_s))
    try:
        from torch.distributed import ProcessGroupNCCL
    except ImportError as err:
        raise WeightSyncError(
            "WeightSyncConfig.backend='nccl' needs a CUDA build of torch with NCCL; "
            "this torch has none. Use backend='gloo' on CPU."
        ) from err
    opts = ProcessGroupNCCL.Options()
    opts._timeout = timedelta(seconds=timeout_s + 30)
    previous = os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")
    os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "2"  # read when the group is constructed
    try:
        return ProcessGroupNCCL(store, rank, world_size, opts)
    finally:
        if previous is None:
            os.environ.pop("TORCH_NCCL_ASYNC_ERROR_HANDLING")
        else:
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = previous


def await_completion(work, timeout_s: float, on_timeout: Callable[[], None], what: str) -> None:
    """Block the host until `work` has completed on its device, or call `on_timeout` and raise."""
    deadline, pause = time.monotonic() + timeout_s, 1e-5
    while not work.is_completed():
        if time.monotonic() > deadline:
            on_timeout()
            raise WeightSyncTimeout(f"{what}: not complete within timeout_s={timeout_s}; the communicator was aborted")
        time.sleep(pause)
        pause = min(pause * 2, 0.002)


def destroy_group(group, clean: bool) -> None:
    """Release a group's communicators: `shutdown` when every member leaves together, else `abort`
    (never waits for peers). Gloo holds only sockets, closed when the object goes."""
    method = getattr(group, "shutdown" if clean else "abort", None)
    if method is not None:
        try:
            method()
        except RuntimeError:  # already torn down by the watchdog or a peer's failure
            pass


def _poll(done: Callable[[], bool], between: Callable[[], None] = lambda: None) -> None:
    pause = 0.001
    while not done():
        between()
        time.sleep(pause)
        pause = min(pause * 2, 0.05)  # quick while the others are about to arrive, cheap while they are busy


class Readiness:
    """The ready/heartbeat protocol of one group's store (module docstring)."""

    def __init__(self, store, rank: int, world_size: int, timeout_s: float, ready_timeout_s: float | None):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.timeout_s, self.ready_timeout_s = timeout_s, ready_timeout_s
        self.abandoned = threading.Event()

    def _keys(self, seq: int) -> list[str]:
        return [f"ready/{seq}/{r}" for r in range(1, self.world_size)]

    def wait_all(self, seq: int) -> float:
        """Sender: wait until every receiver marked `seq` ready; returns the seconds waited."""
        start, store = time.monotonic(), self.store  # `abandon` may drop self.store meanwhile
        waiting = set(range(1, self.world_size))
        seen = {r: (-1, start) for r in waiting}  # rank -> (heartbeat count, when it last changed)

        def done() -> bool:
            waiting.difference_update(r for r in list(waiting) if store.check([f"ready/{seq}/{r}"]))
            return not waiting

        def check() -> None:
            now = time.monotonic()
            for r in waiting:
                beat = store.add(f"alive/{r}", 0)
                seen[r] = seen[r] if beat == seen[r][0] else (beat, now)
            self._check(seq, waiting, seen, now, now - start)

        _poll(done, check)
        if self.abandoned.is_set():  # abandoned after the last receiver arrived: the send cannot start
            raise WeightSyncError(f"rank 0: weight-sync group abandoned before update {seq} could start")
        self.forget(seq - 1, store)
        return time.monotonic() - start

    def _check(self, seq: int, waiting: set[int], seen: dict, now: float, waited_s: float) -> None:
        if self.abandoned.is_set():
            raise WeightSyncError(f"rank 0: weight-sync group abandoned while waiting for receivers {sorted(waiting)}")
        silent = sorted(r for r in waiting if now - seen[r][1] > self.timeout_s)
        if silent:
            why = f"receivers {silent} stopped heartbeating for timeout_s={self.timeout_s} (dead?)"
        elif self.ready_timeout_s is not None and waited_s > self.ready_timeout_s:
            why = f"receivers {sorted(waiting)} were busy longer than ready_timeout_s={self.ready_timeout_s}"
        else:
            return
        raise WeightSyncTimeout(f"rank 0: update {seq}: {why}; re-create it without them")

    def mark(self, seq: int) -> None:
        """Receiver: this rank is between calls; wait until every receiver is (ends if the store goes)."""
        keys, store = self._keys(seq), self.store
        store.set(keys[self.rank - 1], "1")
        _poll(lambda: store.check(keys))

    def forget(self, seq: int, store) -> None:
        """Drop update `seq`'s keys from `store` (every receiver is past it), so the store does not grow per
        update. The caller passes the store it captured: `abandon` may have dropped `self.store` meanwhile."""
        if seq >= 1:
            for key in [f"sync/{seq}", *self._keys(seq)]:
                store.delete_key(key)

    def heartbeat(self, stopped: Callable[[], bool]) -> None:
        """Receiver thread: bump `alive/<rank>` until `stopped()` or the store goes."""
        interval, store = min(HEARTBEAT_S, self.timeout_s / 4), self.store
        while not (stopped() or self.abandoned.is_set()):
            try:
                store.add(f"alive/{self.rank}", 1)
            except DistError:
                return
            self.abandoned.wait(interval)
