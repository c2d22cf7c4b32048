"""`python -m services.evaluate` in-process on the HF engine: arguments, the JSON record, the figure, the table."""

from __future__ import annotations

import json

import pytest

from rollout import passk
from services import evaluate
from services.passk_plot import format_table

CONFIG = "deploy/configs/e2e_small.yaml"


def test_bad_arguments_exit_2_naming_the_problem(capsys):
    for argv, message in [
        (["--config", CONFIG, "--model", "m", "--n", "4", "--k", "1,8"], "--k 8 exceeds --n 4"),
        (["--config", CONFIG, "--model", "m", "--label", "a", "--label", "b"], "2 --label for 1 --model"),
        (["--config", CONFIG, "--model", "m", "--k", "1,x"], "comma-separated integers"),
        (["--config", CONFIG], "--model"),
    ]:
        with pytest.raises(SystemExit) as e:
            evaluate.parse_args(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err


def test_missing_model_dir_exits_2(tmp_path, capsys):
    assert evaluate.main(["--config", CONFIG, "--model", str(tmp_path / "nope")]) == 2
    assert "holds no config.json" in capsys.readouterr().err
    from services import cli

    assert cli.main(["evaluate", "--config", CONFIG, "--model", str(tmp_path / "nope")]) == 2  # flywheel evaluate
    assert "holds no config.json" in capsys.readouterr().err


def test_two_models_one_json_and_one_figure(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--config", CONFIG, "--model", str(tiny_model_dir), "--model", str(tiny_model_dir)]
    argv += ["--label", "a", "--label", "b", "--n", "6", "--k", "1,2,6", "--limit", "5", "--temperature", "1.5"]
    argv += ["--batch-sequences", "12", "--out", str(out), "rollout.engine=hf"]
    assert evaluate.main(argv) == 0
    data = json.loads((out / "passk.json").read_text())
    s = data["settings"]
    assert (s["n"], s["ks"], s["temperature"], s["num_prompts"], s["engine"]) == (6, [1, 2, 6], 1.5, 5, "hf")
    a, b = data["models"]
    assert (a["label"], b["label"]) == ("a", "b")
    assert a["correct_per_prompt"] == b["correct_per_prompt"]  # same model, same seeds: same samples
    assert len(a["correct_per_prompt"]) == 5 and all(0 <= c <= 6 for c in a["correct_per_prompt"])
    curve = {p["k"]: p for p in a["curve"]}
    for k in (1, 2, 6):  # the curve is the estimator applied to the recorded per-prompt counts
        want = sum(passk.pass_at_k(6, c, k) for c in a["correct_per_prompt"]) / 5
        assert curve[k]["pass_at_k"] == pytest.approx(want)
    assert 0.0 <= a["greedy_pass_at_1"] <= 1.0 and len(a["greedy_score_per_prompt"]) == 5
    assert a["sampled_tokens"] > 0 and 0.0 <= a["truncated_fraction"] <= 1.0
    assert (out / "passk.png").stat().st_size > 10_000
    assert "| 6 |" in capsys.readouterr().out


def test_reasoning_gym_task_on_a_chat_bpe_model(bpe_model_dir, tmp_path):
    """The eval split of a source that measures rendered prompts (reasoning-gym, datasets) is built with the
    run's renderer: the chat template, no BOS."""
    out = tmp_path / "eval"
    argv = ["--config", "deploy/configs/bpe_reasoning_cpu.yaml", "--model", str(bpe_model_dir), "--n", "2"]
    argv += ["--limit", "3", "--out", str(out), "rollout.engine=hf", "task.eval_size=3", "task.max_prompt_tokens=80"]
    assert evaluate.main(argv) == 0
    data = json.loads((out / "passk.json").read_text())
    assert data["settings"]["num_prompts"] == 3 and data["settings"]["task"]["kind"] == "reasoning_gym"
    assert len(data["models"][0]["correct_per_prompt"]) == 3


def test_table_has_a_row_per_k_and_greedy():
    curve = [{"k": k, "pass_at_k": 0.1 * k, "maj_at_k": 0.05 * k} for k in (1, 2)]
    text = format_table([{"label": "m", "curve": curve, "greedy_pass_at_1": 0.5}])
    assert text.splitlines()[2] == "| 1 | 0.100 | 0.050 |"
    assert text.splitlines()[-1] == "| greedy pass@1 | 0.500 | - |"
