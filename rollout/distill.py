"""Offline distillation data: a teacher's verified worked solutions, written as the SFT cold start's JSONL.

Contract: `teacher_solutions(engine, renderer, task, problems, samples)` samples `samples` completions per
training problem from the teacher (any engine on any local HF model), keeps the first one the task's verifier
scores >= 1 (rejection sampling, as DeepSeek-R1's distillation data was filtered for correctness), and returns
`{"prompt", "completion"}` rows; `write_solutions` writes them as JSONL, the format `cold_start.solutions_path`
reads, so a student cold-starts from the teacher's solutions (`learner.sft.load_solutions`). Problems come
from `task.train_stream`, never the eval split. Prompts are the task's raw problem prompts (the student's
renderer wraps them), so a teacher with a different tokenizer works here, unlike on-policy distillation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from rollout.engine import Engine
from rollout.problem import Problem
from rollout.render import Renderer

log = logging.getLogger(__name__)


def teacher_solutions(
    engine: Engine, renderer: Renderer, task, problems: list[Problem], samples: int, seed: int = 0
) -> tuple[list[dict[str, str]], dict[str, float]]:
    """Verified teacher completions for `problems` and stats (`accepted_frac`, `sample_accuracy`)."""
    groups = engine.generate([renderer.encode_prompt(p) for p in problems], n=samples, seed=seed)
    rows, correct = [], 0
    for problem, group in zip(problems, groups):
        texts = [renderer.completion_text(c.token_ids) for c in group]
        ok = [t for t in texts if t.strip() and task.score(problem, t) >= 1.0]
        correct += len(ok)
        if ok:
            rows.append({"prompt": problem.prompt, "completion": ok[0]})
    n = max(1, len(problems))
    return rows, {"accepted_frac": len(rows) / n, "sample_accuracy": correct / (n * samples)}


def write_solutions(rows: list[dict[str, str]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    log.info("wrote %d teacher solutions to %s", len(rows), path)
    return path
