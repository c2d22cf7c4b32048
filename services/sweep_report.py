"""A sweep's report, rebuilt from its runs' files: `runs/<sweep>/report.md`, `results.csv`, `results.json`,
`accuracy_vs_time.png` (held-out accuracy against RL wall-clock, one colour per setting, one line per seed)
and `curves.png` (KL to the behaviour policy and train reward against learner steps, per run).

Per run the table reads `summary.json` (accuracy initial/final/best, RL seconds to +20 points, steps,
wall time, why it stopped) and `metrics.jsonl` (final KL and reward: means over the last tenth of the
learner steps). Per setting it gives the mean and the standard deviation over seeds of each number.
A run without summary.json is listed with its status and no numbers.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from services.report import read_metrics
from services.sweep import format_value

SUMMARY_KEYS = (
    "eval_accuracy_initial",
    "eval_accuracy_final",
    "eval_accuracy_best",
    "rl_seconds_to_target",
    "learner_steps",
    "rl_wall_s",
    "wall_s",
)
NUMBERS = (*SUMMARY_KEYS, "kl_behaviour_final", "reward_mean_final")


def _tail_mean(recs: list[dict], key: str) -> float | None:
    values = [r[key] for r in recs if r["kind"] == "learner_step" and r.get(key) is not None]
    tail = values[-max(1, len(values) // 10) :]
    return sum(tail) / len(tail) if tail else None


def run_row(run, run_dir: Path) -> dict:
    row = {"run": run.slug, "setting": run.setting_label, "seed": run.seed}
    row |= {k: format_value(v) for k, v in run.setting}
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        return row | {"status": "unfinished" if run_dir.exists() else "not started"}
    summary = json.loads(summary_path.read_text())
    recs = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    row |= {"status": "finished", "stopped_by": summary.get("stopped_by")}
    row |= {k: summary.get(k) for k in SUMMARY_KEYS}
    return row | {
        "kl_behaviour_final": _tail_mean(recs, "kl_behaviour"),
        "reward_mean_final": _tail_mean(recs, "reward_mean"),
    }


def _mean_std(values: list) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std


def setting_rows(rows: list[dict]) -> list[dict]:
    """Per setting: finished seeds and mean / std over them of every number."""
    out = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        done = [r for r in rows if r["setting"] == setting and r["status"] == "finished"]
        agg = {"setting": setting, "seeds": len(done), "runs": sum(r["setting"] == setting for r in rows)}
        for key in NUMBERS:
            agg[key], agg[f"{key}_std"] = _mean_std([r.get(key) for r in done])
        out.append(agg)
    return out


def _cell(mean, std) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3g}" if not std else f"{mean:.3g} ± {std:.2g}"


def markdown(name: str, rows: list[dict], settings: list[dict]) -> str:
    cols = ("eval_accuracy_final", "eval_accuracy_best", "rl_seconds_to_target", "kl_behaviour_final")
    cols += ("reward_mean_final", "learner_steps", "rl_wall_s")
    lines = [f"# Sweep {name}", "", "Per setting (mean ± std over finished seeds):", ""]
    lines += ["| setting | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    lines += [
        f"| {s['setting']} | {s['seeds']}/{s['runs']} | " + " | ".join(_cell(s[c], s[f"{c}_std"]) for c in cols) + " |"
        for s in settings
    ]
    lines += ["", "Per run:", "", "| run | status | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    lines += [f"| {r['run']} | {r['status']} | " + " | ".join(_cell(r.get(c), None) for c in cols) + " |" for r in rows]
    lines += ["", "![accuracy vs wall-clock](accuracy_vs_time.png)", "", "![KL and reward](curves.png)", ""]
    return "\n".join(lines)


def _colours(runs) -> dict[str, str]:
    return {s: f"C{i % 10}" for i, s in enumerate(dict.fromkeys(r.setting_label for r in runs))}


def draw(sweep_dir: Path, runs) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour, styles = _colours(runs), ("-", "--", ":", "-.")
    fig_acc, ax_acc = plt.subplots(figsize=(8, 5), constrained_layout=True)
    fig_cur, (ax_kl, ax_rw) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    seeds = sorted({r.seed for r in runs})
    for run in runs:
        path = sweep_dir / run.slug / "metrics.jsonl"
        if not path.exists():
            continue
        recs = read_metrics(path.parent)
        kw = {"color": colour[run.setting_label], "ls": styles[seeds.index(run.seed) % len(styles)], "lw": 1.2}
        label = f"{run.setting_label} seed {run.seed}"
        ev = [(r["t"], r["accuracy"]) for r in recs if r["kind"] == "eval" and r.get("accuracy") is not None]
        if ev:
            ax_acc.plot(*zip(*ev), marker="o", ms=3, label=label, **kw)
        steps = [r for r in recs if r["kind"] == "learner_step"]
        for ax, key in ((ax_kl, "kl_behaviour"), (ax_rw, "reward_mean")):
            pts = [(r["learner_step"], r[key]) for r in steps if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=label, **kw)
    for ax, x, y in (
        (ax_acc, "RL wall-clock (s)", "held-out greedy accuracy"),
        (ax_kl, "learner step", "KL to the behaviour policy (kl_behaviour)"),
        (ax_rw, "learner step", "train reward (batch mean)"),
    ):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    out = (sweep_dir / "accuracy_vs_time.png", sweep_dir / "curves.png")
    fig_acc.savefig(out[0], dpi=110)
    fig_cur.savefig(out[1], dpi=110)
    plt.close(fig_acc)
    plt.close(fig_cur)
    return out


def write_report(sweep_dir: Path, runs) -> Path:
    """Rewrite every report file from the runs on disk; returns report.md's path."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    rows = [run_row(r, sweep_dir / r.slug) for r in runs]
    settings = setting_rows(rows)
    (sweep_dir / "results.json").write_text(json.dumps({"runs": rows, "settings": settings}, indent=1))
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with (sweep_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    draw(sweep_dir, runs)
    out = sweep_dir / "report.md"
    out.write_text(markdown(sweep_dir.name, rows, settings))
    return out
