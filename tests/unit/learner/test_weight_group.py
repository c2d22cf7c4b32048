"""`learner.weight_group`: NCCL-style completion (the host polls, a timeout aborts and raises), teardown,
and the ready/heartbeat protocol on a real in-memory store. CUDA/NCCL itself: tests/gpu/."""

from __future__ import annotations

import threading
import time

import pytest
import torch.distributed as dist

from learner.weight_group import Readiness, await_completion, destroy_group, make_group
from learner.weight_packing import WeightSyncError, WeightSyncTimeout


class FakeWork:
    """Completes after `delay_s` (like an NCCL kernel the host does not wait for), or never."""

    def __init__(self, delay_s: float | None):
        self.done_at = None if delay_s is None else time.monotonic() + delay_s

    def is_completed(self) -> bool:
        return self.done_at is not None and time.monotonic() >= self.done_at


def test_await_completion_returns_only_once_the_work_completed():
    work = FakeWork(0.2)
    start = time.monotonic()
    await_completion(work, timeout_s=5, on_timeout=lambda: pytest.fail("no timeout expected"), what="send")
    assert time.monotonic() - start >= 0.19 and work.is_completed()


def test_await_completion_aborts_then_raises_at_the_timeout():
    aborted = []
    start = time.monotonic()
    with pytest.raises(WeightSyncTimeout, match="not complete within timeout_s=0.3"):
        await_completion(FakeWork(None), timeout_s=0.3, on_timeout=lambda: aborted.append(True), what="send")
    assert aborted == [True] and 0.29 <= time.monotonic() - start < 1.5


class FakeGroup:
    def __init__(self):
        self.calls = []

    def abort(self):
        self.calls.append("abort")

    def shutdown(self):
        self.calls.append("shutdown")


def test_destroy_group_shuts_down_when_leaving_together_and_aborts_otherwise():
    g = FakeGroup()
    destroy_group(g, clean=True)
    destroy_group(g, clean=False)
    assert g.calls == ["shutdown", "abort"]

    class Broken(FakeGroup):
        def abort(self):
            raise RuntimeError("already aborted by the watchdog")

    destroy_group(Broken(), clean=False)  # no raise
    destroy_group(object(), clean=False)  # a backend without the method: nothing to release


def test_nccl_without_cuda_torch_is_a_clear_error():
    with pytest.raises(WeightSyncError, match="backend='gloo' on CPU"):
        make_group("nccl", 1.0, dist.HashStore(), 0, 2)


def test_readiness_waits_for_every_receiver_then_forgets_the_previous_update():
    store = dist.HashStore()
    sender = Readiness(store, 0, 3, timeout_s=5, ready_timeout_s=None)
    receivers = [Readiness(store, r, 3, timeout_s=5, ready_timeout_s=None) for r in (1, 2)]
    store.set("sync/1", "0")
    waited = []
    threads = [threading.Thread(target=lambda: waited.append(sender.wait_all(1)))]
    threads += [threading.Thread(target=r.mark, args=(1,)) for r in receivers]
    threads[0].start()
    threads[1].start()
    time.sleep(0.3)
    threads[2].start()  # the second receiver comes 0.3 s later (it was still generating)
    for t in threads:
        t.join(5)
    assert waited[0] >= 0.25 and not any(t.is_alive() for t in threads)
    store.set("sync/2", "1")
    for r in receivers:
        threading.Thread(target=r.mark, args=(2,)).start()
    sender.wait_all(2)
    assert not store.check(["sync/1"]) and not store.check(["ready/1/1"])  # update 1's keys are gone


def test_readiness_bounds_a_busy_but_alive_receiver_only_by_ready_timeout_s():
    store = dist.HashStore()
    receiver = Readiness(store, 1, 2, timeout_s=0.4, ready_timeout_s=None)
    stop = threading.Event()
    threading.Thread(target=receiver.heartbeat, args=(stop.is_set,), daemon=True).start()
    threading.Timer(1.5, receiver.mark, args=(1,)).start()  # alive, busy for ~4x timeout_s
    assert Readiness(store, 0, 2, timeout_s=0.4, ready_timeout_s=None).wait_all(1) >= 1.4
    with pytest.raises(WeightSyncTimeout, match="ready_timeout_s"):
        Readiness(store, 0, 2, timeout_s=0.4, ready_timeout_s=0.5).wait_all(2)
    stop.set()


def test_readiness_fails_when_a_receiver_stops_heartbeating():
    store = dist.HashStore()
    with pytest.raises(WeightSyncTimeout, match=r"receivers \[1\] stopped heartbeating"):
        Readiness(store, 0, 2, timeout_s=0.3, ready_timeout_s=None).wait_all(1)


def test_readiness_gives_up_at_once_when_abandoned():
    store = dist.HashStore()
    sender = Readiness(store, 0, 2, timeout_s=30, ready_timeout_s=None)
    threading.Timer(0.2, sender.abandoned.set).start()
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match="abandoned"):
        sender.wait_all(1)
    assert time.monotonic() - start < 2


def test_readiness_abandoned_after_the_receivers_arrived_fails_cleanly():
    """CI stop 22: `abandon` (another thread) dropped `store` between the last receiver's mark and the
    sender's clean-up of the previous update; the send must fail as a WeightSyncError (the owner
    regroups), never an AttributeError that kills the job."""
    store = dist.HashStore()
    sender = Readiness(store, 0, 2, timeout_s=30, ready_timeout_s=None)
    store.set("ready/2/1", "1")  # the receiver is already there

    class AbandonOnCheck(dist.HashStore):
        def check(self, keys):
            sender.abandoned.set()
            sender.store = None  # what BroadcastTransport.abandon does
            return store.check(keys)

    sender.store = AbandonOnCheck()
    with pytest.raises(WeightSyncError, match="abandoned before update 2"):
        sender.wait_all(2)
