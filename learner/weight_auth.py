"""Authentication of the weight-sync rendezvous: only holders of the run's secret form or join a group.

The TCPStore on `master_port` accepts any TCP client and has no access control. Everything of a group
lives under a prefix derived from the run's secret (unguessable: a client without the secret cannot
name, read or overwrite a key), and each member answers a fresh nonce with an HMAC (RFC 2104) before
the group forms, so a member must hold the secret, not only a prefix seen on the wire. Tensors then
travel over gloo/NCCL unauthenticated and unencrypted: keep the group on a private network
(services/auth.py states the threat model).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

import torch.distributed as dist

from learner.weight_packing import WeightSyncError

RUN_SECRET_ENV = "FLYWHEEL_RUN_SECRET"  # services/auth.py sets it for every actor the driver starts


def run_secret(secret: bytes | None) -> bytes:
    """`secret`, else $FLYWHEEL_RUN_SECRET; a clear error when neither exists."""
    if secret is not None:
        return secret
    text = os.environ.get(RUN_SECRET_ENV)
    if not text:
        raise WeightSyncError(
            f"the weight-sync rendezvous needs the run's secret and ${RUN_SECRET_ENV} is not set in this "
            "process; the driver sets it for every actor it starts (pass secret= when calling create directly)"
        )
    return text.encode()


def _mac(secret: bytes, *parts: object) -> str:
    return hmac.new(secret, "|".join(map(str, parts)).encode(), hashlib.sha256).hexdigest()


def store_prefix(secret: bytes, master_addr: str, master_port: int, world_size: int) -> str:
    """The group's key prefix in the store: a MAC of where it meets, so only secret holders can name it."""
    return "flywheel/" + _mac(secret, "weight-sync store", master_addr, master_port, world_size)[:32]


def handshake(store: dist.Store, secret: bytes, rank: int, world_size: int, where: str) -> None:
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
