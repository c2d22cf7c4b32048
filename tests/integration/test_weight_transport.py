"""`BroadcastTransport` across real processes (spawn): 1 sender + receivers over a stateless gloo group.

Every process is a child; the test process only collects reports from a queue and always reaps the
children, so a hang shows up as a failed assertion within the test's own deadline, never a stuck run.
"""

from __future__ import annotations

import hashlib
import queue
import time

import pytest
import torch
import torch.multiprocessing as mp

from learner.weight_transport import WeightSyncConfig, free_port

pytestmark = pytest.mark.integration
ADDR = "127.0.0.1"


def _weights(policy_version: int) -> list[tuple[str, torch.Tensor]]:
    """Llama-shaped toy weights with mixed dtypes; one tensor (64 KiB) is larger than the 16 KiB bucket."""
    g = torch.Generator().manual_seed(policy_version)
    named = [("model.embed_tokens.weight", torch.randn(128, 128, generator=g))]
    for i in range(2):
        p = f"model.layers.{i}."
        named += [
            (p + "self_attn.q_proj.weight", torch.randn(32, 32, generator=g)),
            (p + "self_attn.k_proj.weight", torch.randn(16, 32, generator=g)),
            (p + "input_layernorm.weight", torch.randn(32, generator=g)),
            (p + "mlp.down_proj.weight", torch.randn(32, 48, generator=g).bfloat16()),
        ]
    named += [
        ("model.norm.weight", torch.tensor([float("nan"), -0.0, float("inf")])),
        ("rotary.step", torch.tensor([policy_version], dtype=torch.int64)),
    ]
    return named


def _digest(named) -> list[tuple[str, str, tuple[int, ...], str]]:
    return [
        (n, str(t.dtype), tuple(t.shape), hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest())
        for n, t in named
    ]


def _run(role, rank, world_size, port, cfg_json, versions, out):
    """Child entry point: report ("ok", rank, result) or ("error", rank, exception type, message, seconds)."""
    from learner.weight_transport import BroadcastTransport, WeightSyncConfig

    cfg, start = WeightSyncConfig.model_validate_json(cfg_json), time.monotonic()
    try:
        if role == "receiver_with_default_group":
            import torch.distributed as dist

            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # like vLLM's own group
        transport = BroadcastTransport.create(cfg, ADDR, port, rank, world_size)
        start = time.monotonic()
        out.put(("ok", rank, _ROLES[role](transport, versions)))
    except Exception as err:  # noqa: BLE001 -- the parent asserts on the type and message
        out.put(("error", rank, type(err).__name__, str(err), time.monotonic() - start))


def _send(transport, versions):
    stats = [transport.send(_weights(v), v) for v in versions]
    transport.close()
    return [(s.policy_version, s.buckets, s.bytes) for s in stats]


def _receive(transport, versions):
    got = []
    for _ in versions:
        policy_version, tensors = transport.receive(wait_s=30)
        got.append((policy_version, _digest(tensors)))
    try:
        transport.receive(wait_s=30)
    except Exception as err:  # noqa: BLE001
        got.append(type(err).__name__)
    return got


def _receive_with_default_group(transport, versions):
    import torch.distributed as dist

    got = _receive(transport, versions)
    x = torch.ones(2)
    dist.all_reduce(x)  # the default group is untouched and still works
    return got + [(dist.get_world_size(), x.tolist())]


def _receive_once_then_die(transport, versions):
    policy_version, tensors = transport.receive(wait_s=30)
    list(tensors)
    return policy_version  # the process exits without closing: the group loses a member


def _send_then_send_again(transport, versions):
    transport.send(_weights(0), 0)
    time.sleep(1.0)  # let the dying receiver exit
    start = time.monotonic()
    try:
        transport.send(_weights(1), 1)
    except Exception as err:  # noqa: BLE001
        return (type(err).__name__, str(err), time.monotonic() - start)
    return "second send succeeded"


_ROLES = {
    "sender": _send,
    "receiver": _receive,
    "receiver_with_default_group": _receive_with_default_group,
    "die_after_one": _receive_once_then_die,
    "send_twice": _send_then_send_again,
}


