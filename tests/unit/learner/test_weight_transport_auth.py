"""The weight-sync rendezvous requires the run's secret: a member without it forms no group, and a TCP
client of the store that does not know it can neither see nor touch the group's keys."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from learner.weight_auth import RUN_SECRET_ENV, store_prefix
from learner.weight_transport import BroadcastTransport, WeightSyncConfig, WeightSyncError, free_port

ADDR = "127.0.0.1"


def _receiver(cfg, port, secret, out):
    try:
        transport = BroadcastTransport.create(cfg, ADDR, port, 1, 2, secret=secret)
        version, tensors = transport.receive(wait_s=10)
        out["got"] = (version, {n: t.clone() for n, t in tensors})
    except WeightSyncError as e:
        out["error"] = str(e)


def test_members_with_the_secret_form_a_group_and_an_outsider_sees_no_key():
    cfg, port, out = WeightSyncConfig(timeout_s=10), free_port(), {}
    thread = threading.Thread(target=_receiver, args=(cfg, port, b"run-secret", out))
    thread.start()
    sender = BroadcastTransport.create(cfg, ADDR, port, 0, 2, secret=b"run-secret")
    # an outsider connects to the same store: the keys it could guess are not there
    outsider = dist.TCPStore(ADDR, port, is_master=False, timeout=timedelta(seconds=5))
    for key in ("auth/nonce", "auth/0", "sync/1", "flywheel/weights/0"):
        assert not outsider.check([key])
    insider = dist.PrefixStore(store_prefix(b"run-secret", ADDR, port, 2), outsider)
    assert insider.check(["auth/nonce", "auth/0", "auth/1"])  # they exist under the secret's prefix
    assert store_prefix(b"other-secret", ADDR, port, 2) != store_prefix(b"run-secret", ADDR, port, 2)
    sender.send([("w", torch.arange(4.0))], 3)
    thread.join(20)
    assert out["got"][0] == 3 and torch.equal(out["got"][1]["w"], torch.arange(4.0))
    sender.close()


def test_a_member_without_the_secret_forms_no_group():
    cfg, port, out = WeightSyncConfig(timeout_s=3), free_port(), {}
    thread = threading.Thread(target=_receiver, args=(cfg, port, b"guess", out))
    thread.start()
    with pytest.raises(WeightSyncError) as err:
        BroadcastTransport.create(cfg, ADDR, port, 0, 2, secret=b"run-secret")
    thread.join(20)
    # different prefixes: the two never even meet; with a prefix seen on the wire, the HMAC would refuse it
    assert "not all members joined" in str(err.value) and "error" in out and "got" not in out


def test_a_forged_answer_under_the_right_prefix_is_refused():
    """An attacker who sniffed the prefix (the store's traffic is plaintext) but not the secret."""
    cfg, port, errors = WeightSyncConfig(timeout_s=5), free_port(), {}

    def attacker():  # takes rank 1's place: the store counts any client that says world_size=2
        store = dist.TCPStore(ADDR, port, 2, is_master=False, timeout=timedelta(seconds=5))
        scoped = dist.PrefixStore(store_prefix(b"run-secret", ADDR, port, 2), store)
        scoped.wait(["auth/nonce"])
        scoped.set("auth/1", "0" * 64)  # cannot compute HMAC(secret, nonce) without the secret

    thread = threading.Thread(target=attacker)
    thread.start()
    try:
        BroadcastTransport.create(cfg, ADDR, port, 0, 2, secret=b"run-secret")
    except WeightSyncError as e:
        errors["sender"] = str(e)
    thread.join(20)
    assert "member(s) [1] failed authentication" in errors["sender"]


def test_no_secret_in_the_environment_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(RUN_SECRET_ENV, raising=False)
    with pytest.raises(WeightSyncError, match=f"needs the run's secret.*{RUN_SECRET_ENV}"):
        BroadcastTransport.create(WeightSyncConfig(timeout_s=1), ADDR, free_port(), 0, 2)
