import json

import pytest

from services.config import ConfigError, load_config
from services.placement import plan
from services.train_rm import load_preference_config, main


def test_config_sections_and_errors(tmp_path):
    run_cfg, sections = load_preference_config(
        "deploy/configs/preferences/rm_tiny_cpu.yaml",
        ["rm_training.steps=7", "dpo.kind=cdpo", "dpo.label_smoothing=0.1"],
    )
    assert sections.rm_training.steps == 7 and sections.dpo.kind == "cdpo"
    assert run_cfg.task.answer_format == "reversed_padded"
    with pytest.raises(ConfigError, match=r"rm_training.stepz: unknown key"):
        load_preference_config("deploy/configs/preferences/rm_tiny_cpu.yaml", ["rm_training.stepz=7"])
    with pytest.raises(ConfigError, match=r"dpo.kind"):
        load_preference_config("deploy/configs/preferences/rm_tiny_cpu.yaml", ["dpo.kind=kto"])


def test_cli_exits_2_on_bad_config_and_missing_data(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--config", "deploy/configs/preferences/rm_tiny_cpu.yaml", "rm_training.lr=-1"]) == 2
    assert "rm_training.lr" in capsys.readouterr().err


def test_plan_lists_reward_model_actors():
    cfg = load_config(
        "deploy/configs/rlhf_tiny_cpu.yaml", ["reward.model.num_actors=2", "reward.model.num_cpus_per_actor=0.5"]
    )
    rm = [s for s in plan(cfg) if s.role == "reward_model"]
    assert [(s.index, s.num_cpus) for s in rm] == [(0, 0.5), (1, 0.5)]
    worker_side = load_config("deploy/configs/rlhf_tiny_cpu.yaml", ["reward.model.placement=worker"])
    assert not [s for s in plan(worker_side) if s.role == "reward_model"]


def test_reward_model_path_is_checked_at_start_up(tmp_path):
    from services.config import check_model_path

    cfg = load_config("deploy/configs/rlhf_tiny_cpu.yaml", [f"reward.model.path={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match=r"reward.model.path=.* is not a directory.*services.train_rm"):
        check_model_path(cfg)


def test_verified_only_keeps_verified_pairs_counts_them_and_refuses_an_empty_set(tiny_model_dir, tmp_path):
    from rollout.datasets import DatasetError
    from rollout.preferences import LoadedPreferences, PreferenceDataConfig, load_preferences
    from rollout.render import RenderConfig, Renderer
    from services.train_rm import keep_verified

    assert not load_preference_config("deploy/configs/preferences/rm_tiny_cpu.yaml", [])[1].rm_training.verified_only
    run_cfg, _ = load_preference_config(
        "deploy/configs/preferences/rm_tiny_cpu.yaml", ["task.answer_format=plain", "rm_training.verified_only=true"]
    )
    renderer = Renderer.from_pretrained(RenderConfig(), tiny_model_dir)
    rows = [
        {"prompt": f"{a}+{a}=", "chosen": str(2 * a), "rejected": str(2 * a + 1), "answer": str(2 * a)}
        for a in range(6)
    ]
    rows += [
        {"prompt": f"{a}+10=", "chosen": str(a + 12), "rejected": str(a + 13), "answer": str(a + 10)} for a in range(4)
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_preferences(PreferenceDataConfig(path=str(path), eval_fraction=0.5, eval_size=5), renderer)
    kept, counts = keep_verified(data, run_cfg, renderer)
    assert {p.problem.prompt for p in kept.train + kept.eval} == {f"{a}+{a}=" for a in range(6)}
    assert counts["train"]["kept"] + counts["eval"]["kept"] == 6
    assert counts["train"]["dropped"] + counts["eval"]["dropped"] == 4
    assert counts["train"]["kept"] == len(kept.train) and counts["eval"]["kept"] == len(kept.eval)
    wrong_only = LoadedPreferences([p for p in data.train if "+10=" in p.problem.prompt], data.eval, {})
    with pytest.raises(DatasetError, match=r"verified_only left no verified pair.*answer_key"):
        keep_verified(wrong_only, run_cfg, renderer)


def test_critic_checkpoint_is_checked_at_start_up(tiny_model_dir, tmp_path):
    from learner.reward_model import init_reward_model, save_reward_model
    from services.config import check_model_path
    from services.preflight import preflight

    critic_cfg = "deploy/configs/rlhf_ppo_critic_tiny_cpu.yaml"
    missing = load_config(critic_cfg, [f"learner.critic.path={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match=r"learner.critic.path=.* is not a directory.*services.train_rm"):
        check_model_path(missing)
    causal_lm = load_config(critic_cfg, [f"learner.critic.path={tiny_model_dir}"])
    with pytest.raises(ConfigError, match=r"learner.critic.path=.*num_labels=1"):
        preflight(causal_lm, tiny_model_dir)
    rm = save_reward_model(init_reward_model(tiny_model_dir), tiny_model_dir, tmp_path / "rm")
    preflight(load_config(critic_cfg, [f"learner.critic.path={rm}"]), tiny_model_dir)  # the RM of the policy passes
    with pytest.raises(ConfigError, match=r"learner.critic.path is set.*advantage.kind='grpo'"):
        load_config(critic_cfg, ["learner.objective.advantage=grpo"])


def test_driver_exits_2_on_a_critic_without_a_critic_based_estimator(tmp_path, capsys):
    from services.driver import main as driver_main

    rc = driver_main(["--config", "deploy/configs/tiny_cpu.yaml", f"learner.critic.path={tmp_path}"])
    assert rc == 2 and "learner.critic.path" in capsys.readouterr().err
