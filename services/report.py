"""A run's outputs under `runs/<name>/`: `metrics.jsonl` (one JSON record per event), `summary.json`, `report.png`,
and what `run.loggers` adds (TensorBoard event files, a W&B run: services/loggers.py).

Every metrics record has `kind` (one of `learner_step`, `rollout`, `eval`, `sync`, `checkpoint`, `resume`,
`nonfinite_step`, `membership` (a rollout worker started, joined, died, was re-issued work, drained or
removed; the group re-formed; the target changed: services/worker_pool.py), `broadcast_failed`) and `t`
(seconds of RL time since the run's loop started, continued across resumes); the rest depends on the kind.
`report.png` is drawn only from `metrics.jsonl`,
so it can be re-drawn from a finished run: `python -m services.report runs/<name>`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends records to metrics.jsonl and hands their scalars to `loggers` (services/loggers.py)."""

    def __init__(self, path: Path, loggers: list | tuple = ()):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("a", buffering=1)
        self.t0 = time.perf_counter()
        self.loggers = list(loggers)
        self.learner_step = 0  # the loggers' x axis: the last learner step written

    def restart_clock(self) -> None:
        self.t0 = time.perf_counter()

    def continue_clock(self, at_s: float) -> None:
        """Resume: the clock reads `at_s` now, so `t` (and `run.max_wall_s`) count the whole run."""
        self.t0 = time.perf_counter() - at_s

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def write(self, kind: str, **fields: Any) -> dict:
        rec = {"kind": kind, "t": round(self.now(), 4), **{k: _clean(v) for k, v in fields.items()}}
        self._f.write(json.dumps(rec) + "\n")
        if self.loggers:
            self._forward(rec)
        return rec

    def _forward(self, rec: dict) -> None:
        from services.loggers import scalars_of

        if isinstance(rec.get("learner_step"), int):
            self.learner_step = rec["learner_step"]
        scalars = scalars_of(rec)
        if scalars:
            self._each_logger(lambda lg: lg.log(self.learner_step, time.time(), scalars))

    def _each_logger(self, call) -> None:
        for lg in list(self.loggers):
            try:
                call(lg)
            except Exception as e:  # a full disk or a W&B hiccup must not stop training
                log.warning(f"logger {type(lg).__name__} failed ({e!r}); it is dropped for the rest of the run")
                self.loggers.remove(lg)

    def summary(self, summary: dict) -> None:
        """Hand summary.json's numbers to the loggers (W&B run summary, TensorBoard text + scalars)."""
        self._each_logger(lambda lg: lg.summary(summary))

    def close(self) -> None:
        self._f.close()
        self._each_logger(lambda lg: lg.close())
        self.loggers = []


def _clean(v: Any) -> Any:
    """NaN/inf -> null (strict JSON), also inside lists."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _series(records: list[dict], kind: str, key: str, x: str = "t") -> tuple[list, list]:
    pts = [(r[x], r[key]) for r in records if r["kind"] == kind and r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _rolling_mean(ys: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y - (ys[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def draw_report(run_dir: Path) -> Path:
    """Plot reward, eval accuracy, KL to behaviour and staleness over RL wall time into report.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(run_dir)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    panels = [
        (axes[0, 0], [("learner_step", "reward_mean", "train reward (batch mean)")], "reward"),
        (axes[0, 1], [("eval", "accuracy", "held-out greedy accuracy")], "accuracy"),
        (axes[1, 0], [("learner_step", "kl_behaviour", "KL(learner || behaviour), k3")], "KL"),
        (
            axes[1, 1],
            [("learner_step", "staleness_mean", "mean staleness"), ("learner_step", "staleness_max", "max staleness")],
            "policy versions",
        ),
    ]
    for ax, series, ylabel in panels:
        for kind, key, label in series:
            xs, ys = _series(recs, kind, key)
            if kind == "learner_step" and key == "reward_mean" and len(ys) > 20:
                ax.plot(xs, ys, alpha=0.25, lw=0.8)
                ys, label = _rolling_mean(ys, 20), f"{label}, mean of 20 steps"
            ax.plot(xs, ys, marker="o" if kind == "eval" else None, ms=3, label=label)
        if ylabel == "accuracy":
            _, acc = _series(recs, "eval", "accuracy")
            if acc:
                ax.axhline(acc[0] + 0.2, ls="--", c="gray", lw=1, label="initial + 20 points")
        ax.set_xlabel("RL wall time (s)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    summary = run_dir / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        fig.suptitle(
            f"{run_dir.name}: eval {s['eval_accuracy_initial']:.2f} -> {s['eval_accuracy_final']:.2f} "
            f"in {s['wall_s']:.0f}s, {s['learner_steps']} learner steps, {s['policy_versions_published']} versions"
        )
    out = run_dir / "report.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def format_summary(summary: dict) -> str:
    rows = [
        (k, f"{v:.4g}" if isinstance(v, float) else str(v))
        for k, v in summary.items()
        if not isinstance(v, (dict, list))
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


if __name__ == "__main__":
    print(draw_report(Path(sys.argv[1])))  # noqa: T201 - command-line entry point
