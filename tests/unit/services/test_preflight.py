"""Start-up checks with the tokenizer (`--dry-run` and before the cold start): the GPU config's dry run on a
Qwen-like tokenizer, and exit code 2 naming the field for each setup error."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.config import ConfigError, load_config
from services.driver import main
from services.preflight import preflight

REPO = Path(__file__).resolve().parents[3]
MATH = [
    {"problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?", "answer": "\\frac{3}{4}"},
    {"problem": "Solve $2x = 10$ for $x$.", "answer": "5"},
    {"problem": "What is $\\sqrt{49}$?", "answer": "7"},
    {"problem": "Compute $3 \\cdot 4$.", "answer": "12"},
]


@pytest.fixture(scope="module")
def qwen_like(tmp_path_factory):
    """A Qwen-like checkpoint directory (no BOS, ChatML template, <|im_end|>) and a Parquet math dataset."""
    from learner.bpe_model import BPEModelSpec, build_bpe_model

    root = tmp_path_factory.mktemp("qwen_like")
    corpus = [r[k] for r in MATH for k in ("problem", "answer")] + ["Please reason step by step \\boxed{}"]
    spec = BPEModelSpec(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    model = build_bpe_model(root / "model", spec, corpus)
    pq.write_table(pa.Table.from_pylist(MATH * 3), root / "math.parquet")
    return model, root / "math.parquet"


def test_gpu_config_dry_run_with_a_qwen_like_tokenizer(qwen_like, capsys):
    model, data = qwen_like
    rc = main(
        [
            "--config",
            str(REPO / "deploy/configs/gpu_1p5b.yaml"),
            "--dry-run",
            f"model.path={model}",
            f"task.path={data}",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "bos=None" in out and "eos='<|im_end|>'" in out and "chat template: yes" in out
    assert "'<|im_end|>'" in out and "'<|endoftext|>'" in out  # stop tokens: the template's end + generation eos
    assert "<|im_start|>system\\nPlease reason step by step" in out and "<|im_start|>assistant\\n" in out
    assert out.count("-> score 1") == 2 and '"kind": "math_verify"' in out


def _rc(capsys, *overrides: str) -> tuple[int, str]:
    rc = main(["--config", str(REPO / "deploy/configs/gpu_1p5b.yaml"), "--dry-run", *overrides])
    return rc, capsys.readouterr().err


def test_chat_template_missing_exits_2_naming_render_mode(qwen_like, tiny_model_dir, capsys):
    rc, err = _rc(capsys, f"model.path={tiny_model_dir}", f"task.path={qwen_like[1]}", "render.stop_tokens=[]")
    assert rc == 2 and "render.mode='chat'" in err and "chat_template" in err


def test_missing_stop_token_exits_2_naming_render_stop_tokens(qwen_like, capsys):
    model, data = qwen_like
    rc, err = _rc(capsys, f"model.path={model}", f"task.path={data}", "render.stop_tokens=['<|eot_id|>']")
    assert rc == 2 and "render.stop_tokens: '<|eot_id|>' is not a token" in err


def test_reference_answer_failing_its_verifier_exits_2_naming_task_verifier(qwen_like, tmp_path, capsys):
    model, _ = qwen_like
    words = [{"problem": f"Spell {i}", "answer": w} for i, w in enumerate(["forty two", "seven", "nine", "ten"])]
    pq.write_table(pa.Table.from_pylist(words), tmp_path / "words.parquet")
    data = f"task.path={tmp_path / 'words.parquet'}"
    rc, err = _rc(capsys, f"model.path={model}", data, "task.verifier={kind: numeric}")  # numbers only
    assert rc == 2 and "task.verifier" in err and "scores 0" in err and "answer '" in err
    rc, _ = _rc(capsys, f"model.path={model}", data, "task.verifier={kind: exact}")
    assert rc == 0  # exact match reads word answers


def test_a_users_reward_function_is_reported_not_enforced(qwen_like):
    model, data = qwen_like
    cfg = load_config(
        REPO / "deploy/configs/gpu_1p5b.yaml",
        [f"model.path={model}", f"task.path={data}", "reward.function=tests.e2e.custom_rewards:always_one"],
    )
    report = preflight(cfg, model)
    assert "reward.function tests.e2e.custom_rewards:always_one" in report.verifier
    assert [p.score for p in report.prompts] == [1.0, 1.0]


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["render.mode=chat"], "render.mode='chat' but the built-in char_llama"),
        (["task.kind=reasoning_gym", "task.max_prompt_tokens=32"], "model.builtin=bpe_qwen2"),
    ],
)
def test_builtin_char_model_config_errors(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, overrides)


def test_worked_solutions_are_checked_against_the_task(tmp_path, capsys):
    config = str(REPO / "deploy/configs/bpe_reasoning_cpu.yaml")
    small = ["model.tokenizer_corpus_problems=200", "model.hidden_size=64", "model.num_attention_heads=2"]
    small += [f"run.cache_dir={tmp_path}", "cold_start.worked_solutions=column_addition"]
    assert main(["--config", config, "--dry-run", *small]) == 0
    out = capsys.readouterr().out
    assert "<answer>" in out and "=" in out.split("reference completion")[1]  # the steps precede the answer
    minus = 'task.params={min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1, operators: ["-"]}'
    assert main(["--config", config, "--dry-run", *small, minus]) == 2
    assert "cold_start.worked_solutions: column_addition writes sums" in capsys.readouterr().err


def test_the_reasoning_config_dry_runs_and_running_sum_refuses_a_task_it_cannot_solve(tmp_path, capsys):
    config = str(REPO / "deploy/configs/reasoning_cpu.yaml")
    small = ["model.tokenizer_corpus_problems=200", "model.hidden_size=64", "model.num_attention_heads=2"]
    small += ["model.num_key_value_heads=1", "model.num_hidden_layers=1", f"run.cache_dir={tmp_path}"]
    assert main(["--config", config, "--dry-run", *small]) == 0
    out = capsys.readouterr().out.split("reference completion")[1]
    assert " = " in out and "<answer>" in out  # running sums precede the answer
    times = "task.name=basic_arithmetic", 'task.params={min_terms: 2, max_terms: 3, operators: ["*"]}'
    assert main(["--config", config, "--dry-run", *small, *times]) == 2
    assert "cold_start.worked_solutions: running_sum writes chains of + and -" in capsys.readouterr().err
