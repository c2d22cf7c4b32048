"""Off-policyness experiment (AReaL-style table): max staleness x off-policy correction, on the default task.

    .venv/bin/python tests/bench/staleness.py [--rl-seconds 150] [--staleness 0 2 4 8] [--losses ppo decoupled_ppo tis]

Each cell is one real run of the driver (the default config, same cold start) with
`replay.max_staleness = s`, `run.max_buffered_steps = s` (the rollout may run s learner steps ahead, so
the data really is up to s versions old: the default's buffer of 3 would cap staleness at ~3), and one
correction:
  ppo           - PPO-clip on the learner/behaviour ratio (the trust region widens with staleness),
  decoupled_ppo - AReaL's decoupled objective: clip against the proximal (pre-step) policy, behaviour
                  importance weight outside the clip,
  tis           - truncated importance sampling of the engine/learner mismatch (Yao et al. 2025): the
                  decoupled objective with the behaviour weight capped at 2 (`tis_cap`).
Reported per cell: final and best held-out accuracy, mean KL(learner||behaviour), max staleness seen,
learner steps, and RL seconds to reach +10 points (staleness 0 = the synchronous baseline, so the
ratio column is the async-vs-sync speed-up). At staleness 0 the three corrections are the same objective
(behaviour = proximal = pre-step policy, importance weights 1 up to engine/learner rounding), so the
synchronous baseline runs once and serves every row. Writes tests/bench/results/staleness.json with the
load average around each cell (this box is shared: read the seconds columns with it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOSSES = {
    "ppo": ["learner.objective.policy_loss=ppo"],
    "decoupled_ppo": ["learner.objective.policy_loss=decoupled_ppo"],
    "tis": ["learner.objective.policy_loss=decoupled_ppo", "learner.objective.tis_cap=2.0"],
}
TARGET_GAINS = (0.10, 0.20)


def run_cell(staleness: int, loss: str, rl_seconds: float, runs: Path) -> dict:
    name = f"staleness-{loss}-s{staleness}"
    cmd = [
        sys.executable,
        "-m",
        "services.driver",
        "--config",
        "deploy/configs/tiny_cpu.yaml",
        f"run.name={name}",
        f"run.runs_dir={runs}",
        f"run.max_wall_s={rl_seconds}",
        "run.progress=false",
        f"replay.max_staleness={staleness}",
        f"run.max_buffered_steps={max(1, staleness)}",
        *LOSSES[loss],
    ]
    load_before = os.getloadavg()[0]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        return {"staleness": staleness, "loss": loss, "error": out.stderr[-2000:]}
    recs = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["t_published"], r["accuracy"]) for r in recs if r["kind"] == "eval"]
    steps = [r for r in recs if r["kind"] == "learner_step"]
    kls = [r["kl_behaviour"] for r in steps if r.get("kl_behaviour") is not None]
    start = evals[0][1]
    return {
        "staleness": staleness,
        "loss": loss,
        "accuracy_initial": start,
        "accuracy_final": evals[-1][1],
        "accuracy_best": max(a for _, a in evals),
        "kl_behaviour_mean": sum(kls) / max(1, len(kls)),
        "max_staleness_seen": max((r["staleness_max"] for r in steps), default=0),
        "learner_steps": len(steps),
        **{
            f"seconds_to_plus{round(100 * g)}": next((t for t, a in evals if a >= start + g - 1e-9), None)
            for g in TARGET_GAINS
        },
        "load_avg_1m": [load_before, os.getloadavg()[0]],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rl-seconds", type=float, default=150.0)
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 2, 4, 8])
    ap.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    ap.add_argument("--append", action="store_true", help="keep the other cells of the existing results file")
    args = ap.parse_args()
    runs = REPO / "runs"
    out = REPO / "tests/bench/results/staleness.json"
    plan = [(s, loss) for s in args.staleness for loss in (args.losses[:1] if s == 0 else args.losses)]
    cells = [run_cell(s, loss, args.rl_seconds, runs) for s, loss in plan]
    if args.append and out.exists():
        kept = [c for c in json.loads(out.read_text())["cells"] if (c["staleness"], c["loss"]) not in set(plan)]
        cells = sorted(kept + cells, key=lambda c: (c["staleness"], list(LOSSES).index(c["loss"])))
    base = next((b for b in cells if b["staleness"] == 0 and "error" not in b), None)
    for c in cells:  # async-vs-sync: time to each target relative to the synchronous run
        for g in TARGET_GAINS:
            key = f"seconds_to_plus{round(100 * g)}"
            ok = base and base.get(key) and c.get(key)
            c[f"speedup_vs_sync_plus{round(100 * g)}"] = base[key] / c[key] if ok else None
    out.write_text(json.dumps({"rl_seconds": args.rl_seconds, "target_gains": TARGET_GAINS, "cells": cells}, indent=1))
    cols = (
        "loss",
        "staleness",
        "accuracy_final",
        "accuracy_best",
        "kl_behaviour_mean",
        "max_staleness_seen",
        "learner_steps",
        "seconds_to_plus10",
        "seconds_to_plus20",
        "speedup_vs_sync_plus20",
    )
    print("".join(f"{c:>19}" for c in cols))
    for c in cells:
        print("".join(f"{(f'{c.get(k):.4g}' if isinstance(c.get(k), float) else str(c.get(k))):>19}" for k in cols))


if __name__ == "__main__":
    main()
