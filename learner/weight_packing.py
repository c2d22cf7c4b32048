"""The weight-sync wire format: named tensors packed into aligned byte buckets, and back (pure, no process group).

Contract:
- A bucket is `[json header | pad | payload]` in one uint8 tensor; the header lists a `TensorSlot` per
  tensor (name, shape, own dtype, wire dtype, offset, nbytes), every slot 64-byte aligned so a
  `uint8 -> dtype` view of it is legal. `group_into_buckets` closes a bucket when the next tensor would
  overflow `bucket_bytes` (order kept; a larger tensor travels alone).
- Floating tensors are cast to `wire_dtype` (if set) while packing; integers never are. Unpacking
  yields views into the received buffer in the wire dtype (zero copy: the engine casts as it loads,
  so a receiver never holds an up-cast copy); `restore_dtype=True` casts back to each tensor's own dtype.
- `pack_update` / `snapshot_update` pack every bucket of an update at once (a snapshot in the wire
  dtype, on the tensors' device), reusing the previous snapshot's buffers when they fit; on CUDA the
  snapshot carries the event its broadcasts must wait for.
- `BufferPool` hands out receive/pack buffers that are reused only once nothing else views them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator

import torch

_ALIGN = 64  # bytes; every slot starts aligned so `uint8 -> dtype` views are legal and fast
KIND_BUCKET, KIND_END, KIND_ABORT, KIND_DIRECT = 1, 2, 3, 4


class WeightSyncError(RuntimeError):
    """The weight-sync group failed; it is unusable. Re-create it with the members still alive."""


class WeightSyncTimeout(WeightSyncError, TimeoutError):
    """A member did not join, send or receive within `timeout_s`."""


class TransportClosed(WeightSyncError):
    """The sender closed the transport; no more updates will come."""


@dataclasses.dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives in a bucket's payload. `dtype` is its own; `wire_dtype` is on the wire."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    wire_dtype: str
    offset: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class PackedBucket:
    """One packed bucket ready to broadcast: uint8 `wire` = header (`header_nbytes`) + payload."""

    wire: torch.Tensor
    header_nbytes: int

    @property
    def payload_nbytes(self) -> int:
        return self.wire.numel() - self.header_nbytes


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


def wire_dtype_of(tensor: torch.Tensor, wire_dtype: str | None) -> torch.dtype:
    return _dtype(wire_dtype) if wire_dtype and tensor.is_floating_point() else tensor.dtype


def _wire_nbytes(tensor: torch.Tensor, wire_dtype: str | None) -> int:
    return tensor.numel() * wire_dtype_of(tensor, wire_dtype).itemsize


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
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"weight {name!r} is a {type(t).__name__}, expected a torch.Tensor")
        nbytes = _wire_nbytes(t, wire_dtype)
        slots.append(
            TensorSlot(
                name, tuple(t.shape), _dtype_name(t.dtype), _dtype_name(wire_dtype_of(t, wire_dtype)), offset, nbytes
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


def bucket_nbytes(slots: list[TensorSlot]) -> tuple[bytes, int, int]:
    """(header bytes, padded header size, padded payload size) of a bucket with `slots`."""
    header = encode_header(slots)
    payload = _round_up(slots[-1].offset + slots[-1].nbytes) if slots else 0
    return header, _round_up(len(header)), payload


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
    header, header_nbytes, payload_nbytes = bucket_nbytes(slots)
    nbytes = header_nbytes + payload_nbytes
    wire = alloc(nbytes) if alloc else torch.empty(nbytes, dtype=torch.uint8, device=device)
    wire[: len(header)].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
    wire[len(header) : header_nbytes].zero_()
    payload = wire[header_nbytes:]
    for slot, (_, tensor) in zip(slots, bucket):
        _slot_view(payload, slot).copy_(tensor.detach())
    return wire, header_nbytes


def pack_update(
    buckets: Iterable[list[tuple[str, torch.Tensor]]],
    wire_dtype: str | None,
    device: torch.device,
    reuse: list[PackedBucket] | None = None,
) -> list[PackedBucket]:
    """Snapshot a whole update: every bucket packed now, on `device`, in the wire dtype.

    Bucket i reuses `reuse[i]`'s buffer when it is large enough (the caller guarantees nothing still
    reads it, e.g. the previous send has finished), so steady-state publishing allocates nothing.
    """
    out = []
    for i, bucket in enumerate(buckets):
        old = reuse[i].wire if reuse is not None and i < len(reuse) else None

        def alloc(n: int, old=old) -> torch.Tensor:
            return old[:n] if old is not None and old.numel() >= n else torch.empty(n, dtype=torch.uint8, device=device)

        out.append(PackedBucket(*pack_bucket(bucket, wire_dtype, device, alloc)))
    return out


@dataclasses.dataclass(frozen=True)
class PackedUpdate:
    """A snapshot from `BroadcastTransport.pack`: packed buckets, plus (CUDA) the event after the copies."""

    buckets: list[PackedBucket]
    ready: object | None = None  # torch.cuda.Event recorded after packing, or None on CPU

    @property
    def nbytes(self) -> int:
        return sum(b.wire.numel() for b in self.buckets)


def snapshot_update(
    buckets: Iterable[list[tuple[str, torch.Tensor]]],
    wire_dtype: str | None,
    device: torch.device,
    reuse: list[PackedBucket] | None = None,
) -> PackedUpdate:
    """Pack every bucket now on `device` in the wire dtype (`weight_packing.pack_update`, reusing `reuse`'s
    buffers); on CUDA also record the event a later `send_packed` orders its broadcasts after."""
    update = PackedUpdate(pack_update(buckets, wire_dtype, device, reuse=reuse))
    if device.type == "cuda":
        ready = torch.cuda.Event()
        ready.record()
        update = PackedUpdate(update.buckets, ready)
    return update


def direct_parts(
    bucket: list[tuple[str, torch.Tensor]], wire_dtype: str | None, min_nbytes: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(header uint8 `[h]`, the tensor's own bytes uint8 `[n]`) for a lone tensor of >= `min_nbytes`
    that needs no cast or move, else None. Sending it in place skips a pack copy of the largest tensors."""
    if len(bucket) != 1:
        return None
    t = bucket[0][1].detach()
    if t.nbytes < min_nbytes or not t.is_contiguous() or t.device != device or wire_dtype_of(t, wire_dtype) != t.dtype:
        return None
    header = encode_header(_slots(bucket, wire_dtype))
    return torch.frombuffer(bytearray(header), dtype=torch.uint8).to(device), t.reshape(-1).view(torch.uint8)


