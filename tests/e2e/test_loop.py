"""The whole loop on the small config: off-policy data from several versions, staleness bounded, outputs written."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.e2e.runs import REPO, driver_cmd

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _run(tmp_path: Path, *overrides: str) -> Path:
    out = subprocess.run(
        driver_cmd(tmp_path, *overrides, name="loop"), cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return tmp_path / "loop"


def test_async_loop_consumes_several_versions_within_bound(tmp_path):
    run = _run(
        tmp_path,
        "replay.max_staleness=1",
        "run.max_learner_steps=8",
        "learner.objective.policy_loss=decoupled_ppo",
        "learner.objective.policy_loss.tis_cap=2.0",
    )
    summary = json.loads((run / "summary.json").read_text())
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "learner_step"]
    assert len(steps) == summary["learner_steps"] == 8
    consumed = {v for r in steps for v in r["trace_versions"]}
    assert len(consumed) >= 2, consumed
    for r in steps:  # every consumed trace is within max_staleness of the learner's version
        assert all(r["policy_version"] - v <= 1 for v in r["trace_versions"]), r
    assert summary["max_staleness_seen"] <= 1
    for key in (
        "eval_accuracy_initial",
        "eval_accuracy_final",
        "wall_s",
        "learner_steps",
        "policy_versions_published",
        "traces_consumed",
        "max_staleness_seen",
    ):
        assert key in summary
    assert 0.0 <= summary["eval_accuracy_initial"] <= 1.0 and 0.0 <= summary["eval_accuracy_final"] <= 1.0
    assert (run / "report.png").stat().st_size > 10_000
    assert (run / "final_model" / "config.json").exists() and list((run / "final_model").glob("*.safetensors"))
    config = json.loads((run / "config.json").read_text())
    assert config["replay"]["max_staleness"] == 1


def test_synchronous_mode_never_trains_on_stale_data(tmp_path):
    run = _run(
        tmp_path, "replay.max_staleness=0", "run.max_learner_steps=4", "learner.num_ranks=1", "learner.zero_stage=0"
    )
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "learner_step"]
    assert [r["trace_versions"] for r in steps] == [[0], [1], [2], [3]]
    assert json.loads((run / "summary.json").read_text())["max_staleness_seen"] == 0


@pytest.mark.faults
def test_hanging_and_raising_reward_functions_do_not_stall_the_run(tmp_path):
    run = _run(
        tmp_path,
        "reward.function=tests.e2e.hostile_rewards:hangs_or_raises",
        "reward.isolation=process",
        "reward.timeout_s=0.5",
        "reward.on_failure=zero",
        "run.max_learner_steps=4",
        "rollout.prompts_per_step=8",
        "learner.num_ranks=1",
        "learner.zero_stage=0",
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["learner_steps"] == 4
    assert summary["reward_timeouts"] > 0 and summary["reward_errors"] > 0, summary
    assert summary["dropped_groups"] == 0  # on_failure=zero scores failures as 0 and keeps the group


def test_a_dedicated_eval_worker_evaluates_the_published_weights_and_takes_no_rollout_call(tmp_path):
    from rollout.config import RolloutConfig
    from rollout.sampled_eval import BatchEvaluator, make_batches
    from services.config import load_config

    overrides = ["run.eval_worker=dedicated", "rollout.engine=hf", "run.max_learner_steps=6", "run.eval_every_steps=2"]
    overrides += ["task.max_digits=1", "cold_start.steps=150"]  # accuracy well above 0: a wrong load shows
    run = _run(tmp_path, *overrides)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval" and r["policy_version"] > 0]
    summary = json.loads((run / "summary.json").read_text())
    eval_worker = 1  # e2e_small has one rollout worker (id 0); the eval worker comes last
    assert evals and {r["worker"] for r in evals} == {eval_worker}
    assert {r["worker_id"] for r in records if r["kind"] == "rollout"} == {0}
    assert max(r["policy_version"] for r in evals) == summary["policy_versions_published"]
    # The last evaluation scored the final weights: a fresh engine on final_model gives the same accuracy.
    cfg = load_config(REPO / "deploy/configs/e2e_small.yaml", overrides)
    rollout_cfg = RolloutConfig(**{**cfg.rollout.model_dump(), "engine": "hf"})
    evaluator = BatchEvaluator(rollout_cfg, cfg.task, run / "final_model", cfg.render)
    problems = evaluator.task.eval_set()
    outcomes = [o for b in make_batches(problems, 1, len(problems), seed=0) for o in evaluator.evaluate(b)]
    fresh = sum(o.greedy_score >= 1.0 for o in outcomes) / len(problems)
    assert summary["eval_accuracy_final"] == fresh, (summary["eval_accuracy_final"], fresh)
