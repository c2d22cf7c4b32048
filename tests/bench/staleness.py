"""Off-policyness experiment (AReaL-style table): max staleness x off-policy correction, on the default task.

    .venv/bin/python tests/bench/staleness.py [--rl-seconds 180] [--staleness 0 2 4 8] [--losses ppo decoupled_ppo tis]

Each cell is one real run of the driver (the default config, same cold start) with
`replay.max_staleness = s` and one correction:
  ppo           - PPO-clip on the learner/behaviour ratio (the trust region widens with staleness),
  decoupled_ppo - AReaL's decoupled objective: clip against the proximal (pre-step) policy, behaviour
                  importance weight outside the clip,
  tis           - PPO-clip plus truncated importance sampling of the behaviour mismatch (cap 2).
Reported per cell: final and best held-out accuracy, mean KL(learner||behaviour), max staleness seen,
learner steps, and RL seconds to reach +10 points (staleness 0 = the synchronous baseline, so the
ratio column is the async-vs-sync speed-up). Writes tests/bench/results/staleness.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOSSES = {
    "ppo": ["learner.objective.policy_loss=ppo"],
    "decoupled_ppo": ["learner.objective.policy_loss=decoupled_ppo"],
    "tis": ["learner.objective.policy_loss=ppo", "learner.objective.tis_cap=2.0"],
}
TARGET_GAIN = 0.10


def run_cell(staleness: int, loss: str, rl_seconds: float, runs: Path) -> dict:
    name = f"staleness-{loss}-s{staleness}"
    cmd = [sys.executable, "-m", "services.driver", "--config", "deploy/configs/tiny_cpu.yaml", f"run.name={name}",
           f"run.runs_dir={runs}", f"run.max_wall_s={rl_seconds}", "run.progress=false",
           f"replay.max_staleness={staleness}", *LOSSES[loss]]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        return {"staleness": staleness, "loss": loss, "error": out.stderr[-2000:]}
    recs = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["t_published"], r["accuracy"]) for r in recs if r["kind"] == "eval"]
    steps = [r for r in recs if r["kind"] == "learner_step"]
    kls = [r["kl_behaviour"] for r in steps if r.get("kl_behaviour") is not None]
    start = evals[0][1]
    return {
        "staleness": staleness, "loss": loss,
        "accuracy_initial": start, "accuracy_final": evals[-1][1], "accuracy_best": max(a for _, a in evals),
        "kl_behaviour_mean": sum(kls) / max(1, len(kls)),
        "max_staleness_seen": max((r["staleness_max"] for r in steps), default=0),
        "learner_steps": len(steps),
        "seconds_to_gain": next((t for t, a in evals if a >= start + TARGET_GAIN - 1e-9), None),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rl-seconds", type=float, default=180.0)
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 2, 4, 8])
    ap.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    args = ap.parse_args()
    runs = REPO / "runs"
    cells = [run_cell(s, loss, args.rl_seconds, runs) for loss in args.losses for s in args.staleness]
    for c in cells:  # async-vs-sync: time to the target relative to staleness 0 with the same loss
        base = next((b for b in cells if b["loss"] == c["loss"] and b["staleness"] == 0), None)
        ok = base and base.get("seconds_to_gain") and c.get("seconds_to_gain")
        c["speedup_vs_sync"] = base["seconds_to_gain"] / c["seconds_to_gain"] if ok else None
    out = REPO / "tests/bench/results/staleness.json"
    out.write_text(json.dumps({"rl_seconds": args.rl_seconds, "target_gain": TARGET_GAIN, "cells": cells}, indent=1))
    cols = ("loss", "staleness", "accuracy_final", "accuracy_best", "kl_behaviour_mean", "max_staleness_seen",
            "learner_steps", "seconds_to_gain", "speedup_vs_sync")
    print("".join(f"{c:>19}" for c in cols))
    for c in cells:
        print("".join(f"{(f'{c.get(k):.4g}' if isinstance(c.get(k), float) else str(c.get(k))):>19}" for k in cols))


if __name__ == "__main__":
    main()
