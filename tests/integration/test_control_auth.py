"""The run's control actor on a real Ray: only calls signed with the run's secret change or read it."""

from __future__ import annotations

import pytest
import ray

from services.auth import AuthError, read_run_secret, sign
from services.control import ControlClient, _signed_call, scale_rollout, start_control
from services.membership import MembershipReport

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_only_the_runs_secret_steers_the_run():
    handle = start_control("auth-test", 2)
    try:
        with pytest.raises(ray.exceptions.RayTaskError, match="unsigned call"):
            ray.get(handle.set_rollout_workers.remote(7))  # any client of the cluster, without the secret
        with pytest.raises(AuthError, match="bad signature"):
            scale_rollout("auth-test", 7, secret=b"not this run's")
        with pytest.raises(AuthError, match="bad signature"):
            _signed_call(handle.membership, b"guess", "membership")
        client = ControlClient(handle)  # the loop's side, with the driver's secret
        client._next = 0.0
        assert client.poll(lambda: MembershipReport("auth-test", 2, ())) is None  # first poll is in flight
        assert scale_rollout("auth-test", 3).target == 2  # the report the loop last pushed
        signed = sign(read_run_secret(), "set_rollout_workers", 4)
        ray.get(handle.set_rollout_workers.remote(4, signed))
        with pytest.raises(ray.exceptions.RayTaskError, match="already used"):
            ray.get(handle.set_rollout_workers.remote(4, signed))  # replayed
        assert (
            ray.get(
                handle.poll.remote(
                    MembershipReport("auth-test", 4, ()),
                    sign(read_run_secret(), "poll", MembershipReport("auth-test", 4, ())),
                )
            )
            == 4
        )
    finally:
        ray.kill(handle)
