"""The over-optimisation figure of an RL run against a learned reward: `runs/<name>/rlhf.png`.

Contract: drawn from `metrics.jsonl` alone (`python -m services.rlhf_plot runs/<name>`). Rollout records of a
`reward.kind: model` run carry `gold_reward_mean` (the verifier) and `model_score_mean` (the raw reward-model
score); learner records carry `kl_ref` (per-token KL to the frozen reference, when `kl_ref_coef > 0`), else
`kl_behaviour`. `gold_vs_proxy(records)` pairs each rollout record with the KL of the latest learner step
before it; the figure plots gold and proxy against that KL (Gao et al. 2022, "Scaling Laws for Reward Model
Overoptimization": the proxy keeps rising while the gold reward peaks and falls) and both against time.
"""

from __future__ import annotations

import sys
from pathlib import Path

from services.report import _rolling_mean, read_metrics


def gold_vs_proxy(records: list[dict]) -> dict[str, list[float]]:
    """Aligned series: t, kl (to the reference, else to behaviour; None before the first step), gold, proxy."""
    out: dict[str, list] = {"t": [], "kl": [], "gold": [], "proxy": []}
    kl = None
    for r in sorted(records, key=lambda r: r.get("t", 0.0)):
        if r.get("kind") == "learner_step":
            kl = r.get("kl_ref", r.get("kl_behaviour", kl))
        elif r.get("kind") == "rollout" and None not in (r.get("gold_reward_mean"), r.get("model_score_mean")):
            for key, value in (("t", r["t"]), ("kl", kl), ("gold", r["gold_reward_mean"])):
                out[key].append(value)
            out["proxy"].append(r["model_score_mean"])
    return out


def draw_overoptimisation(run_dir: Path, window: int = 10) -> Path | None:
    """Draw rlhf.png; None when the run logged no gold/proxy pairs (not a reward-model run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = gold_vs_proxy(read_metrics(run_dir))
    if not s["t"]:
        return None
    gold, proxy = _rolling_mean(s["gold"], window), _rolling_mean(s["proxy"], window)
    kl = _rolling_mean([k or 0.0 for k in s["kl"]], window)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for ax, xs, xlabel in ((axes[0], kl, "KL to reference (per token, k3)"), (axes[1], s["t"], "RL wall time (s)")):
        ax.plot(xs, gold, c="tab:green", label="gold reward (verifier)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("gold reward", color="tab:green")
        twin = ax.twinx()
        twin.plot(xs, proxy, c="tab:purple", label="proxy reward (reward model, raw)")
        twin.set_ylabel("proxy reward", color="tab:purple")
        ax.grid(alpha=0.3)
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], loc="best", fontsize=8)
    fig.suptitle(f"{run_dir.name}: gold vs proxy reward (rolling mean of {window} rollout batches)")
    out = run_dir / "rlhf.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(draw_overoptimisation(Path(sys.argv[1])))  # noqa: T201 - command-line entry point
