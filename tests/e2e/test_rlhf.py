"""RLHF end to end, small: train a reward model for a few steps, then RL through the reward-model actor; and PPO
with a critic initialised from that reward model (the four-model setup), resumed from its checkpoint."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _pairs(path: Path) -> Path:
    rng = random.Random(0)
    rows = []
    for _ in range(200):
        a, b = rng.randrange(100), rng.randrange(100)
        wrong = a + b + rng.choice([-10, -1, 1, 2, 10])
        rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(max(wrong, 0)), "margin": 1.0})
    rows = [r for r in rows if r["chosen"] != r["rejected"]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, "--config", "deploy/configs/e2e_small.yaml", *args]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> Path:
    """A reward model trained for 6 steps by `python -m services.train_rm` (its metrics checked)."""
    from transformers import AutoModelForSequenceClassification

    tmp_path = tmp_path_factory.mktemp("rm")
    data = _pairs(tmp_path / "pairs.jsonl")
    _run(
        "services.train_rm",
        f"run.runs_dir={tmp_path}",
        "run.name=rm",
        f"preferences.path={data}",
        "preferences.max_tokens=32",
        "rm_training.steps=6",
        "rm_training.pairs_per_step=8",
        "rm_training.eval_every_steps=3",
    )
    rm_dir = tmp_path / "rm" / "reward_model"
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    assert rm.config.num_labels == 1
    records = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["learner_step"] for r in records] == list(range(1, 7))
    assert 0.0 <= records[-1]["rm/eval_pairwise_accuracy"] <= 1.0
    return rm_dir


def test_reward_model_then_rl_through_the_reward_model_actor(tmp_path, reward_model):
    rm_dir = reward_model
    _run(
        "services.driver",
        f"run.runs_dir={tmp_path}",
        "run.name=rl",
        "run.max_learner_steps=3",
        "run.eval_every_steps=3",
        "learner.num_ranks=1",
        "learner.zero_stage=0",
        "reward.kind=model",
        f"reward.model.path={rm_dir}",
        "reward.model.placement=actor",
        "reward.model.num_cpus_per_actor=0",
        "reward.model.normalize=running",
        "learner.objective.kl_ref_coef=0.01",
        # A worker joins a weight group between rollout calls (inflight=drain), and here each call also waits
        # for the reward-model actor, which shares the cores: on a loaded 2-core box the first join took
        # ~61 s. The timeout bounds only a member that never comes; a passing run does not wait for it.
        "learner.weight_sync.timeout_s=300",
        "reward.model.timeout_s=300",
    )
    run = tmp_path / "rl"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["learner_steps"] == 3 and summary["reward_errors"] == 0 and summary["reward_timeouts"] == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rollouts = [r for r in records if r["kind"] == "rollout"]
    assert rollouts and all(r["gold_reward_mean"] is not None and r["model_score_mean"] is not None for r in rollouts)
    # the reward is the normalised RM score, not the verifier's 0/1
    assert any(r["reward_mean"] not in (0.0, 1.0) for r in rollouts)
    assert any("kl_ref" in r for r in records if r["kind"] == "learner_step")
    assert (run / "rlhf.png").stat().st_size > 10_000


def _learner_records(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "learner_step"]


def test_ppo_with_a_critic_initialised_from_the_reward_model_then_resume(tmp_path, reward_model):
    """The four-model setup on 2 ZeRO-2 ranks: policy, reward model (the reward), a critic from the same RM
    (GAE values), frozen reference. The critic trains and the run checkpoints at its stop; a resume loads the
    checkpoint with the critic in it and continues."""
    from safetensors.torch import load_file

    common = (
        f"run.runs_dir={tmp_path}",
        "run.name=ppo",
        "reward.kind=model",
        f"reward.model.path={reward_model}",
        "reward.model.placement=worker",
        f"learner.critic.path={reward_model}",
        "learner.critic.lr=1e-4",
        "learner.objective.advantage={kind: gae, gamma: 1.0, lam: 0.95, value_coef: 0.5}",
        "learner.objective.kl_behaviour_coef=0.0",
        "learner.objective.kl_ref_coef=0.05",
        "learner.objective.kl_ref_in=reward",
        "learner.weight_sync.timeout_s=300",
    )
    _run("services.driver", *common, "run.max_learner_steps=3", "run.eval_every_steps=3")
    run = tmp_path / "ppo"
    steps = _learner_records(run)
    assert len(steps) == 3 and all(r["value_loss"] > 0 and r["kl_ref"] is not None for r in steps)
    assert (run / "checkpoints" / "latest").exists()
    final = load_file(next((run / "final_model").glob("*.safetensors")))
    assert final and not any("critic" in n or n.startswith("score") for n in final)  # the policy alone

    _run("services.driver", *common, "run.max_learner_steps=5", "run.eval_every_steps=5", "--resume", str(run))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["learner_steps"] == 5 and summary["resumes"] == 1
    assert len(_learner_records(run)) == 5
