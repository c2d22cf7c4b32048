"""Shared by the A/B benchmarks (schedule_free, process_rewards, distill): one real driver run per (arm, seed)
on a run config, its held-out accuracy curve read from the run's metrics.jsonl, means over seeds, and a figure
of accuracy against learner steps (one line per run).

Every arm of a comparison gets the same config, cold start and number of learner steps
(`run.max_learner_steps`, with `run.max_wall_s` only a safety cap); only its overrides differ. Comparing at
equal steps keeps the verdict independent of how loaded the machine was; RL wall seconds are recorded too.
Seeds are `rollout.seed` (the sampling). The load average around each run is recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_arm(arm: str, overrides: list[str], steps: int, seed: int, config: str, runs_dir: Path, cap_s: float) -> dict:
    """One driver run of `steps` learner steps (`cap_s` RL seconds at most); its accuracy curve
    `[(policy version, rl seconds, accuracy)]` and summary numbers (or its error)."""
    name = f"{arm}-seed{seed}"
    cmd = [
        sys.executable,
        "-m",
        "services.driver",
        "--config",
        config,
        f"run.name={name}",
        f"run.runs_dir={runs_dir}",
        f"run.max_learner_steps={steps}",
        f"run.max_wall_s={cap_s}",
        "run.progress=false",
        f"rollout.seed={seed}",
        *overrides,
    ]
    load_before = os.getloadavg()[0]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    base = {"arm": arm, "seed": seed, "overrides": overrides, "load_avg_1m": [load_before, os.getloadavg()[0]]}
    if out.returncode != 0:
        return base | {"error": out.stderr[-2000:]}
    recs = [json.loads(line) for line in (runs_dir / name / "metrics.jsonl").read_text().splitlines()]
    evals = sorted((r["policy_version"], r["t_published"], r["accuracy"]) for r in recs if r["kind"] == "eval")
    summary = json.loads((runs_dir / name / "summary.json").read_text())
    return base | {
        "curve": evals,
        "accuracy_initial": evals[0][2] if evals else None,
        "accuracy_final": evals[-1][2] if evals else None,
        # the last three evaluations (a 500-problem eval alone carries ~+-2 points of sampling noise)
        "accuracy_last3": _mean(a for _, _, a in evals[-3:]),
        "accuracy_best": max((a for _, _, a in evals), default=None),
        "learner_steps": summary["learner_steps"],
        "rl_wall_s": summary["rl_wall_s"],
        "stopped_by": summary["stopped_by"],
        "run_dir": str(runs_dir / name),
    }


def cold_started_model(config: str, overrides: list[str]) -> tuple[Path, dict]:
    """The model the driver would start RL from for `config` with `overrides` (base model + cold start, built
    and cached by the driver's own `prepare_model`), and its greedy accuracy on the task's held-out split."""
    sys.path.insert(0, str(REPO))
    from transformers import AutoModelForCausalLM

    from rollout.evaluation import greedy_accuracy
    from rollout.render import Renderer
    from rollout.tasks import make_task
    from services.config import load_config
    from services.driver import prepare_model

    cfg = load_config(config, ["run.progress=false", *overrides])
    path, sft_s = prepare_model(cfg, (REPO / cfg.run.cache_dir).resolve())
    renderer = Renderer.from_pretrained(cfg.render, path)
    task = make_task(cfg.task, renderer)
    model = AutoModelForCausalLM.from_pretrained(path)
    accuracy = greedy_accuracy(model, renderer, task.eval_set(), cfg.rollout.max_new_tokens, task.score)
    params = sum(p.numel() for p in model.parameters())
    return path, {"overrides": overrides, "greedy_accuracy": accuracy, "params": params, "sft_s": sft_s}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarise(runs: list[dict], baseline: str) -> list[dict]:
    """One row per arm: means over seeds, and final accuracy as a ratio to the baseline arm's."""
    rows = []
    for arm in dict.fromkeys(r["arm"] for r in runs):
        ok = [r for r in runs if r["arm"] == arm and "error" not in r]
        row = {"arm": arm, "seeds": len(ok), "errors": sum(r["arm"] == arm and "error" in r for r in runs)}
        for k in (
            "accuracy_initial",
            "accuracy_final",
            "accuracy_last3",
            "accuracy_best",
            "learner_steps",
            "rl_wall_s",
        ):
            row[k] = _mean(r[k] for r in ok)
        rows.append(row)
    base = next((r for r in rows if r["arm"] == baseline), None)
    for r in rows:
        for k in ("accuracy_final", "accuracy_last3", "rl_wall_s"):
            ok = base and base[k] and r[k] is not None
            r[f"{k}_vs_baseline"] = r[k] / base[k] if ok else None
        finals = [x["accuracy_final"] for x in runs if x["arm"] == r["arm"] and "error" not in x]
        r["accuracy_final_min_max"] = [min(finals), max(finals)] if finals else None
    return rows


def print_table(rows: list[dict]) -> None:
    cols = ("arm", "seeds", "errors", "learner_steps", "accuracy_initial", "accuracy_final", "accuracy_last3")
    cols += ("accuracy_final_vs_baseline", "rl_wall_s")
    print("".join(f"{c:>20}" for c in cols))
    for r in rows:
        print("".join(f"{(f'{r[c]:.4g}' if isinstance(r[c], float) else str(r[c])):>20}" for c in cols))


def plot(runs: list[dict], path: Path, title: str, x: str = "steps") -> Path | None:
    """Accuracy against learner steps (policy version), or RL seconds with `x="seconds"`, one line per run,
    coloured by arm."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = {}
    for r in runs:
        if "error" in r or not r["curve"]:
            continue
        c = colours.setdefault(r["arm"], f"C{len(colours)}")
        steps, seconds, ys = zip(*r["curve"])
        xs = seconds if x == "seconds" else steps
        ax.plot(
            xs, ys, color=c, alpha=0.8, label=r["arm"] if r["arm"] not in ax.get_legend_handles_labels()[1] else None
        )
    ax.set_xlabel("RL seconds" if x == "seconds" else "learner steps (policy version)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


EQUAL_STEPS_NOTE = (
    "taken on a shared 2-core box under load from other jobs: arms are compared at equal learner steps; "
    "rl_wall_s is noisy"
)


def write(out: Path, runs: list[dict], rows: list[dict], note: str = EQUAL_STEPS_NOTE, **extra) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**extra, "cells": rows, "runs": runs, "note": note}, indent=1))