def _slot_view(payload: torch.Tensor, slot: TensorSlot) -> torch.Tensor:
    return payload[slot.offset : slot.offset + slot.nbytes].view(_dtype(slot.wire_dtype)).view(slot.shape)


def unpack_payload(
    payload: torch.Tensor, slots: list[TensorSlot], restore_dtype: bool = False
) -> list[tuple[str, torch.Tensor]]:
    """Views into `payload` (uint8 `[n]`, zero copy) in the wire dtype; `restore_dtype` casts each back."""
    out = []
    for slot in slots:
        view = _slot_view(payload, slot)
        if restore_dtype and slot.wire_dtype != slot.dtype:
            view = view.to(_dtype(slot.dtype))
        out.append((slot.name, view))
    return out


def unpack_bucket(
    wire: torch.Tensor, header_nbytes: int, restore_dtype: bool = False
) -> list[tuple[str, torch.Tensor]]:
    """Inverse of `pack_bucket` (wire dtype kept unless `restore_dtype`)."""
    return unpack_payload(wire[header_nbytes:], decode_header(wire[:header_nbytes]), restore_dtype)


class BufferPool:
    """Reuses up to `max_buffers` uint8 buffers of >= `bucket_bytes`, each only once nothing views it.

    Why: buffers >= 32 MiB come from fresh mmaps in glibc, and first-touch page faults made gloo
    loopback 3-8x slower here (0.25-0.5 vs 1.1-2 GB/s for 32 MiB buckets). A buffer counts as free
    when its storage has no users but the pool (tensors a receiver's consumer kept alive pin it),
    so reuse can never overwrite a tensor someone still holds; otherwise a fresh buffer is used.
    Receivers pass `keep_giants=False`: a lone tensor larger than a bucket (an embedding) gets its own
    buffer, freed once the engine has copied it, so a rollout worker keeps at most `max_buffers` buckets.
    """

    def __init__(self, bucket_bytes: int, device: torch.device, max_buffers: int = 2, keep_giants: bool = True):
        self._capacity, self._device, self._max = bucket_bytes + 64 * 1024, device, max_buffers
        self._keep_giants = keep_giants  # False: a buffer for a tensor larger than a bucket is freed after use
        self._free_uses = getattr(torch._C, "_storage_Use_Count", None)  # absent: never reuse
        self._pool: list[tuple[torch.Tensor, int]] = []  # (buffer, its use count when unshared)

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor `[nbytes]` that nothing else references."""
        giant = nbytes > self._capacity
        for i, (buf, idle_uses) in enumerate(self._pool):
            if self._uses(buf) == idle_uses:
                if buf.numel() >= nbytes:
                    return buf[:nbytes]
                if giant and not self._keep_giants:
                    break
                del self._pool[i]  # too small for this giant tensor: replace it
                break
        if giant and not self._keep_giants:
            return torch.empty(nbytes, dtype=torch.uint8, device=self._device)
        buf = torch.empty(max(nbytes, self._capacity), dtype=torch.uint8, device=self._device)
        if self._free_uses is not None and len(self._pool) < self._max:
            self._pool.append((buf, self._uses(buf)))
        return buf[:nbytes]

    def _uses(self, buf: torch.Tensor) -> int:
        return self._free_uses(buf.untyped_storage()._cdata) if self._free_uses else -1
