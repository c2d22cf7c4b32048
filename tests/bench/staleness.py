"""Off-policyness experiment (AReaL-style table): max staleness x off-policy correction, on the default task.

    .venv/bin/python tests/bench/staleness.py [--rl-seconds 120] [--staleness 0 2 4 8] [--losses ppo decoupled_ppo tis]
        [--seeds 0 1 2] [--updates-per-batch 2] [--minibatches 2]

Each cell is one real run of the driver (the default config, same cold start) with
`replay.max_staleness = s`, `run.max_buffered_steps = s` (the rollout may run s learner steps ahead, so
the data really is up to s versions old: the default's buffer of 3 would cap staleness at ~3), and one
correction:
  ppo           - PPO-clip on the learner/behaviour ratio (the trust region widens with staleness),
  decoupled_ppo - AReaL's decoupled objective: clip against the proximal policy (the learner's before the
                  batch's first update), behaviour importance weight outside the clip; the batch is
                  split into `--minibatches` and trained with `--updates-per-batch` optimiser steps, so
                  after the first one the clip around the proximal policy binds,
  tis           - truncated importance sampling of the engine/learner mismatch (Yao et al. 2025): the
                  decoupled objective with the behaviour weight capped at 2 (`tis_cap`), same updates.
Every cell runs once per `--seeds` value (`rollout.seed`: the sampling, not the cold start or the eval
set); the table shows the mean over seeds (and how many reached each target), the JSON every run.
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
    "tis": ["learner.objective.policy_loss=decoupled_ppo", "learner.objective.policy_loss.tis_cap=2.0"],
}
EPOCH_LOSSES = ("decoupled_ppo", "tis")  # the corrections that need a proximal policy != the current one
TARGET_GAINS = (0.10, 0.20)


def run_cell(staleness: int, loss: str, rl_seconds: float, runs: Path, seed: int, updates: tuple[int, int]) -> dict:
    name = f"staleness-{loss}-s{staleness}-seed{seed}"
    epochs = [f"learner.updates_per_batch={updates[0]}", f"learner.minibatches={updates[1]}"]
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
        f"rollout.seed={seed}",
        *LOSSES[loss],
        *(epochs if loss in EPOCH_LOSSES and staleness > 0 else []),
    ]
    load_before = os.getloadavg()[0]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        return {"staleness": staleness, "loss": loss, "seed": seed, "error": out.stderr[-2000:]}
    recs = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["t_published"], r["accuracy"]) for r in recs if r["kind"] == "eval"]
    steps = [r for r in recs if r["kind"] == "learner_step"]
    kls = [r["kl_behaviour"] for r in steps if r.get("kl_behaviour") is not None]
    start = evals[0][1]
    return {
        "staleness": staleness,
        "loss": loss,
        "seed": seed,
        "updates_per_batch": updates[0] if loss in EPOCH_LOSSES and staleness > 0 else 1,
        "minibatches": updates[1] if loss in EPOCH_LOSSES and staleness > 0 else 1,
        "accuracy_initial": start,
        "accuracy_final": evals[-1][1],
        "accuracy_best": max(a for _, a in evals),
        "kl_behaviour_mean": sum(kls) / max(1, len(kls)),
        "clip_frac_mean": _mean(r.get("clip_frac_low", 0) + r.get("clip_frac_high", 0) for r in steps),
        "max_staleness_seen": max((r["staleness_max"] for r in steps), default=0),
        "learner_steps": len(steps),
        **{
            f"seconds_to_plus{round(100 * g)}": next((t for t, a in evals if a >= start + g - 1e-9), None)
            for g in TARGET_GAINS
        },
        "load_avg_1m": [load_before, os.getloadavg()[0]],
    }


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (staleness, loss): means over seeds, how many seeds reached each target, max staleness."""
    rows = []
    for key in sorted({(r["staleness"], r["loss"]) for r in runs}, key=lambda k: (k[0], list(LOSSES).index(k[1]))):
        cell = [r for r in runs if (r["staleness"], r["loss"]) == key and "error" not in r]
        row = {
            "staleness": key[0],
            "loss": key[1],
            "seeds": len(cell),
            "errors": sum("error" in r for r in runs if (r["staleness"], r["loss"]) == key),
        }
        for k in ("accuracy_final", "accuracy_best", "kl_behaviour_mean", "clip_frac_mean", "learner_steps"):
            row[k] = _mean(r[k] for r in cell)
        row["max_staleness_seen"] = max((r["max_staleness_seen"] for r in cell), default=None)
        for g in TARGET_GAINS:
            k = f"seconds_to_plus{round(100 * g)}"
            row[k] = _mean(r[k] for r in cell)
            row[f"reached_plus{round(100 * g)}"] = sum(r[k] is not None for r in cell)
        row["updates_per_batch"] = cell[0]["updates_per_batch"] if cell else None
        rows.append(row)
    base = next((b for b in rows if b["staleness"] == 0), None)
    for c in rows:  # async-vs-sync: mean time to each target relative to the synchronous cell's
        for g in TARGET_GAINS:
            key = f"seconds_to_plus{round(100 * g)}"
            ok = base and base.get(key) and c.get(key)
            c[f"speedup_vs_sync_plus{round(100 * g)}"] = base[key] / c[key] if ok else None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rl-seconds", type=float, default=120.0)
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 2, 4, 8])
    ap.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--updates-per-batch", type=int, default=2)
    ap.add_argument("--minibatches", type=int, default=2)
    ap.add_argument("--append", action="store_true", help="keep the other runs of the existing results file")
    ap.add_argument("--out", default=str(REPO / "tests/bench/results/staleness.json"))
    args = ap.parse_args()
    runs_dir, out = REPO / "runs", Path(args.out)
    plan = [
        (s, loss, seed)
        for s in args.staleness
        for loss in (args.losses[:1] if s == 0 else args.losses)
        for seed in args.seeds
    ]
    updates = (args.updates_per_batch, args.minibatches)
    runs = []
    for s, loss, seed in plan:
        runs.append(run_cell(s, loss, args.rl_seconds, runs_dir, seed, updates))
        print(json.dumps(runs[-1])[:300], flush=True)
        if args.append and out.exists():
            kept = [
                r
                for r in json.loads(out.read_text()).get("runs", [])
                if (r["staleness"], r["loss"], r.get("seed")) not in {(a, b, c) for a, b, c in plan}
            ]
        else:
            kept = []
        result = {"rl_seconds": args.rl_seconds, "target_gains": TARGET_GAINS, "runs": kept + runs}
        result["cells"] = summarise(result["runs"])
        result["note"] = "taken on a shared 2-core box under load from other jobs; seconds columns are noisy"
        out.write_text(json.dumps(result, indent=1))  # after every run: a long sweep keeps what it finished
    cols = (
        "loss",
        "staleness",
        "seeds",
        "accuracy_final",
        "accuracy_best",
        "kl_behaviour_mean",
        "clip_frac_mean",
        "max_staleness_seen",
        "learner_steps",
        "seconds_to_plus10",
        "seconds_to_plus20",
        "reached_plus20",
        "speedup_vs_sync_plus20",
    )
    print("".join(f"{c:>19}" for c in cols))
    for c in result["cells"]:
        print("".join(f"{(f'{c.get(k):.4g}' if isinstance(c.get(k), float) else str(c.get(k))):>19}" for k in cols))


if __name__ == "__main__":
    main()
