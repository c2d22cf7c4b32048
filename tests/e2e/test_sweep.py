"""`flywheel sweep` for real: GRPO vs pass@2 training (1 seed each) on the small config as Ray jobs on a private
local head, the report, TensorBoard files from a real run read back by TensorBoard's reader, a rerun that skips."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _sweep(runs_dir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "services.cli", "sweep", "--config", "deploy/configs/e2e_small.yaml"]
    cmd += ["--name", "ci", "--runs-dir", str(runs_dir), "--max-concurrent", "2", "--poll-s", "2"]
    cmd += ["--grid", "learner.objective.advantage=grpo,{kind: pass_at_k, k: 2}", "--seeds", "0"]  # pass@2 for real
    cmd += ["--set", "run.max_learner_steps=3", "learner.num_ranks=1", "learner.zero_stage=0"]
    cmd += ["run.loggers=[jsonl,tensorboard]", "run.eval_every_steps=1"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)


def test_small_sweep_runs_as_jobs_reports_and_resumes(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = _sweep(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    out = tmp_path / "ci"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["run"], r["status"], r["learner_steps"]) for r in rows] == [
        ("advantage=grpo,seed=0", "finished", "3"),
        ("advantage=pass_at_k+k=2,seed=0", "finished", "3"),
    ]
    assert "| advantage=pass_at_k+k=2 | 1/1 |" in (out / "report.md").read_text()
    assert all(r["kl_behaviour_final"] for r in rows)  # the KL curve exists for both settings
    assert (out / "accuracy_vs_time.png").stat().st_size > 10_000 and (out / "curves.png").stat().st_size > 10_000
    run = out / "advantage=pass_at_k+k=2,seed=0"
    objective = json.loads((run / "config.json").read_text())["learner"]["objective"]
    assert objective["advantage"] == {"kind": "pass_at_k", "k": 2, "solved_at": 1.0}
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("flywheel_learner_loss/total")] == [1, 2, 3]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if r["kind"] == "learner_step"]
    assert [e.value for e in acc.Scalars("flywheel_learner_loss/total")] == pytest.approx(losses, rel=1e-6)
    assert "flywheel_run_eval_accuracy" in acc.Tags()["scalars"]

    t0 = time.monotonic()
    again = _sweep(tmp_path)  # everything finished: nothing is submitted, the report is rewritten
    assert again.returncode == 0 and "2 finished" in again.stdout
    assert "submitted" not in again.stdout + again.stderr and "submitted" in first.stdout + first.stderr
    assert time.monotonic() - t0 < 120
