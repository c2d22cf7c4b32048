"""Weight transport: learner rank 0 sends full named tensors to every rollout worker, versioned.

Contract:
- `BroadcastTransport.create(cfg, master_addr, master_port, rank, world_size)` builds a *stateless*
  process group (its own `TCPStore` on `master_port`, `ProcessGroupGloo`/`ProcessGroupNCCL` built
  directly): it never reads or changes torch.distributed's default group, so it coexists with
  DeepSpeed's learner group and with a vLLM engine's own world-size-1 group. Rank 0 sends; every
  other rank receives. All members call `create` concurrently; it raises `WeightSyncTimeout` if
  the group is not complete within `cfg.timeout_s` (no group is formed: re-create with the members
  that did arrive, on a fresh port). The rendezvous requires the run's secret (learner/weight_auth.py).
- One send on rank 0 matches one `receive()` on every receiver. The sender announces
  `policy_version` in the store (receivers may idle there for any time). Each receiver marks itself
  ready when it calls `receive` (a rollout worker: between rollout calls), and the collectives start
  only once every receiver is ready, so a long generation delays an update instead of timing it out.
  While waiting, receivers prove they are alive with a heartbeat in the store; one silent for
  `timeout_s` (dead) fails the update. Then buckets stream, each preceded by a 3-int64 control
  broadcast `(kind, header_nbytes, payload_nbytes)` (`learner.weight_packing`): BUCKET is one
  broadcast of a packed bucket; DIRECT (a lone tensor >= `bucket_bytes` needing no cast) is a header
  broadcast then the tensor's own bytes; END closes the update, ABORT cancels it.
- Three ways to send: `send(named_tensors, v)` and `send_buckets(buckets, v)` stream from live tensors
  (each bucket is read before the next is requested, so a source may release bucket i, e.g. a ZeRO-3
  gather, when asked for bucket i+1; packing bucket i+1 overlaps bucket i on the wire); `pack(buckets)`
  then `send_packed(update, v)` snapshot first (on the transport's device, in the wire dtype), so the
  learner may train on while the snapshot goes out from another thread.
- Receivers get tensors in the wire dtype, bucket by bucket, as views into a pooled receive buffer:
  consume each before pulling the next (the engine copies them into its weights).
- Completion: a send returns once every byte left (gloo: `Work.wait` blocks the host; NCCL: the
  host polls the work's completion, since `Work.wait` only orders the CUDA stream). A collective not
  done within `timeout_s` aborts the communicator and raises `WeightSyncTimeout` (NCCL groups are
  built with TORCH_NCCL_ASYNC_ERROR_HANDLING=2, so the watchdog cleans up instead of killing the
  learner). After any failure the transport is broken and every call raises at once; gloo/NCCL groups
  cannot drop a member, so the owner re-creates it (new port) with the survivors (`WeightGroup`),
  `abandon`ing the old one (its communicator aborted, no close announcement: receivers are re-forming).
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Literal, Protocol

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch.distributed import DistError

from learner.weight_auth import handshake, run_secret, store_prefix
from learner.weight_group import (
    Readiness,
    await_completion,
    destroy_group,
    group_device,
    make_group,
    wrap_error,
)
from learner.weight_packing import (
    KIND_ABORT,
    KIND_BUCKET,
    KIND_DIRECT,
    KIND_END,
    BufferPool,
    PackedBucket,
    PackedUpdate,
    TransportClosed,
    WeightSyncError,
    WeightSyncTimeout,
    decode_header,
    direct_parts,
    group_into_buckets,
    pack_bucket,
    snapshot_update,
    unpack_bucket,
    unpack_payload,
)

# re-exported: callers catch the errors and build snapshots through this module
__all__ = ["PackedUpdate", "TransportClosed", "WeightSyncError", "WeightSyncTimeout", "snapshot_update"]
_CLOSE = "close"
_HEARTBEAT_S = 1.0


class WeightSyncConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    backend: Literal["gloo", "nccl"] = Field("gloo", description="must match learner.device: gloo on CPU, nccl on GPU")
    bucket_bytes: int = Field(
        32 * 2**20, ge=1024, description="wire bytes per broadcast; larger buckets mean fewer calls, more memory"
    )
    wire_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="cast floating weights to this dtype on the wire (receivers keep it: the engine casts on "
        "load); bfloat16 halves the bytes of an fp32 learner. None = each tensor's own dtype",
    )
    timeout_s: float = Field(
        60, gt=0, description="limit for joining a group, for each collective, and for a silent (dead) receiver"
    )
    sync_every_steps: int = Field(1, ge=1, description="learner steps between broadcasts")
    # drain: a worker takes an update between rollout calls (every trace has one policy_version);
    # pause: a vLLM worker takes it between engine steps of a running generation (a trace records
    # policy_version = first, policy_version_max = last). Needs rollout.engine=vllm.
    inflight: Literal["drain", "pause"] = Field(
        "drain", description="drain: updates between rollout calls; pause (vLLM): between engine steps"
    )
    master_port: int | None = Field(None, ge=1, le=65535, description="rendezvous port; None = pick a free one")
    snapshot: Literal["auto", "device", "none"] = Field(
        "auto",
        description=(
            "device: learner rank 0 copies the weights into wire-dtype buckets on its device (one extra model in "
            "wire bytes) and sends them while training continues; none: buckets stream straight from the "
            "parameters (ZeRO-3: gathered bucket by bucket) and training waits for the send; auto: none "
            "under ZeRO-3 (never the whole model on rank 0), device otherwise"
        ),
    )
    ready_timeout_s: float | None = Field(
        None,
        gt=0,
        description="longest a broadcast waits for live receivers to finish their current rollout call; "
        "None = as long as they heartbeat (a dead one fails the broadcast within timeout_s)",
    )


@dataclasses.dataclass(frozen=True)
class WeightGroup:
    """Where a (re-)formed weight-sync group meets: rank 0 (the sender) hosts the store on `master_port`."""

    cfg: WeightSyncConfig
    master_addr: str
    master_port: int
    world_size: int  # 1 sender + receivers; 1 = no receivers (nothing is sent)


@dataclasses.dataclass(frozen=True)
class SyncStats:
    policy_version: int
    bytes: int  # wire bytes of tensor payload (headers excluded)
    seconds: float  # from the announcement to the last byte out, including waiting for receivers
    buckets: int
    wait_ready_s: float = 0.0  # of which waiting for receivers to finish their rollout calls


class WeightTransport(Protocol):
    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], policy_version: int) -> SyncStats: ...
    def receive(self) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]: ...
    def close(self) -> None: ...


def _done() -> None:
    """A wait for nothing in flight."""


def free_port() -> int:
    """A TCP port free on this host right now (the OS picks it), for `WeightSyncConfig.master_port`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class BroadcastTransport:
    """`WeightTransport` over one stateless gloo/NCCL group: rank 0 broadcasts, ranks 1.. receive."""

    def __init__(self, cfg: WeightSyncConfig, store: dist.TCPStore, group, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self._store, self._group = store, group
        self._device = group_device(cfg.backend)
        pooled = 2 if self._device.type == "cpu" else 0  # CUDA's caching allocator already recycles
        self._buffers = BufferPool(cfg.bucket_bytes, self._device, max_buffers=pooled, keep_giants=rank == 0)
        self._seq = 0  # updates announced (sender) / taken (receiver)
        self._pending: Iterator | None = None  # receiver: the update being consumed
        self._failed: str | None = None
        self._closed = False
        self._ready = Readiness(store, rank, world_size, cfg.timeout_s, cfg.ready_timeout_s)
        self._snapshot: list[PackedBucket] | None = None  # sender: buffers reused by the next `pack`
        self.timeouts = 0  # collectives or receivers that timed out (each also raised)
        if rank > 0:
            threading.Thread(target=self._ready.heartbeat, args=(self._stopped,), daemon=True).start()

    def _stopped(self) -> bool:
        return self._closed or self._failed is not None

    @classmethod
    def create(
        cls,
        cfg: WeightSyncConfig,
        master_addr: str,
        master_port: int,
        rank: int,
        world_size: int,
        secret: bytes | None = None,
    ) -> BroadcastTransport:
        """Join the weight-sync group; all `world_size` members call this concurrently. Rank 0 sends.

        `secret`: the run's secret (default: $FLYWHEEL_RUN_SECRET, which the driver gives every actor).
        Every key lives under a prefix derived from it, and members prove they hold it
        (`learner.weight_auth.handshake`) before the group forms; a member without it fails with
        `WeightSyncError` and no group is formed."""
        if world_size < 2 or not 0 <= rank < world_size:
            raise ValueError(
                f"weight-sync group needs world_size >= 2 (1 sender + receivers) and "
                f"0 <= rank < world_size; got rank={rank}, world_size={world_size}"
            )
        key = run_secret(secret)
        where = f"weight-sync group {master_addr}:{master_port} (rank {rank} of {world_size})"
        timeout = timedelta(seconds=cfg.timeout_s)
        try:
            store = dist.TCPStore(
                master_addr, master_port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=True
            )
            scoped = dist.PrefixStore(store_prefix(key, master_addr, master_port, world_size), store)
            handshake(scoped, key, rank, world_size, where)
            group = make_group(
                cfg.backend, cfg.timeout_s, dist.PrefixStore("flywheel/weights", scoped), rank, world_size
            )
            group.broadcast(torch.zeros(1, device=group_device(cfg.backend)), 0).wait()  # NCCL connects lazily
        except WeightSyncError:
            raise
        except RuntimeError as err:
            raise wrap_error(
                err,
                f"{where}: not all members joined within timeout_s={cfg.timeout_s} "
                "(no group was formed; re-create it with the members that are alive, on a new "
                "port, or check master_addr/master_port)",
            ) from err
        return cls(cfg, scoped, group, rank, world_size)

    # ------------------------------------------------------------ sender
    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], policy_version: int) -> SyncStats:
        """Broadcast one update from live tensors. Blocks until every bucket went out."""
        return self.send_buckets(
            group_into_buckets(named_tensors, self.cfg.bucket_bytes, self.cfg.wire_dtype), policy_version
        )

    def send_buckets(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], policy_version: int) -> SyncStats:
        """Broadcast buckets as a source yields them; bucket i is read before bucket i+1 is requested."""
        return self._send_parts((self._parts(bucket) for bucket in buckets), policy_version)

    def pack(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> PackedUpdate:
        """Snapshot an update now, on this thread: every bucket packed on the device in the wire dtype.

        Reuses the previous snapshot's buffers, so call it only after the previous `send_packed` returned."""
        self._check_usable(sender=True)
        update = snapshot_update(buckets, self.cfg.wire_dtype, self._device, self._snapshot)
        self._snapshot = update.buckets
        return update

    def send_packed(self, update: PackedUpdate, policy_version: int) -> SyncStats:
        """Broadcast a `pack`ed snapshot (safe on another thread while the learner trains)."""
        parts = ((KIND_BUCKET, b.wire, b.wire[b.header_nbytes :]) for b in update.buckets)
        if update.ready is None:
            return self._send_parts(parts, policy_version)
        stream = torch.cuda.Stream(device=self._device)  # NCCL then orders after the copies, not after training
        stream.wait_event(update.ready)
        with torch.cuda.stream(stream):
            return self._send_parts(parts, policy_version)

    def _send_parts(self, parts: Iterator[tuple[int, torch.Tensor, torch.Tensor]], policy_version: int) -> SyncStats:
        self._check_usable(sender=True)
        if not isinstance(policy_version, int) or policy_version < 0:
            raise ValueError(f"policy_version must be an int >= 0, got {policy_version!r}")
        start, nbytes, buckets, in_flight = time.perf_counter(), 0, 0, _done
        self._seq += 1
        store = self._store  # `abandon` (another thread) may drop it from here on
        if store is None:
            raise WeightSyncError(f"rank 0: weight-sync group abandoned before update {self._seq} could start")
        store.set(f"sync/{self._seq}", str(policy_version))
        wait_ready_s = self._wait_receivers_ready()
        try:
            for kind, head, payload in parts:  # pulling part i+1 packs it while part i is on the wire
                in_flight()
                in_flight = self._start_bucket(kind, head, payload)
                if kind == KIND_DIRECT:  # sent in place: done before the source may reuse its storage
                    in_flight()
                    in_flight = _done
                nbytes, buckets = nbytes + payload.numel(), buckets + 1
        except WeightSyncError:
            raise
        except Exception:  # bad input mid-stream: tell receivers to abandon this update, keep the group
            in_flight()
            self._start_control(KIND_ABORT, 0, 0)()
            raise
        in_flight()
        self._start_control(KIND_END, 0, 0)()
        return SyncStats(policy_version, nbytes, time.perf_counter() - start, buckets, wait_ready_s)

    def _parts(self, bucket: list[tuple[str, torch.Tensor]]) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(kind, header-or-wire, payload): a giant tensor goes in place, anything else is packed."""
        direct = direct_parts(bucket, self.cfg.wire_dtype, self.cfg.bucket_bytes, self._device)
        if direct is not None:
            return (KIND_DIRECT, *direct)
        wire, header_nbytes = pack_bucket(bucket, self.cfg.wire_dtype, alloc=self._buffers.acquire)
        return KIND_BUCKET, wire, wire[header_nbytes:]

    def _start_bucket(self, kind: int, head: torch.Tensor, payload: torch.Tensor) -> Callable[[], None]:
        header_nbytes = head.numel() if kind == KIND_DIRECT else head.numel() - payload.numel()
        what = f"sending a bucket of update {self._seq}"
        waits = [self._start_control(kind, header_nbytes, payload.numel()), self._start(head, what)]
        if kind == KIND_DIRECT:
            waits.append(self._start(payload, what))
        return lambda: [wait() for wait in waits] and None

    def _start_control(self, kind: int, header_nbytes: int, payload_nbytes: int) -> Callable[[], None]:
        control = torch.tensor([kind, header_nbytes, payload_nbytes], dtype=torch.int64, device=self._device)
        return self._start(control, f"sending control of update {self._seq}")

    def _wait_receivers_ready(self) -> float:
        try:
            return self._ready.wait_all(self._seq)
        except WeightSyncError as err:
            self._failed = str(err)
            self.timeouts += isinstance(err, WeightSyncTimeout)
            raise
        except DistError as err:
            raise self._fail(err, "waiting for receivers to be ready") from err

    # ------------------------------------------------------------ receiver
    def receive(self, wait_s: float | None = None) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]:
        """Wait (up to `wait_s`, None = forever) for the next update; return its version and tensors.

        The iterator yields `(name, tensor)` in the wire dtype, bucket by bucket as they arrive (views into
        a reused buffer: copy each before pulling the next bucket); consume it fully before the next
        `receive` (an unfinished one is drained and discarded then). Raises `TransportClosed` when the
        sender closed, `WeightSyncError` if the sender aborted this update mid-stream.
        """
        self._check_usable(sender=False)
        if self._pending is not None:
            for _ in self._pending:
                pass
        announced = self._wait_announcement(f"sync/{self._seq + 1}", wait_s)
        self._seq += 1
        if announced == _CLOSE:
            self._store.add("sync/close_acks", 1)
            self._closed = True
            raise TransportClosed(f"the sender closed weight-sync group (rank {self.rank}); no more updates")
        try:
            self._ready.mark(self._seq)  # between calls now; the collectives start once every receiver is
        except DistError as err:
            self._failed = f"lost the sender's store ({err})"
            raise WeightSyncError(f"rank {self.rank}: the sender gave up on this update (store gone)") from err
        self._pending = self._receive_buckets(int(announced))
        return int(announced), self._pending

    def update_waiting(self) -> bool:
        """Receiver: is the next update announced (so `receive` would start at once)? Never blocks;
        False if the group is closed, broken or its store is gone."""
        if self.rank == 0 or self._closed or self._failed is not None or self._store is None:
            return False
        try:
            return self._store.check([f"sync/{self._seq + 1}"])
        except DistError:
            return False

    def _wait_announcement(self, key: str, wait_s: float | None) -> str:
        deadline = None if wait_s is None else time.monotonic() + wait_s
        pause = 0.001
        try:
            while not self._store.check([key]):
                if deadline is not None and time.monotonic() > deadline:
                    raise WeightSyncTimeout(f"rank {self.rank}: no weight update announced within {wait_s}s")
                time.sleep(pause)
                pause = min(pause * 2, 0.05)  # quick while an update is imminent, cheap while idle
            return self._store.get(key).decode()
        except DistError as err:
            self._failed = f"lost the sender's store ({err})"
            raise WeightSyncError(f"rank {self.rank}: the sender's store is gone; is learner rank 0 alive?") from err

    def _receive_buckets(self, policy_version: int) -> Iterator[tuple[str, torch.Tensor]]:
        control = torch.empty(3, dtype=torch.int64, device=self._device)
        while True:
            self._broadcast(control, f"receiving update policy_version={policy_version}")
            kind, header_nbytes, payload_nbytes = control.tolist()
            if kind == KIND_END:
                self._pending = None
                return
            if kind == KIND_ABORT:
                self._pending = None
                raise WeightSyncError(
                    f"the sender aborted update policy_version={policy_version} "
                    "mid-stream (bad input on the learner); tensors already yielded are partial"
                )
            yield from self._receive_bucket(kind, header_nbytes, payload_nbytes, policy_version)

    def _receive_bucket(
        self, kind: int, header_nbytes: int, payload_nbytes: int, policy_version: int
    ) -> list[tuple[str, torch.Tensor]]:
        what = f"receiving update policy_version={policy_version}"
        if kind == KIND_BUCKET:
            wire = self._buffers.acquire(header_nbytes + payload_nbytes)
            self._broadcast(wire, what)
            return unpack_bucket(wire, header_nbytes)
        header = torch.empty(header_nbytes, dtype=torch.uint8, device=self._device)
        self._broadcast(header, what)
        payload = self._buffers.acquire(payload_nbytes)
        self._broadcast(payload, what)
        return unpack_payload(payload, decode_header(header))

    # ------------------------------------------------------------ both
    def _broadcast(self, tensor: torch.Tensor, what: str) -> None:
        self._start(tensor, what)()

    def _start(self, tensor: torch.Tensor, what: str) -> Callable[[], None]:
        """Launch a broadcast from rank 0; the returned call waits until it completed (and keeps `tensor` alive)."""
        try:
            work = self._group.broadcast(tensor, 0)
        except (RuntimeError, AttributeError) as err:  # AttributeError: abandoned meanwhile (group is None)
            raise self._fail(err, what) from err

        def wait(tensor: torch.Tensor = tensor) -> None:  # the default pins the buffer until done
            try:
                if self.cfg.backend == "nccl":
                    await_completion(work, self.cfg.timeout_s, self._abort_after_timeout, what)
                work.wait()  # gloo: blocks the host (with gloo's own timeout); NCCL: surfaces a failure
            except WeightSyncTimeout:
                self._failed = what
                raise
            except RuntimeError as err:
                raise self._fail(err, what) from err

        return wait

    def _abort_after_timeout(self) -> None:
        self.timeouts += 1
        if self._group is not None:
            destroy_group(self._group, clean=False)

    def _fail(self, err: BaseException, what: str) -> WeightSyncError:
        self._failed = what
        wrapped = wrap_error(
            err,
            f"rank {self.rank}: {what} failed; the group is now unusable, re-create it with the members still alive",
        )
        self.timeouts += isinstance(wrapped, WeightSyncTimeout)
        return wrapped

    def _check_usable(self, sender: bool) -> None:
        if sender != (self.rank == 0):
            role = "send (only rank 0 sends)" if sender else "receive (rank 0 is the sender)"
            raise WeightSyncError(f"rank {self.rank} cannot {role}")
        if self._closed:
            raise TransportClosed(f"rank {self.rank}: weight-sync transport is closed")
        if self._failed is not None:
            raise WeightSyncError(
                f"rank {self.rank}: weight-sync group broke earlier ({self._failed}); "
                "re-create it with BroadcastTransport.create on a new port"
            )

    def close(self) -> None:
        """Sender: announce the end and give receivers a short grace to read it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.rank == 0 and self._failed is None and self._store is not None:
            self._store.set(f"sync/{self._seq + 1}", _CLOSE)
            deadline = time.monotonic() + min(self.cfg.timeout_s, 5.0)
            while self._store.add("sync/close_acks", 0) < self.world_size - 1 and time.monotonic() < deadline:
                time.sleep(0.01)
        if self._group is not None:
            destroy_group(self._group, clean=self._failed is None)
        self._group = None

    def abandon(self) -> None:
        """Drop the group without announcing a close (its members are moving to a new group); its
        communicator is aborted. Any thread may call it: a send waiting for receivers then fails at once,
        and a receiver still waiting on this group's store fails with `WeightSyncError` at once."""
        self._closed = True
        self._ready.abandoned.set()
        group, self._group, self._store, self._ready.store = self._group, None, None, None
        if group is not None:
            destroy_group(group, clean=False)


class AsyncSender:
    """Sends on one background thread so the learner keeps training while weights go out.

    `submit` snapshots the tensors on the calling thread (`BroadcastTransport.pack`: packed in the wire
    dtype on the transport's device, one model of wire bytes, buffers reused across updates) and
    returns; at most one update is in flight, a second `submit` first waits for the previous one and
    re-raises its error.
    """

    def __init__(self, transport: BroadcastTransport):
        self._transport = transport
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-sync")
        self._inflight: Future[SyncStats] | None = None

    def submit(self, named_tensors: Iterable[tuple[str, torch.Tensor]], policy_version: int) -> Future[SyncStats]:
        self.wait()
        cfg = self._transport.cfg
        snapshot = self._transport.pack(group_into_buckets(named_tensors, cfg.bucket_bytes, cfg.wire_dtype))
        self._inflight = self._pool.submit(self._transport.send_packed, snapshot, policy_version)
        return self._inflight

    def wait(self) -> SyncStats | None:
        """Block until the update in flight (if any) is out; re-raise its error."""
        inflight, self._inflight = self._inflight, None
        return None if inflight is None else inflight.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
