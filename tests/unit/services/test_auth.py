"""Signed control calls: the right secret, method and arguments, fresh, once; the secret file and its errors."""

from __future__ import annotations

import dataclasses
import os
import stat

import pytest

from services.auth import (
    RUN_SECRET_ENV,
    AuthError,
    Signed,
    Verifier,
    new_run_secret,
    read_run_secret,
    sign,
    write_secret_file,
)
from services.membership import MembershipReport


def test_a_signed_call_passes_once_and_only_as_signed():
    key = new_run_secret().encode()
    v = Verifier(key)
    signed = sign(key, "set_rollout_workers", 4)
    v.check(signed, "set_rollout_workers", 4)
    with pytest.raises(AuthError, match="already used"):
        v.check(signed, "set_rollout_workers", 4)  # a captured call replayed
    for method, args in (("set_rollout_workers", (5,)), ("membership", ())):
        with pytest.raises(AuthError, match="bad signature"):
            v.check(sign(key, "set_rollout_workers", 4), method, *args)  # reused for other args or another method
    with pytest.raises(AuthError, match="bad signature"):
        v.check(sign(b"another run's secret", "set_rollout_workers", 4), "set_rollout_workers", 4)
    with pytest.raises(AuthError, match="unsigned"):
        v.check(None, "membership")
    old = dataclasses.replace(sign(key, "membership"), issued_at=0.0)
    with pytest.raises(AuthError, match="bad signature"):  # the time is signed too: it cannot be edited
        v.check(old, "membership")
    assert len(new_run_secret()) == 64 and new_run_secret() != new_run_secret()


def test_stale_signatures_are_refused(monkeypatch):
    key = b"k"
    signed = sign(key, "poll", MembershipReport("r", 2, ()))
    monkeypatch.setattr("services.auth.time.time", lambda: signed.issued_at + 301)
    with pytest.raises(AuthError, match="clocks differ"):
        Verifier(key).check(signed, "poll", MembershipReport("r", 2, ()))
    assert isinstance(signed, Signed)


def test_secret_file_is_private_and_the_lookup_order_is_explicit(tmp_path, monkeypatch):
    path = write_secret_file(tmp_path / "run", "abc123")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and path.read_text() == "abc123"
    monkeypatch.setenv(RUN_SECRET_ENV, "from-env")
    assert read_run_secret(path) == b"abc123"  # an explicit file wins
    assert read_run_secret(None, default_file=path) == b"from-env"
    monkeypatch.delenv(RUN_SECRET_ENV)
    assert read_run_secret(None, default_file=path) == b"abc123"
    with pytest.raises(AuthError, match="--secret-file .*missing.*does not exist"):
        read_run_secret(tmp_path / "missing")
    with pytest.raises(AuthError, match=f"{RUN_SECRET_ENV} is not set.*--secret-file"):
        read_run_secret(None, default_file=tmp_path / "nope")
