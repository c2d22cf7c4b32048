"""Weight transport: learner rank 0 sends full named tensors to every rollout worker, versioned.

Contract:
- `BroadcastTransport.create(cfg, master_addr, master_port, rank, world_size)` builds a *stateless*
  process group (its own `TCPStore` on `master_port`, `ProcessGroupGloo`/`ProcessGroupNCCL` built
  directly): it never reads or changes torch.distributed's default group, so it coexists with
  DeepSpeed's learner group and with a vLLM engine's own world-size-1 group. Rank 0 sends; every
  other rank receives. All members call `create` concurrently; it raises `WeightSyncTimeout` if
  the group is not complete within `cfg.timeout_s` (no group is formed: re-create with the members
  that did arrive, on a fresh port). The rendezvous requires the run's secret ($FLYWHEEL_RUN_SECRET):
  keys under a secret-derived prefix and an HMAC handshake (see `_handshake`); the tensors themselves
  then travel over gloo/NCCL unauthenticated and unencrypted, so keep the group on a private network.
- One `send(named_tensors, policy_version)` on rank 0 matches one `receive()` on every receiver.
  The sender announces `policy_version` in the store (receivers may idle there for any time), then
  streams buckets, each preceded by a 3-int64 control broadcast `(kind, header_nbytes,
  payload_nbytes)`: BUCKET is one broadcast of `[json header | pad | packed tensor bytes]`; DIRECT
  (a lone tensor >= `bucket_bytes` needing no cast) is a header broadcast then the tensor's own
  bytes, with no pack copy; END closes the update, ABORT cancels it. The sender consumes
  `named_tensors` lazily and holds at most two packed buckets (double buffering: bucket i is on the
  wire while bucket i+1 is packed). Yielded tensors must stay valid until `send` returns: a ZeRO-3
  gather must yield owned copies (`p.detach().clone()` inside `GatheredParameters`), because leaving
  the context frees the gathered storage in place.
- Buckets hold <= `bucket_bytes` of wire bytes; a tensor larger than that travels alone.
  Floating tensors are cast to `wire_dtype` on the wire (if set) and back to their own dtype on
  arrival; other dtypes travel unchanged. Without a cast the received tensors are bit-identical.
- Threads: `send` reads the tensors while it packs them, so it does NOT snapshot. A learner that
  keeps training while weights go out must use `AsyncSender`, whose `submit` copies the tensors on
  the caller's thread before returning and then sends on a background thread.
- Failure: any broadcast that does not complete within `timeout_s` (a receiver died or never
  called `receive`) raises `WeightSyncTimeout`/`WeightSyncError` and marks the transport broken;
  every later call raises at once. Gloo/NCCL groups cannot drop a member, so the owner re-creates
  the transport (new port) with the survivors: `WeightGroup` names such a group, and the sender
  `abandon`s the old one (no close announcement: its receivers are re-forming, not listening).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Literal, Protocol

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch.distributed import DistError

_ALIGN = 64  # bytes; every slot starts aligned so `uint8 -> dtype` views are legal and fast
_KIND_BUCKET, _KIND_END, _KIND_ABORT, _KIND_DIRECT = 1, 2, 3, 4
_CLOSE = "close"


class WeightSyncConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    backend: Literal["gloo", "nccl"] = "gloo"
    bucket_bytes: int = Field(32 * 2**20, ge=1024)
    wire_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    timeout_s: float = Field(60, gt=0)
    sync_every_steps: int = Field(1, ge=1)  # learner steps between broadcasts
    # drain: a worker takes an update between rollout calls (every trace has one policy_version);
    # pause: a vLLM worker takes it between engine steps of a running generation (a trace records
    # policy_version = first, policy_version_max = last). Needs rollout.engine=vllm.
    inflight: Literal["drain", "pause"] = "drain"
    master_port: int | None = Field(None, ge=1, le=65535)  # None = pick with `free_port()`


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
    seconds: float
    buckets: int


class WeightSyncError(RuntimeError):
    """The weight-sync group failed; it is unusable. Re-create it with the members still alive."""


class WeightSyncTimeout(WeightSyncError, TimeoutError):
    """A member did not join, send or receive within `timeout_s`."""


class TransportClosed(WeightSyncError):
    """The sender closed the transport; no more updates will come."""


class WeightTransport(Protocol):
    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], policy_version: int) -> SyncStats: ...
    def receive(self) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]: ...
    def close(self) -> None: ...


def free_port() -> int:
    """A TCP port free on this host right now (the OS picks it), for `WeightSyncConfig.master_port`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- packing (pure, unit-tested)


