"""Run control: scale a running run's rollout workers from outside, without stopping the learner.

The driver's loop registers one small named actor per run, `flywheel-control-<run.name>` in the Ray
namespace `flywheel`, owned by the driver (it ends with the run). It holds the desired rollout
worker count; the loop polls it at most once a second (`ControlClient.poll`, never blocking),
pushing its membership report in the same call. `scale_rollout` (the Python API behind
`flywheel scale rollout N --run NAME`) sets the count and returns the membership the loop last
reported, optionally waiting until that many workers are active.

Every call must be signed with the run's secret (services/auth.py): the actor gets the secret in its
runtime env from the driver, the loop signs its polls, and `flywheel scale` reads it from
`<run_dir>/run_secret` (or $FLYWHEEL_RUN_SECRET). An unsigned, wrongly signed or replayed call raises
`AuthError` in the caller; nothing changes.
"""

from __future__ import annotations

import logging
import os
import socket
import time

import ray

from services.auth import RUN_SECRET_ENV, AuthError, Signed, Verifier, read_run_secret, sign
from services.membership import MembershipReport

log = logging.getLogger(__name__)

NAMESPACE = "flywheel"
POLL_INTERVAL_S = 1.0


class RunNotFound(LookupError):
    """No run of that name is active on the Ray cluster."""


def control_name(run_name: str) -> str:
    return f"flywheel-control-{run_name}"


def check_target(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(
            f"rollout worker count {n!r} is invalid: give an integer >= 1 (a run needs at least one rollout worker)"
        )
    return n


@ray.remote(num_cpus=0)
class RunControl:
    def __init__(self, run_name: str, rollout_workers: int):
        self._auth = Verifier(read_run_secret())
        self.report = MembershipReport(run_name, rollout_workers, ())
        self.target = rollout_workers

    def set_rollout_workers(self, n: int, signed: Signed | None = None) -> MembershipReport:
        self._auth.check(signed, "set_rollout_workers", n)
        self.target = check_target(n)
        return self.report

    def poll(self, report: MembershipReport, signed: Signed | None = None) -> int:
        """The loop's heartbeat: store its membership, return the desired worker count."""
        self._auth.check(signed, "poll", report)
        self.report = report
        return self.target

    def membership(self, signed: Signed | None = None) -> MembershipReport:
        self._auth.check(signed, "membership")
        return self.report


def start_control(run_name: str, rollout_workers: int):
    """Register the run's control actor; a clear error if a run of that name is already active here."""
    secret = read_run_secret().decode()
    try:
        handle = RunControl.options(
            name=control_name(run_name),
            namespace=NAMESPACE,
            get_if_exists=False,
            runtime_env={"env_vars": {RUN_SECRET_ENV: secret}},
        ).remote(run_name, rollout_workers)
    except ValueError as e:
        raise RuntimeError(
            f"a run named {run_name!r} is already active on this Ray cluster ({e}); "
            "give this run another run.name or wait for the other to finish"
        ) from None
    address = ray.get_runtime_context().gcs_address
    log.info(f"scale this run's rollout workers with: flywheel scale rollout N --run {run_name} --address {address}")
    return handle


class ControlClient:
    """The loop's side: at most one poll in flight, at most one per POLL_INTERVAL_S, never blocking."""

    def __init__(self, handle, secret: bytes | None = None):
        self.handle = handle
        self._secret = secret if secret is not None else read_run_secret()
        self._ref = None
        self._next = 0.0

    def poll(self, report_fn) -> int | None:
        """The desired worker count if a poll answered since the last call, else None."""
        now = time.monotonic()
        if now < self._next:
            return None
        self._next = now + POLL_INTERVAL_S
        target = None
        if self._ref is not None:
            if not ray.wait([self._ref], timeout=0)[0]:
                return None
            try:
                target = ray.get(self._ref)
            except ray.exceptions.RayActorError:  # the control actor is gone: keep the current target
                target = None
        report = report_fn()
        self._ref = self.handle.poll.remote(report, sign(self._secret, "poll", report))
        return target


def _reachable(address: str, timeout_s: float = 3.0) -> bool:
    """A quick TCP probe of a `host:port` GCS address (ray.init retries an unreachable one for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return True  # "auto", "ray://..." and the like: let ray.init judge
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _connect(address: str | None) -> str:
    if ray.is_initialized():
        return "the Ray cluster this process is connected to"
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    if not _reachable(address):
        raise RunNotFound(
            f"no Ray cluster answers at {address!r}; pass the run's cluster address (host:port of its GCS) with "
            "--address"
        )
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise RunNotFound(
            f"cannot reach a Ray cluster at {address!r} ({str(e).splitlines()[0]}); "
            "pass the run's cluster address with --address (or RAY_ADDRESS)"
        ) from None
    return f"the Ray cluster at {address!r}"


def get_control(run_name: str, address: str | None = None):
    where = _connect(address)
    try:
        return ray.get_actor(control_name(run_name), namespace=NAMESPACE)
    except ValueError:
        raise RunNotFound(
            f"no active run named {run_name!r} on {where}: is the run still going, "
            f"is its run.name {run_name!r}, and is --address its cluster?"
        ) from None


def scale_rollout(
    run_name: str, n: int, address: str | None = None, wait_s: float = 0.0, secret: bytes | None = None
) -> MembershipReport:
    """Set run `run_name`'s rollout worker count to `n`; return its membership.

    `secret`: the run's secret (default: $FLYWHEEL_RUN_SECRET). With `wait_s` > 0, wait up to that long
    for `n` active workers (starting one takes seconds). `AuthError` if the secret is not the run's."""
    check_target(n)
    secret = secret if secret is not None else read_run_secret()
    control = get_control(run_name, address)
    report = _signed_call(control.set_rollout_workers, secret, "set_rollout_workers", n)
    deadline = time.monotonic() + wait_s
    while wait_s > 0 and time.monotonic() < deadline:
        report = _signed_call(control.membership, secret, "membership")
        if report.target == n and report.active == n and len(report.members) == n:
            break
        time.sleep(0.5)
    return report


def _signed_call(method, secret: bytes, name: str, *args):
    """Call an actor method with the signature it checks; its `AuthError` comes back as itself."""
    try:
        return ray.get(method.remote(*args, sign(secret, name, *args)))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, AuthError):
            raise e.cause from None
        raise
