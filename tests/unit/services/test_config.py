"""Run-config validation: bad input fails at start-up naming the field; every shipped config dry-runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.config import ConfigError, check_model_path, load_config
from services.driver import main
from services.placement import plan

REPO = Path(__file__).resolve().parents[3]
CONFIGS = sorted((REPO / "deploy" / "configs").glob("*.yaml"))


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_defaults_validate():
    cfg = load_config(None)
    assert cfg.rollout.group_size >= 2 and cfg.learner.temperature == cfg.rollout.temperature


@pytest.mark.parametrize(
    "yaml_text, field",
    [
        ("learner:\n  lrr: 0.1\n", "learner.lrr"),  # unknown key
        ("rollout:\n  group_size: many\n", "rollout.group_size"),  # wrong type
        ("rollout:\n  group_size: 1\n", "rollout.group_size"),  # group of one: no baseline
        ("learner:\n  temperature: 0.7\n", "learner.temperature"),  # cross-section rule
        ("learner:\n  num_ranks: 3\n  groups_per_step: 8\n", "learner.groups_per_step"),
        ("bogus_section: {}\n", "bogus_section"),
        # uniform groups carry signal under a batch-whitened advantage: dropping them would bias it
        (
            "rollout:\n  drop_uniform_groups: true\nlearner:\n  objective:\n    advantage: reinforce_pp\n",
            "rollout.drop_uniform_groups",
        ),
        (
            "rollout:\n  group_size: 4\nlearner:\n  objective:\n    advantage: {kind: pass_at_k, k: 8}\n",
            "learner.objective.advantage",
        ),
        # the dedicated eval worker loads rank 0's snapshot, which ZeRO-3's streamed publish does not keep
        ("run:\n  eval_worker: dedicated\nlearner:\n  zero_stage: 3\n", "run.eval_worker"),
        # a bounded prompt source whose longest prompt plus the longest completion does not fit the engine
        (
            "model:\n  builtin: bpe_qwen2\n"
            "task:\n  kind: reasoning_gym\n  name: basic_arithmetic\n  max_prompt_tokens: 60\n"
            "rollout:\n  max_new_tokens: 8\n  max_model_len: 64\n",
            "task.max_prompt_tokens",
        ),
    ],
)
def test_bad_config_names_the_field(tmp_path, yaml_text, field):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, yaml_text))
    assert field in str(e.value)


def test_pass_at_k_estimators_may_drop_uniform_groups():
    for adv in ("pass_at_k", "best_of_group"):  # uniform groups get exactly zero advantage under both
        cfg = load_config(None, ["rollout.drop_uniform_groups=true", f"learner.objective.advantage={adv}"])
        assert cfg.learner.objective.advantage.kind == adv


def test_override_wrong_type_names_field():
    with pytest.raises(ConfigError, match="learner.lr"):
        load_config(None, ["learner.lr=fast"])


def test_override_applies():
    assert load_config(None, ["learner.lr=0.5", "run.name=x"]).learner.lr == 0.5


def test_nonexistent_model_path_fails_before_anything_starts(tmp_path, capsys):
    cfg = _write(tmp_path, f"model:\n  path: {tmp_path / 'nope'}\n")
    with pytest.raises(ConfigError, match="model.path"):
        check_model_path(load_config(cfg))
    assert main(["--config", str(cfg)]) == 2
    assert "model.path" in capsys.readouterr().err


def test_model_path_without_weights_rejected(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="weights"):
        check_model_path(load_config(None, [f"model.path={d}"]))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("deploy/configs/nope.yaml")


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_dry_run_every_shipped_config(config):
    out = subprocess.run(
        [sys.executable, "-m", "services.driver", "--config", str(config), "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    cfg = load_config(config)
    specs = plan(cfg)
    assert len([s for s in specs if s.role == "learner_rank"]) == cfg.learner.num_ranks
    assert len([s for s in specs if s.role == "rollout_worker"]) == cfg.rollout.num_workers
    assert "learner_rank" in out.stdout and "rollout_worker" in out.stdout
    total = next(line for line in out.stdout.splitlines() if line.startswith("total"))
    assert total.split()[1:] == [f"{sum(s.num_cpus for s in specs):g}", f"{sum(s.num_gpus for s in specs):g}"]


def test_inflight_pause_needs_the_vllm_engine():
    with pytest.raises(ConfigError, match="inflight='pause'.*rollout.engine='hf'"):
        load_config(REPO / "deploy/configs/e2e_small.yaml", ["learner.weight_sync.inflight=pause", "rollout.engine=hf"])
    assert (
        load_config(
            REPO / "deploy/configs/e2e_small.yaml", ["learner.weight_sync.inflight=pause"]
        ).learner.weight_sync.inflight
        == "pause"
    )


def test_the_plan_lists_the_dedicated_eval_worker_after_the_rollout_workers():
    cfg = load_config(REPO / "deploy/configs/e2e_small.yaml", ["run.eval_worker=dedicated", "rollout.num_workers=2"])
    specs = [s for s in plan(cfg) if s.role in ("rollout_worker", "eval_worker")]
    assert [(s.role, s.index) for s in specs] == [("rollout_worker", 0), ("rollout_worker", 1), ("eval_worker", 2)]
    assert specs[2].num_cpus == cfg.rollout.num_cpus_per_worker