@dataclasses.dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives in a bucket's payload. `dtype` is its own; `wire_dtype` is on the wire."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    wire_dtype: str
    offset: int
    nbytes: int


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise WeightSyncError(
            f"unknown dtype {name!r} in a weight-sync header; sender and receiver must run the same torch version"
        )
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _round_up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _wire_dtype(tensor: torch.Tensor, wire_dtype: str | None) -> torch.dtype:
    return _dtype(wire_dtype) if wire_dtype and tensor.is_floating_point() else tensor.dtype


def _wire_nbytes(tensor: torch.Tensor, wire_dtype: str | None) -> int:
    return tensor.numel() * _wire_dtype(tensor, wire_dtype).itemsize


def group_into_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, wire_dtype: str | None = None
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Greedy, order-preserving, lazy: a bucket closes when the next tensor would overflow it.

    A tensor whose wire size alone exceeds `bucket_bytes` forms a bucket of its own.
    """
    bucket: list[tuple[str, torch.Tensor]] = []
    used = 0
    for name, tensor in named_tensors:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weight {name!r} is a {type(tensor).__name__}, expected a torch.Tensor")
        size = _round_up(_wire_nbytes(tensor, wire_dtype))
        if bucket and used + size > bucket_bytes:
            yield bucket
            bucket, used = [], 0
        bucket.append((name, tensor))
        used += size
    if bucket:
        yield bucket


def _slots(bucket: list[tuple[str, torch.Tensor]], wire_dtype: str | None) -> list[TensorSlot]:
    slots, offset = [], 0
    for name, t in bucket:
        nbytes = _wire_nbytes(t, wire_dtype)
        slots.append(
            TensorSlot(
                name, tuple(t.shape), _dtype_name(t.dtype), _dtype_name(_wire_dtype(t, wire_dtype)), offset, nbytes
            )
        )
        offset += _round_up(nbytes)
    return slots


def encode_header(slots: list[TensorSlot]) -> bytes:
    return json.dumps([dataclasses.asdict(s) for s in slots]).encode()


def decode_header(header: torch.Tensor) -> list[TensorSlot]:
    """`header`: uint8 `[n]`, JSON of the slots, possibly zero-padded."""
    text = bytes(header.cpu().numpy()).rstrip(b"\0")
    return [TensorSlot(**{**d, "shape": tuple(d["shape"])}) for d in json.loads(text)]


def pack_bucket(
    bucket: list[tuple[str, torch.Tensor]],
    wire_dtype: str | None = None,
    device: torch.device | str = "cpu",
    alloc: Callable[[int], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, int]:
    """Copy `bucket` into one wire buffer. Returns (uint8 `[header_nbytes + payload_nbytes]`, header_nbytes).

    The header is JSON of the `TensorSlot`s, padded to `_ALIGN`; the copy is a snapshot of the tensors.
    `alloc(nbytes)` supplies the uint8 buffer (default: a fresh `torch.empty` on `device`).
    """
    slots = _slots(bucket, wire_dtype)
    header = encode_header(slots)
    header_nbytes = _round_up(len(header))
    payload_nbytes = _round_up(slots[-1].offset + slots[-1].nbytes) if slots else 0
    nbytes = header_nbytes + payload_nbytes
    wire = alloc(nbytes) if alloc else torch.empty(nbytes, dtype=torch.uint8, device=device)
    wire[: len(header)].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
    wire[len(header) : header_nbytes].zero_()
    payload = wire[header_nbytes:]
    for slot, (_, tensor) in zip(slots, bucket):
        _slot_view(payload, slot).copy_(tensor.detach())
    return wire, header_nbytes


def direct_parts(
    bucket: list[tuple[str, torch.Tensor]], wire_dtype: str | None, min_nbytes: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(header uint8 `[h]`, the tensor's own bytes uint8 `[n]`) for a lone tensor of >= `min_nbytes`
    that needs no cast or move, else None. Sending it in place skips a pack copy of the largest tensors."""
    if len(bucket) != 1:
        return None
    t = bucket[0][1].detach()
    if t.nbytes < min_nbytes or not t.is_contiguous() or t.device != device or _wire_dtype(t, wire_dtype) != t.dtype:
        return None
    header = encode_header(_slots(bucket, wire_dtype))
    return torch.frombuffer(bytearray(header), dtype=torch.uint8).to(device), t.reshape(-1).view(torch.uint8)


