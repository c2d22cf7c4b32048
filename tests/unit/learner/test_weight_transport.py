"""Packing/bucketing (`learner.weight_packing`, pure, no process group), the sender's snapshot and config validation."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from learner.weight_packing import (
    BufferPool,
    decode_header,
    direct_parts,
    group_into_buckets,
    pack_bucket,
    pack_update,
    unpack_bucket,
    unpack_payload,
)
from learner.weight_transport import (
    AsyncSender,
    BroadcastTransport,
    PackedUpdate,
    SyncStats,
    WeightSyncConfig,
    WeightSyncError,
    free_port,
)


def _round_trip(named, bucket_bytes, wire_dtype=None, restore_dtype=False):
    out, n_buckets = [], 0
    for bucket in group_into_buckets(named, bucket_bytes, wire_dtype):
        wire, header_nbytes = pack_bucket(bucket, wire_dtype)
        assert wire.dtype == torch.uint8 and header_nbytes % 64 == 0
        # clone: unpack must not rely on the sender's buffer
        out += unpack_bucket(wire.clone(), header_nbytes, restore_dtype=restore_dtype)
        n_buckets += 1
    return out, n_buckets


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def test_fp32_round_trip_is_bit_exact_including_nan_inf_and_negative_zero():
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, 3.4e38])
    named = [("embed.weight", torch.randn(7, 5)), ("norm.weight", special), ("layer.0.q", torch.randn(3, 4, 2))]
    out, _ = _round_trip(named, bucket_bytes=2**20)
    assert [n for n, _ in out] == [n for n, _ in named]
    for (_, a), (_, b) in zip(named, out):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(_bits(a), _bits(b))


def test_bf16_wire_cast_arrives_in_bf16_and_restores_on_request():
    x = torch.randn(1000) * 10
    named = [("w", x), ("steps", torch.arange(5))]
    out, _ = _round_trip(named, bucket_bytes=2**20, wire_dtype="bfloat16")
    assert out[0][1].dtype == torch.bfloat16  # receivers keep the wire dtype: no up-cast copy
    assert torch.equal(out[0][1], x.bfloat16())
    out, _ = _round_trip(named, bucket_bytes=2**20, wire_dtype="bfloat16", restore_dtype=True)
    w, steps = out[0][1], out[1][1]
    assert w.dtype == torch.float32
    assert torch.equal(w, x.bfloat16().float())  # exactly what one round-to-nearest bf16 cast gives
    assert ((w - x).abs() <= x.abs() * 2**-8).all()  # bf16 keeps 8 significant bits
    assert not torch.equal(w, x)  # the cast did happen
    assert steps.dtype == torch.int64 and torch.equal(steps, torch.arange(5))  # integers are never cast


def test_wire_cast_halves_the_payload():
    named = [("w", torch.randn(256, 256))]
    full, _ = pack_bucket(named)
    half, header_nbytes = pack_bucket(named, "bfloat16")
    assert half.numel() - header_nbytes == 256 * 256 * 2
    assert full.numel() - header_nbytes > half.numel() - header_nbytes


def test_tensor_larger_than_bucket_travels_alone_and_order_is_kept():
    small = [(f"s{i}", torch.randn(100)) for i in range(4)]  # 400 B -> 448 B slots
    big = ("big", torch.randn(10_000))  # 40 KB > bucket
    named = small[:2] + [big] + small[2:]
    buckets = list(group_into_buckets(named, bucket_bytes=1024))
    assert [[n for n, _ in b] for b in buckets] == [["s0", "s1"], ["big"], ["s2", "s3"]]
    out, n_buckets = _round_trip(named, bucket_bytes=1024)
    assert n_buckets == 3
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(named, out))


def test_every_bucket_but_a_lone_giant_fits_bucket_bytes():
    named = [(f"t{i}", torch.randn(n)) for i, n in enumerate([10, 300, 50, 250, 5, 600, 1, 200])]
    for bucket in group_into_buckets(named, bucket_bytes=1200):
        wire, header_nbytes = pack_bucket(bucket)
        assert wire.numel() - header_nbytes <= 1200 or len(bucket) == 1


def test_mixed_dtypes_and_non_contiguous_inputs_round_trip():
    base = torch.randn(6, 4)
    named = [
        ("fp32_T", base.t()),  # non-contiguous
        ("bf16", torch.randn(5).bfloat16()),
        ("fp16", torch.randn(3, 3).half()),
        ("fp64", torch.randn(2, dtype=torch.float64)),
        ("i8", torch.tensor([-128, 0, 127], dtype=torch.int8)),
        ("bool", torch.tensor([True, False, True])),
        ("scalar", torch.tensor(3.5)),
        ("empty", torch.empty(0, 4)),
    ]
    out, _ = _round_trip(named, bucket_bytes=64)
    for (name, a), (got_name, b) in zip(named, out):
        assert name == got_name and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), name


def test_fp16_wire_restores_bf16_and_fp64_tensors_to_their_own_dtype_on_request():
    x64, xbf = torch.randn(4, dtype=torch.float64), torch.randn(4).bfloat16()
    out, _ = _round_trip([("d", x64), ("b", xbf)], 2**20, wire_dtype="float16")
    assert out[0][1].dtype == out[1][1].dtype == torch.float16
    out, _ = _round_trip([("d", x64), ("b", xbf)], 2**20, wire_dtype="float16", restore_dtype=True)
    assert out[0][1].dtype == torch.float64 and torch.allclose(out[0][1], x64, rtol=1e-3)
    assert out[1][1].dtype == torch.bfloat16


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=12), bucket_bytes=st.integers(1024, 20_000))
def test_round_trip_property_any_sizes_any_bucket(sizes, bucket_bytes):
    named = [(f"p{i}", torch.randn(n)) for i, n in enumerate(sizes)]
    out, _ = _round_trip(named, bucket_bytes)
    assert [n for n, _ in out] == [n for n, _ in named]
    assert all(torch.equal(_bits(a), _bits(b)) for (_, a), (_, b) in zip(named, out))


def test_non_tensor_input_names_the_weight():
    with pytest.raises(TypeError, match="'lm_head.weight' is a list"):
        list(group_into_buckets([("lm_head.weight", [1.0, 2.0])], 1024))


def test_config_rejects_bad_values_and_unknown_fields():
    assert WeightSyncConfig().bucket_bytes == 32 * 2**20 and WeightSyncConfig().backend == "gloo"
    for bad in (
        {"backend": "mpi"},
        {"wire_dtype": "int8"},
        {"timeout_s": 0},
        {"bucket_bytes": 10},
        {"sync_every_steps": 0},
        {"master_port": 70000},
        {"bucket_size": 1},
    ):
        with pytest.raises(ValidationError):
            WeightSyncConfig(**bad)
    with pytest.raises(ValidationError):
        WeightSyncConfig().bucket_bytes = 1  # frozen


def test_create_rejects_bad_rank_and_world_size_before_touching_the_network():
    with pytest.raises(ValueError, match="world_size >= 2"):
        BroadcastTransport.create(WeightSyncConfig(), "127.0.0.1", free_port(), 0, 1)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        BroadcastTransport.create(WeightSyncConfig(), "127.0.0.1", free_port(), 3, 2)


class _RecordingTransport:
    """Fake sender: real `pack`, then blocks in `send_packed` until released and records what it got."""

    cfg = WeightSyncConfig()

    def __init__(self):
        self.release, self.sent = threading.Event(), []

    def pack(self, buckets):
        return PackedUpdate(pack_update(buckets, None, torch.device("cpu")))

    def send_packed(self, update, policy_version):
        self.release.wait(5)
        got = [t.clone() for b in update.buckets for _, t in unpack_bucket(b.wire, b.header_nbytes)]
        self.sent.append((policy_version, got))
        return SyncStats(policy_version, 0, 0.0, 0)


def test_async_sender_snapshots_before_returning_so_training_can_mutate_weights():
    transport, w = _RecordingTransport(), torch.zeros(4)
    sender = AsyncSender(transport)
    future = sender.submit([("w", w)], policy_version=3)
    w.add_(1.0)  # the optimizer steps while the send is still in flight
    transport.release.set()
    assert future.result(5).policy_version == 3
    assert torch.equal(transport.sent[0][1][0], torch.zeros(4))
    sender.close()


def test_async_sender_reraises_a_failed_send_on_the_next_submit():
    class Failing(_RecordingTransport):
        def send_packed(self, update, policy_version):
            raise WeightSyncError("receiver 2 timed out")

    sender = AsyncSender(Failing())
    sender.submit([("w", torch.zeros(1))], 0)
    with pytest.raises(WeightSyncError, match="receiver 2 timed out"):
        sender.submit([("w", torch.zeros(1))], 1)
    sender.close()


def test_buffer_pool_reuses_a_buffer_only_when_nothing_views_it():
    pool = BufferPool(bucket_bytes=4096, device=torch.device("cpu"), max_buffers=2)
    a = pool.acquire(1000)
    ptr_a = a.data_ptr()
    held = a[:8].view(torch.float32)  # like an unpacked tensor a consumer keeps
    del a
    b = pool.acquire(1000)
    assert b.data_ptr() != ptr_a  # `held` pins the first buffer
    del b, held
    assert pool.acquire(1000).data_ptr() == ptr_a  # now free: reused, no fresh allocation


def test_buffer_pool_grows_for_a_giant_and_falls_back_to_fresh_when_all_busy():
    pool = BufferPool(bucket_bytes=1024, device=torch.device("cpu"), max_buffers=1)
    busy = pool.acquire(100)
    other = pool.acquire(100)
    assert other.data_ptr() != busy.data_ptr()
    del busy, other
    giant = pool.acquire(10**6)
    assert giant.numel() == 10**6
    ptr = giant.data_ptr()
    del giant
    assert pool.acquire(10**6).data_ptr() == ptr


def test_received_tensors_kept_by_the_consumer_survive_later_buckets():
    # end to end through pack/unpack with one pool, as the receiver does bucket after bucket
    pool = BufferPool(bucket_bytes=1024, device=torch.device("cpu"))
    named = [(f"t{i}", torch.full((200,), float(i))) for i in range(6)]  # 800 B each: one per bucket
    kept = []
    for bucket in group_into_buckets(named, 1024):
        wire, header_nbytes = pack_bucket(bucket)
        buf = pool.acquire(wire.numel())
        buf.copy_(wire)  # what the broadcast does
        kept += unpack_bucket(buf, header_nbytes)
        del buf
    assert all(torch.equal(t, torch.full((200,), float(i))) for i, (_, t) in enumerate(kept))


def test_a_giant_tensor_goes_in_place_without_a_pack_copy_and_round_trips():
    big = torch.randn(64, 64)  # 16 KiB >= bucket
    header, payload = direct_parts([("lm_head.weight", big)], None, min_nbytes=4096, device=torch.device("cpu"))
    assert payload.data_ptr() == big.data_ptr() and payload.numel() == big.nbytes  # no copy
    ((name, got),) = unpack_payload(payload.clone(), decode_header(header))
    assert name == "lm_head.weight" and torch.equal(_bits(got), _bits(big))


def test_giants_that_need_a_cast_or_are_strided_or_small_are_packed_instead():
    cpu = torch.device("cpu")
    assert direct_parts([("w", torch.randn(64, 64))], "bfloat16", 4096, cpu) is None  # cast on the wire
    assert direct_parts([("w", torch.randn(64, 64).t())], None, 4096, cpu) is None  # non-contiguous
    assert direct_parts([("w", torch.randn(8))], None, 4096, cpu) is None  # below the threshold
    assert direct_parts([("a", torch.randn(2048)), ("b", torch.randn(2048))], None, 4096, cpu) is None


def test_a_receivers_pool_frees_giant_buffers_and_keeps_bucket_sized_ones():
    pool = BufferPool(bucket_bytes=1024, device=torch.device("cpu"), max_buffers=2, keep_giants=False)
    small = pool.acquire(500)
    small_ptr = small.data_ptr()
    del small
    giant = pool.acquire(10**6)
    assert giant.numel() == 10**6 and giant.data_ptr() != small_ptr
    del giant
    assert pool.acquire(500).data_ptr() == small_ptr  # the bucket-sized buffer survived the giant
    assert all(buf.numel() < 10**6 for buf, _ in pool._pool)  # the giant was not kept
