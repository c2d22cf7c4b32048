"""A run on a user's JSONL prompt file: hostile rows are skipped and counted, valid rows all train, nothing crashes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.faults]

WORDS = [
    "abc",
    "bad",
    "cab",
    "dace",
    "face",
    "bead",
    "fade",
    "deaf",
    "cafe",
    "aced",
    "babe",
    "dab",
    "fab",
    "ebb",
    "add",
    "bed",
    "fed",
    "cede",
    "deed",
    "feed",
]


def _dataset(path: Path) -> dict[str, int]:
    rows = [json.dumps({"prompt": f"{w}>", "answer": w[::-1]}) for w in WORDS]  # reverse the word
    bad = {
        "invalid_json": ['{"prompt": "abc>", "answer": '],
        "missing_field": [json.dumps({"prompt": "abc>"})],
        "wrong_type": [json.dumps({"prompt": 5, "answer": "x"}), json.dumps(["abc>", "cba"])],
        "empty_prompt": [json.dumps({"prompt": "   ", "answer": "a"})],
        "too_long": [json.dumps({"prompt": "abcdefabcdefabcdefabcdef>", "answer": "x"})],
    }
    lines = rows[:10] + [line for v in bad.values() for line in v] + rows[10:] + [""]
    path.write_text("\n".join(lines) + "\n")
    return {k: len(v) for k, v in bad.items()}


def test_dataset_run_skips_and_counts_bad_rows(tmp_path):
    expected = _dataset(tmp_path / "words.jsonl")
    cfg = yaml.safe_load((REPO / "deploy/configs/e2e_small.yaml").read_text())
    cfg["task"] = {"kind": "dataset", "path": str(tmp_path / "words.jsonl"), "max_prompt_tokens": 12, "eval_size": 4}
    cfg["learner"].update(num_ranks=1, zero_stage=1)
    cfg["run"]["max_learner_steps"] = 3
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [
        sys.executable,
        "-m",
        "services.driver",
        "--config",
        str(tmp_path / "run.yaml"),
        f"run.runs_dir={tmp_path}",
        "run.name=ds",
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    summary = json.loads((tmp_path / "ds" / "summary.json").read_text())
    assert summary["dataset_skipped_rows"] == expected
    assert summary["learner_steps"] == 3
    traces = [json.loads(line) for line in (tmp_path / "ds" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["traces"] for r in traces if r["kind"] == "rollout") > 0


def test_dataset_path_missing_fails_at_start_up(tmp_path):
    cfg = yaml.safe_load((REPO / "deploy/configs/e2e_small.yaml").read_text())
    cfg["task"] = {"kind": "dataset", "path": str(tmp_path / "nope.jsonl"), "max_prompt_tokens": 12}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run(
        [sys.executable, "-m", "services.driver", "--config", str(tmp_path / "run.yaml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "task.path" in out.stderr, out.stderr[-2000:]


def test_dataset_with_too_few_valid_rows_fails_cleanly(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "abc>"}\nnot json\n')
    cfg = yaml.safe_load((REPO / "deploy/configs/e2e_small.yaml").read_text())
    cfg["task"] = {"kind": "dataset", "path": str(tmp_path / "bad.jsonl"), "max_prompt_tokens": 12}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run(
        [sys.executable, "-m", "services.driver", "--config", str(tmp_path / "run.yaml"), f"run.runs_dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "bad.jsonl" in out.stderr and "missing_field" in out.stderr and "invalid_json" in out.stderr