def _launch(roles, world_size, cfg, versions, deadline_s):
    """Start one child per (role, rank); return their reports keyed by rank; always reap the children."""
    ctx, port = mp.get_context("spawn"), free_port()
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_run, args=(role, rank, world_size, port, cfg.model_dump_json(), versions, out))
        for role, rank in roles
    ]
    for p in procs:
        p.start()
    reports, end = {}, time.monotonic() + deadline_s
    try:
        while len(reports) < len(procs) and time.monotonic() < end:
            try:
                report = out.get(timeout=0.5)
            except queue.Empty:
                continue
            reports[report[1]] = report
    finally:
        for p in procs:
            p.join(timeout=max(0.1, end - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
    return reports


@pytest.mark.slow  # 15-30 s on the loaded 2-core box: spawning 3 torch processes
def test_two_receivers_get_two_versions_bit_identical_and_default_group_is_untouched():
    cfg = WeightSyncConfig(bucket_bytes=16 * 1024, timeout_s=20)
    reports = _launch([("sender", 0), ("receiver", 1), ("receiver_with_default_group", 2)], 3, cfg, [0, 1], 60)
    assert sorted(reports) == [0, 1, 2], reports
    assert all(r[0] == "ok" for r in reports.values()), reports
    sent = reports[0][2]
    assert [v for v, _, _ in sent] == [0, 1]
    assert all(buckets >= 3 for _, buckets, _ in sent)  # the 64 KiB embedding travelled in its own bucket
    expected = [(v, _digest(_weights(v))) for v in (0, 1)]
    assert expected[0][1] != expected[1][1]
    for rank in (1, 2):
        got = reports[rank][2]
        assert got[:2] == expected, f"rank {rank} received different bytes"
        assert got[2] == "TransportClosed"
    assert reports[2][2][3] == (1, [1.0, 1.0])


@pytest.mark.slow  # 15-30 s on the loaded 2-core box: spawning 3 torch processes
def test_a_member_that_never_joins_makes_everyone_else_fail_cleanly_within_timeout():
    # world_size 3 but rank 2 never starts: no group forms; sender and receiver 1 both raise.
    timeout_s = 3.0
    cfg = WeightSyncConfig(timeout_s=timeout_s)
    start = time.monotonic()
    reports = _launch([("sender", 0), ("receiver", 1)], 3, cfg, [0], 40)
    assert sorted(reports) == [0, 1], reports
    for rank in (0, 1):
        status, _, kind, message, seconds = reports[rank]
        assert (status, kind) == ("error", "WeightSyncTimeout"), reports[rank]
        assert "not all members joined" in message and "re-create" in message
        assert seconds < timeout_s + 3.0, f"rank {rank} took {seconds:.1f}s to give up"
    assert time.monotonic() - start < 30


@pytest.mark.slow  # 15-30 s on the loaded 2-core box: spawning 3 torch processes
def test_a_receiver_that_dies_makes_the_next_send_fail_not_hang():
    cfg = WeightSyncConfig(timeout_s=5.0)
    reports = _launch([("send_twice", 0), ("die_after_one", 1), ("receiver", 2)], 3, cfg, [0], 40)
    assert reports[1] == ("ok", 1, 0)
    kind, message, seconds = reports[0][2]
    assert kind in ("WeightSyncError", "WeightSyncTimeout"), reports[0]
    assert "re-create it" in message
    assert seconds < cfg.timeout_s + 2.0


def test_abort_mid_stream_and_an_abandoned_iterator_leave_the_group_usable():
    # in-process threads (gloo groups are stateless objects): fast, and exercises the real protocol
    import threading

    from learner.weight_transport import BroadcastTransport, TransportClosed, WeightSyncError

    cfg, port, got = WeightSyncConfig(bucket_bytes=1024, timeout_s=10), free_port(), {}

    def receiver():
        transport = BroadcastTransport.create(cfg, ADDR, port, 1, 2)
        version, tensors = transport.receive(wait_s=10)
        try:
            got["aborted"] = (version, [name for name, _ in tensors])
        except WeightSyncError as err:
            got["aborted"] = (version, str(err))
        _, tensors = transport.receive(wait_s=10)
        next(tensors)  # take one tensor, abandon the rest: the next receive drains them
        version, tensors = transport.receive(wait_s=10)
        got["last"] = version, _digest(tensors)
        try:
            transport.receive(wait_s=10)
        except TransportClosed:
            got["closed"] = True

    thread = threading.Thread(target=receiver)
    thread.start()
    sender = BroadcastTransport.create(cfg, ADDR, port, 0, 2)

    def bad_weights():
        yield from _weights(0)[:3]
        yield "lm_head.weight", None  # e.g. a parameter that failed to gather

    with pytest.raises(TypeError, match="lm_head.weight"):
        sender.send(bad_weights(), 5)
    sender.send(_weights(6), 6)
    sender.send(_weights(7), 7)
    sender.close()
    thread.join(20)
    assert not thread.is_alive()
    assert got["aborted"][0] == 5 and "aborted update policy_version=5" in got["aborted"][1]
    assert got["last"] == (7, _digest(_weights(7)))
    assert got["closed"]


def _pair(cfg, receiver_fn, port=None):
    """A sender transport in this thread and one receiver thread running `receiver_fn(transport)`."""
    import threading

    from learner.weight_transport import BroadcastTransport

    port, got = port or free_port(), {}

    def run():
        transport = BroadcastTransport.create(cfg, ADDR, port, 1, 2)
        try:
            got["result"] = receiver_fn(transport)
        except Exception as err:  # noqa: BLE001 -- the test asserts on it
            got["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    return BroadcastTransport.create(cfg, ADDR, port, 0, 2), thread, got


def test_a_receiver_busy_longer_than_timeout_s_delays_the_update_instead_of_failing_it():
    # the receiver is "generating" for 3x timeout_s before it calls receive; its heartbeat keeps it alive
    cfg = WeightSyncConfig(timeout_s=1.0, bucket_bytes=4096)

    def busy_then_receive(transport):
        time.sleep(3.0)
        version, tensors = transport.receive(wait_s=10)
        return version, _digest(tensors)

    sender, thread, got = _pair(cfg, busy_then_receive)
    stats = sender.send(_weights(4), 4)
    thread.join(20)
    assert got.get("result") == (4, _digest(_weights(4))), got
    assert stats.wait_ready_s >= 2.5 and sender.timeouts == 0
    sender.close()


def test_a_silent_receiver_fails_the_update_within_timeout_s_and_is_counted():
    from learner.weight_transport import WeightSyncTimeout

    cfg = WeightSyncConfig(timeout_s=1.0)

    def go_silent(transport):
        transport.abandon()  # stops its heartbeat, as a killed process would
        time.sleep(4.0)

    sender, thread, _ = _pair(cfg, go_silent)
    start = time.monotonic()
    with pytest.raises(WeightSyncTimeout, match="stopped heartbeating"):
        sender.send(_weights(0), 0)
    assert time.monotonic() - start < cfg.timeout_s + 2.0 and sender.timeouts == 1
    thread.join(10)


def test_abandon_from_another_thread_fails_a_send_waiting_for_receivers_at_once():
    import threading

    from learner.weight_transport import WeightSyncError

    cfg = WeightSyncConfig(timeout_s=30.0)
    sender, thread, got = _pair(cfg, lambda transport: time.sleep(3.0))
    threading.Timer(0.5, sender.abandon).start()
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match="abandoned"):
        sender.send(_weights(0), 0)
    assert time.monotonic() - start < 3.0
    thread.join(10)


def test_a_packed_snapshot_is_what_arrives_even_if_the_weights_change_meanwhile_and_keeps_the_wire_dtype():
    from learner.weight_packing import group_into_buckets

    cfg = WeightSyncConfig(bucket_bytes=4096, wire_dtype="bfloat16")

    def receive(transport):
        version, tensors = transport.receive(wait_s=20)
        return version, [(n, t.dtype, t.clone()) for n, t in tensors]

    sender, thread, got = _pair(cfg, receive)
    live = _weights(2)
    update = sender.pack(group_into_buckets(live, cfg.bucket_bytes, cfg.wire_dtype))
    for _, t in live:
        if t.is_floating_point():
            t.add_(1.0)  # the optimiser keeps going while the snapshot is sent
    sender.send_packed(update, 2)
    thread.join(20)
    version, received = got["result"]
    assert version == 2
    for (name, tensor), (got_name, dtype, value) in zip(_weights(2), received):
        assert name == got_name
        if tensor.is_floating_point():  # the pre-change values, cast once to bf16 and kept so
            assert dtype == torch.bfloat16
            assert torch.allclose(value.float(), tensor.bfloat16().float(), equal_nan=True)
        else:
            assert torch.equal(value, tensor)
    sender.close()


def test_streamed_buckets_may_be_released_when_the_next_is_requested():
    # a ZeRO-3-like source: asking for bucket i+1 overwrites bucket i's tensors (the gather is released)
    from learner.weight_packing import group_into_buckets

    cfg = WeightSyncConfig(bucket_bytes=16 * 1024)  # the 64 KiB embedding goes in place (DIRECT)
    want = _weights(3)

    def releasing_source():
        previous = None
        for bucket in group_into_buckets([(n, t.clone()) for n, t in want], cfg.bucket_bytes):
            if previous is not None:
                for _, t in previous:
                    t.zero_()
            yield bucket
            previous = bucket

    def receive(transport):
        version, tensors = transport.receive(wait_s=20)
        return _digest(tensors)

    sender, thread, got = _pair(cfg, receive)
    stats = sender.send_buckets(releasing_source(), 3)
    thread.join(20)
    assert got["result"] == _digest(want) and stats.buckets >= 3
    sender.close()
