"""The run's secret: who may steer a run (its control actor) and join its weight-sync group.

- The driver makes a fresh 256-bit secret per session (`new_run_secret`), keeps it in its own
  environment as $FLYWHEEL_RUN_SECRET, gives it to every actor it starts in their runtime env
  (services/placement.py, services/control.py), and writes it to `<run_dir>/run_secret` (mode 0600)
  for `flywheel scale`, which runs as whoever can read the run directory.
- Control calls carry `sign(secret, method, *args)`: HMAC-SHA256 (RFC 2104) over the method, its
  arguments, the time and a random nonce. The control actor (`Verifier`) accepts a signature once,
  within `MAX_SKEW_S` of its clock, so a captured call cannot be replayed later or against other args.
- The weight-sync rendezvous keys its TCPStore under a secret-derived prefix and makes every member
  answer a nonce with an HMAC (learner/weight_transport.py).

Threat model. Ray's own token auth (`RAY_AUTH_MODE=token`; deploy/kuberay) guards the cluster: a client
without the cluster token cannot reach the GCS, the dashboard or any actor. The run secret narrows that
to the run: a process on the cluster, or one holding the cluster token, that lacks this run's secret
cannot rescale the run, read or forge its membership reports, or join or impersonate a member of its
weight group. What someone on the network can still do: see the TCPStore traffic (plaintext, including
the group's prefix and HMACs, never the secret); open connections to the store and to gloo/NCCL
ports and so disturb a rendezvous (denial of service: the group fails and is re-formed); and, if they
can read or alter packets in flight, read or tamper with the weights themselves, since gloo/NCCL
carry tensors unauthenticated and unencrypted. Keep the weight-sync network private (a Kubernetes
NetworkPolicy, a VPC) and use Ray's TLS where the network is shared. Anyone who can read the run
directory can read the secret: the shared runs volume is inside the trust boundary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import time
from collections import OrderedDict
from pathlib import Path

RUN_SECRET_ENV = "FLYWHEEL_RUN_SECRET"  # the name learner/weight_auth.py reads too
SECRET_FILE = "run_secret"
MAX_SKEW_S = 300.0


class AuthError(PermissionError):
    """A call without a valid signature of the run's secret."""


@dataclasses.dataclass(frozen=True)
class Signed:
    """A signature of one call: HMAC(secret, method, args, issued_at, nonce)."""

    issued_at: float
    nonce: str
    mac: str


def new_run_secret() -> str:
    return secrets.token_hex(32)


def write_secret_file(run_dir: Path, secret: str) -> Path:
    """`<run_dir>/run_secret`, readable by its owner only, for `flywheel scale` on the run's cluster."""
    path = Path(run_dir) / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{SECRET_FILE}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    os.replace(tmp, path)
    return path


def read_run_secret(secret_file: str | Path | None = None, default_file: str | Path | None = None) -> bytes:
    """The run's secret: from `secret_file` if given (it must exist), else $FLYWHEEL_RUN_SECRET, else
    `default_file` if it exists; a clear error naming what to do otherwise."""
    if secret_file is not None:
        if not Path(secret_file).is_file():
            raise AuthError(f"--secret-file {secret_file} does not exist; the run's driver writes <run_dir>/run_secret")
        return Path(secret_file).read_text().strip().encode()
    text = os.environ.get(RUN_SECRET_ENV)
    if not text and default_file is not None and Path(default_file).is_file():
        text = Path(default_file).read_text().strip()
    if not text:
        where = f" and {default_file} does not exist" if default_file is not None else ""
        raise AuthError(
            f"this run's secret is needed: ${RUN_SECRET_ENV} is not set{where}; pass --secret-file "
            "<runs_dir>/<run.name>/run_secret (written by the run's driver) or set the variable"
        )
    return text.encode()


def _canonical(method: str, args: tuple, issued_at: float, nonce: str) -> bytes:
    return json.dumps([method, list(args), issued_at, nonce], sort_keys=True, default=_plain).encode()


def _plain(obj):
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    raise TypeError(f"cannot sign a {type(obj).__name__}")


def sign(secret: bytes, method: str, *args) -> Signed:
    issued_at, nonce = time.time(), secrets.token_hex(16)
    mac = hmac.new(secret, _canonical(method, args, issued_at, nonce), hashlib.sha256).hexdigest()
    return Signed(issued_at, nonce, mac)


class Verifier:
    """Checks `Signed` calls: right secret, right method and args, fresh, and each nonce once."""

    def __init__(self, secret: bytes, max_skew_s: float = MAX_SKEW_S):
        self.secret, self.max_skew_s = secret, max_skew_s
        self._seen: OrderedDict[str, float] = OrderedDict()

    def check(self, signed: Signed | None, method: str, *args) -> None:
        if not isinstance(signed, Signed):
            raise AuthError(f"{method}: unsigned call; sign it with the run's secret (services/auth.py)")
        want = hmac.new(self.secret, _canonical(method, args, signed.issued_at, signed.nonce), hashlib.sha256)
        if not hmac.compare_digest(want.hexdigest(), signed.mac):
            raise AuthError(f"{method}: bad signature; the caller does not hold this run's secret")
        now = time.time()
        if abs(now - signed.issued_at) > self.max_skew_s:
            raise AuthError(f"{method}: signature issued {now - signed.issued_at:.0f} s from now; clocks differ?")
        if signed.nonce in self._seen:
            raise AuthError(f"{method}: this signature was already used (a replayed call)")
        self._seen[signed.nonce] = signed.issued_at
        while self._seen and next(iter(self._seen.values())) < now - 2 * self.max_skew_s:
            self._seen.popitem(last=False)