def _slot_view(payload: torch.Tensor, slot: TensorSlot) -> torch.Tensor:
    return payload[slot.offset : slot.offset + slot.nbytes].view(_dtype(slot.wire_dtype)).view(slot.shape)


def unpack_payload(payload: torch.Tensor, slots: list[TensorSlot]) -> list[tuple[str, torch.Tensor]]:
    """Tensors not cast on the wire are views into `payload` (uint8 `[n]`, zero copy)."""
    out = []
    for slot in slots:
        view = _slot_view(payload, slot)
        out.append((slot.name, view if slot.wire_dtype == slot.dtype else view.to(_dtype(slot.dtype))))
    return out


def unpack_bucket(wire: torch.Tensor, header_nbytes: int) -> list[tuple[str, torch.Tensor]]:
    """Inverse of `pack_bucket`."""
    return unpack_payload(wire[header_nbytes:], decode_header(wire[:header_nbytes]))


class BufferPool:
    """Reuses up to `max_buffers` uint8 buffers of >= `bucket_bytes`, each only once nothing views it.

    Why: buffers >= 32 MiB come from fresh mmaps in glibc, and first-touch page faults made gloo
    loopback 3-8x slower here (0.25-0.5 vs 1.1-2 GB/s for 32 MiB buckets). A buffer counts as free
    when its storage has no users but the pool (tensors a receiver's consumer kept alive pin it),
    so reuse can never overwrite a tensor someone still holds; otherwise a fresh buffer is used.
    """

    def __init__(self, bucket_bytes: int, device: torch.device, max_buffers: int = 2):
        self._capacity, self._device, self._max = bucket_bytes + 64 * 1024, device, max_buffers
        self._free_uses = getattr(torch._C, "_storage_Use_Count", None)  # absent: never reuse
        self._pool: list[tuple[torch.Tensor, int]] = []  # (buffer, its use count when unshared)

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor `[nbytes]` that nothing else references."""
        for i, (buf, idle_uses) in enumerate(self._pool):
            if self._uses(buf) == idle_uses:
                if buf.numel() >= nbytes:
                    return buf[:nbytes]
                del self._pool[i]  # too small for this giant tensor: replace it
                break
        buf = torch.empty(max(nbytes, self._capacity), dtype=torch.uint8, device=self._device)
        if self._free_uses is not None and len(self._pool) < self._max:
            self._pool.append((buf, self._uses(buf)))
        return buf[:nbytes]

    def _uses(self, buf: torch.Tensor) -> int:
        return self._free_uses(buf.untyped_storage()._cdata) if self._free_uses else -1


# ---------------------------------------------------------------- the stateless broadcast group


def _wrap(err: BaseException, what: str) -> WeightSyncError:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    cls = WeightSyncTimeout if "timeout" in text.lower() or "timed out" in text.lower() else WeightSyncError
    return cls(f"{what}: {text}")


# ---------------------------------------------------------------- rendezvous authentication
# The TCPStore on master_port accepts any TCP client and has no access control. Everything of a group
# lives under a prefix derived from the run's secret (unguessable: a client without the secret cannot
# name, read or overwrite a key), and each member answers a fresh nonce with an HMAC before the
# group forms, so a member must hold the secret, not only a prefix seen on the wire (RFC 2104).
RUN_SECRET_ENV = "FLYWHEEL_RUN_SECRET"


def _run_secret(secret: bytes | None) -> bytes:
    if secret is None:
        text = os.environ.get(RUN_SECRET_ENV)
        if not text:
            raise WeightSyncError(
                f"the weight-sync rendezvous needs the run's secret and ${RUN_SECRET_ENV} is not set in this "
                "process; the driver sets it for every actor it starts (pass secret= when calling create directly)"
            )
        secret = text.encode()
    return secret


def _mac(secret: bytes, *parts: object) -> str:
    return hmac.new(secret, "|".join(map(str, parts)).encode(), hashlib.sha256).hexdigest()


def _store_prefix(secret: bytes, master_addr: str, master_port: int, world_size: int) -> str:
    return "flywheel/" + _mac(secret, "weight-sync store", master_addr, master_port, world_size)[:32]


def _handshake(store: dist.Store, secret: bytes, rank: int, world_size: int, where: str) -> None:
    """Rank 0 posts a nonce; each receiver answers HMAC(nonce, its rank); rank 0 checks them all and
    answers HMAC(nonce, sender), which every receiver checks. Any mismatch: WeightSyncError."""
    if rank == 0:
        nonce = secrets.token_hex(16)
        store.set("auth/nonce", nonce)
        store.wait([f"auth/{r}" for r in range(1, world_size)])
        bad = [
            r
            for r in range(1, world_size)
            if not hmac.compare_digest(store.get(f"auth/{r}").decode(), _mac(secret, nonce, "receiver", r))
        ]
        if bad:
            raise WeightSyncError(
                f"{where}: member(s) {bad} failed authentication (they do not hold this run's secret); "
                "no group was formed"
            )
        store.set("auth/0", _mac(secret, nonce, "sender"))
        return
    store.wait(["auth/nonce"])
    nonce = store.get("auth/nonce").decode()
    store.set(f"auth/{rank}", _mac(secret, nonce, "receiver", rank))
    store.wait(["auth/0"])
    if not hmac.compare_digest(store.get("auth/0").decode(), _mac(secret, nonce, "sender")):
        raise WeightSyncError(f"{where}: the sender failed authentication (it does not hold this run's secret)")


def _make_group(cfg: WeightSyncConfig, store: dist.Store, rank: int, world_size: int) -> dist.ProcessGroup:
    timeout = timedelta(seconds=cfg.timeout_s)
    if cfg.backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    try:
        from torch.distributed import ProcessGroupNCCL
    except ImportError as err:
        raise WeightSyncError(
            "WeightSyncConfig.backend='nccl' needs a CUDA build of torch with NCCL; "
            "this torch has none. Use backend='gloo' on CPU."
        ) from err
    opts = ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return ProcessGroupNCCL(store, rank, world_size, opts)


def _device(cfg: WeightSyncConfig) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if cfg.backend == "nccl" else torch.device("cpu")


class BroadcastTransport:
    """`WeightTransport` over one stateless gloo/NCCL group: rank 0 broadcasts, ranks 1.. receive."""

    def __init__(self, cfg: WeightSyncConfig, store: dist.Store, group, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self._store, self._group = store, group
        self._device = _device(cfg)
        pooled = 2 if self._device.type == "cpu" else 0  # CUDA's caching allocator already recycles
        self._buffers = BufferPool(cfg.bucket_bytes, self._device, max_buffers=pooled)
        self._seq = 0  # updates announced (sender) / taken (receiver)
        self._pending: Iterator | None = None  # receiver: the update being consumed
        self._failed: str | None = None
        self._closed = False

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
        Every key lives under a prefix derived from it, and members prove they hold it (`_handshake`)
        before the group forms; a member without it fails with `WeightSyncError`, no group is formed."""
        if world_size < 2 or not 0 <= rank < world_size:
            raise ValueError(
                f"weight-sync group needs world_size >= 2 (1 sender + receivers) and "
                f"0 <= rank < world_size; got rank={rank}, world_size={world_size}"
            )
        key = _run_secret(secret)
        where = f"weight-sync group {master_addr}:{master_port} (rank {rank} of {world_size})"
        timeout = timedelta(seconds=cfg.timeout_s)
        try:
            store = dist.TCPStore(
                master_addr, master_port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=True
            )
            scoped = dist.PrefixStore(_store_prefix(key, master_addr, master_port, world_size), store)
            _handshake(scoped, key, rank, world_size, where)
            group = _make_group(cfg, dist.PrefixStore("flywheel/weights", scoped), rank, world_size)
            group.broadcast(torch.zeros(1, device=_device(cfg)), 0).wait()  # NCCL connects lazily: force it here
        except WeightSyncError:
            raise
        except RuntimeError as err:
            raise _wrap(
                err,
                f"{where}: not all members joined within timeout_s={cfg.timeout_s} "
                "(no group was formed; re-create it with the members that are alive, on a new "
                "port, or check master_addr/master_port)",
            ) from err
        return cls(cfg, scoped, group, rank, world_size)

    # ------------------------------------------------------------ sender
    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], policy_version: int) -> SyncStats:
        """Broadcast one update. Blocks until every bucket went out; reads the tensors while packing."""
        self._check_usable(sender=True)
        if not isinstance(policy_version, int) or policy_version < 0:
            raise ValueError(f"policy_version must be an int >= 0, got {policy_version!r}")
        start, nbytes, buckets, in_flight = time.perf_counter(), 0, 0, lambda: None
        self._seq += 1
        self._store.set(f"sync/{self._seq}", str(policy_version))
        try:
            for bucket in group_into_buckets(named_tensors, self.cfg.bucket_bytes, self.cfg.wire_dtype):
                parts = self._parts(bucket)
                in_flight()  # double buffering: bucket i goes out while bucket i+1 is packed
                in_flight = self._start_bucket(*parts)
                nbytes, buckets = nbytes + parts[-1].numel(), buckets + 1
        except WeightSyncError:
            raise
        except Exception:  # bad input mid-stream: tell receivers to abandon this update, keep the group
            in_flight()
            self._start_control(_KIND_ABORT, 0, 0)()
            raise
        in_flight()
        self._start_control(_KIND_END, 0, 0)()
        return SyncStats(policy_version, nbytes, time.perf_counter() - start, buckets)

    def _parts(self, bucket: list[tuple[str, torch.Tensor]]) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(kind, header-or-wire, payload): a giant tensor goes in place, anything else is packed."""
        direct = direct_parts(bucket, self.cfg.wire_dtype, self.cfg.bucket_bytes, self._device)
        if direct is not None:
            return (_KIND_DIRECT, *direct)
        wire, header_nbytes = pack_bucket(bucket, self.cfg.wire_dtype, alloc=self._buffers.acquire)
        return _KIND_BUCKET, wire, wire[header_nbytes:]

    def _start_bucket(self, kind: int, head: torch.Tensor, payload: torch.Tensor) -> Callable[[], None]:
        header_nbytes = head.numel() if kind == _KIND_DIRECT else head.numel() - payload.numel()
        what = f"sending a bucket of update {self._seq}"
        waits = [self._start_control(kind, header_nbytes, payload.numel()), self._start(head, what)]
        if kind == _KIND_DIRECT:
            waits.append(self._start(payload, what))
        return lambda: [wait() for wait in waits] and None

    def _start_control(self, kind: int, header_nbytes: int, payload_nbytes: int) -> Callable[[], None]:
        control = torch.tensor([kind, header_nbytes, payload_nbytes], dtype=torch.int64, device=self._device)
        return self._start(control, f"sending control of update {self._seq}")

    # ------------------------------------------------------------ receiver
    def receive(self, wait_s: float | None = None) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]:
        """Wait (up to `wait_s`, None = forever) for the next update; return its version and tensors.

        The iterator yields `(name, tensor)` bucket by bucket as they arrive; consume it fully before
        the next `receive` (an unfinished one is drained and discarded then). Raises `TransportClosed`
        when the sender closed, `WeightSyncError` if the sender aborted this update mid-stream.
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
            if kind == _KIND_END:
                self._pending = None
                return
            if kind == _KIND_ABORT:
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
        if kind == _KIND_BUCKET:
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
        """Launch a broadcast from rank 0; the returned call waits for it (and keeps `tensor` alive)."""
        try:
            work = self._group.broadcast(tensor, 0)
        except RuntimeError as err:
            raise self._fail(err, what) from err

        def wait(tensor: torch.Tensor = tensor) -> None:  # the default pins the buffer until done
            try:
                work.wait()
            except RuntimeError as err:
                raise self._fail(err, what) from err

        return wait

    def _fail(self, err: RuntimeError, what: str) -> WeightSyncError:
        self._failed = what
        return _wrap(
            err,
            f"rank {self.rank}: {what} failed; the group is now unusable, re-create it with the members still alive",
        )

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
        if self.rank == 0 and self._failed is None:
            self._store.set(f"sync/{self._seq + 1}", _CLOSE)
            deadline = time.monotonic() + min(self.cfg.timeout_s, 5.0)
            while self._store.add("sync/close_acks", 0) < self.world_size - 1 and time.monotonic() < deadline:
                time.sleep(0.01)
        self._group = None

    def abandon(self) -> None:
        """Drop the group without announcing a close (its members are moving to a new group).

        A receiver still waiting on this group's store then fails with `WeightSyncError` at once."""
        self._closed = True
        self._group = self._store = None


class AsyncSender:
    """Sends on one background thread so the learner keeps training while weights go out.

    `submit` copies the tensors on the calling thread (a consistent snapshot, costing one model copy
    of memory) and returns; at most one update is in flight, a second `submit` first waits for the
    previous one and re-raises its error. Use plain `send` for ZeRO-3 streaming gathers instead.
    """

    def __init__(self, transport: WeightTransport):
        self._transport = transport
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-sync")
        self._inflight: Future[SyncStats] | None = None

    def submit(self, named_tensors: Iterable[tuple[str, torch.Tensor]], policy_version: int) -> Future[SyncStats]:
        self.wait()
        snapshot = [(name, t.detach().clone()) for name, t in named_tensors]
        self._inflight = self._pool.submit(self._transport.send, snapshot, policy_version)
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
