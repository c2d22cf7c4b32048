"""`ray job submit` against a real local head runs the driver to SUCCEEDED and writes summary.json."""

from __future__ import annotations

import json

import pytest

from tests.local_ray import job_logs, local_ray_head, submit_driver, wait_job

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_ray_job_submit_small_config(tmp_path):
    with local_ray_head() as (env, address):
        job_id = submit_driver(env, address, tmp_path, "job")
        status = wait_job(env, address, job_id, timeout_s=900)
        if status != "SUCCEEDED":
            pytest.fail(f"job {job_id} ended {status}:\n{job_logs(env, address, job_id)}")
    summary = json.loads((tmp_path / "job" / "summary.json").read_text())
    assert summary["learner_steps"] == 6
    assert summary["policy_versions_published"] >= 6
    assert 0.0 <= summary["eval_accuracy_final"] <= 1.0
