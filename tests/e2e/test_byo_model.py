"""Bring your own model, end to end: the built-in Qwen-shaped BPE model (no BOS, ChatML template, stops at
<|im_end|>) on a reasoning-gym task, through the driver with the vLLM engine and with the HF engine; and an
evaluation that really uses the user's `reward.function`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SMALL = [
    "model.vocab_size=320",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=2",
    "model.tokenizer_corpus_problems=500",
    "task.eval_size=32",
    "cold_start.steps=20",
    "rollout.group_size=4",
    "rollout.prompts_per_step=4",
    "rollout.drop_uniform_groups=false",  # a barely trained model gets every answer wrong: keep those groups
    "learner.objective.filter_zero_variance_groups=false",
    "learner.groups_per_step=4",
    "run.max_learner_steps=4",
    "run.eval_every_steps=2",
    "run.max_wall_s=400",
]


def _run(tmp_path: Path, name: str, *overrides: str) -> tuple[dict, list[dict]]:
    cmd = [
        sys.executable,
        "-m",
        "services.driver",
        "--config",
        "deploy/configs/bpe_reasoning_cpu.yaml",
        *SMALL,
        f"run.runs_dir={tmp_path}",
        f"run.name={name}",
        "run.progress=false",
        *overrides,
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return json.loads((tmp_path / name / "summary.json").read_text()), records


def _check_run(summary: dict, records: list[dict]) -> None:
    assert summary["learner_steps"] == 4 and summary["policy_versions_published"] >= 4
    assert 0.0 <= summary["eval_accuracy_initial"] <= 1.0 and 0.0 <= summary["eval_accuracy_final"] <= 1.0
    rollouts = [r for r in records if r["kind"] == "rollout"]
    assert rollouts and all(r["traces"] == 4 * r["groups"] for r in rollouts)
    assert len([r for r in records if r["kind"] == "eval"]) >= 2


def test_reasoning_gym_run_with_vllm(tmp_path):
    summary, records = _run(tmp_path, "byo-vllm")
    _check_run(summary, records)
    config = json.loads((tmp_path / "byo-vllm" / "config.json").read_text())
    assert config["render"]["mode"] == "chat" and config["task"]["kind"] == "reasoning_gym"
    assert (tmp_path / "byo-vllm" / "final_model" / "chat_template.jinja").exists()


def test_reasoning_gym_run_with_hf_engine_and_a_custom_reward_function(tmp_path):
    summary, records = _run(
        tmp_path, "byo-hf", "rollout.engine=hf", "reward.function=tests.e2e.custom_rewards:always_one"
    )
    _check_run(summary, records)
    # The task's verifier gives a 20-step cold start nearly nothing; the user's function gives everything 1.0,
    # so these accuracies and rewards can only come from that function.
    assert summary["eval_accuracy_initial"] == summary["eval_accuracy_final"] == 1.0
    assert all(r["reward_mean"] == 1.0 for r in records if r["kind"] == "rollout")
