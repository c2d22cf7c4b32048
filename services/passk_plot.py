"""Outputs of `python -m services.evaluate`: `passk.json`, `passk.png` (every model on one figure), a text table.

`passk.json` = {"settings": {...how it was sampled...}, "models": [one record per model, see
`services.evaluate.model_result`]}; each model's `curve` lists, per k, pass@k and maj@k (means over
prompts with their standard errors) and mean@k. The figure draws pass@k against k on a log2 axis with
a +-1 standard-error band, maj@k dashed in the same colour, and greedy pass@1 as a star at k = 1, so a
sharpened but narrower RL model shows as a curve that starts higher and ends lower than its base.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out_dir: Path, settings: dict, results: list[dict]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "passk.json"
    path.write_text(json.dumps({"settings": settings, "models": results}, indent=1))
    return path


def read_results(path: Path) -> tuple[dict, list[dict]]:
    data = json.loads(Path(path).read_text())
    return data["settings"], data["models"]


def format_table(results: list[dict]) -> str:
    """One row per k, columns pass@k / maj@k per model (mean over prompts)."""
    head = "| k | " + " | ".join(f"{r['label']} pass@k | maj@k" for r in results) + " |"
    rule = "|---|" + "---|---|" * len(results)
    rows = [
        f"| {points[0]['k']} | " + " | ".join(f"{p['pass_at_k']:.3f} | {p['maj_at_k']:.3f}" for p in points) + " |"
        for points in zip(*(r["curve"] for r in results))
    ]
    greedy = "| greedy pass@1 | " + " | ".join(
        ("-" if r["greedy_pass_at_1"] is None else f"{r['greedy_pass_at_1']:.3f}") + " | -" for r in results
    )
    greedy += " |"
    return "\n".join([head, rule, *rows, greedy])


def draw_passk(out_dir: Path, settings: dict, results: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5), constrained_layout=True)
    for i, r in enumerate(results):
        color = f"C{i}"
        ks = [p["k"] for p in r["curve"]]
        pk = [p["pass_at_k"] for p in r["curve"]]
        se = [p["pass_at_k_stderr"] for p in r["curve"]]
        ax.plot(ks, pk, marker="o", ms=3, color=color, label=f"{r['label']} pass@k")
        ax.fill_between(ks, [a - b for a, b in zip(pk, se)], [a + b for a, b in zip(pk, se)], color=color, alpha=0.15)
        ax.plot(ks, [p["maj_at_k"] for p in r["curve"]], ls="--", color=color, lw=1, label=f"{r['label']} maj@k")
        if r["greedy_pass_at_1"] is not None:
            ax.plot(
                [1], [r["greedy_pass_at_1"]], marker="*", ms=12, color=color, ls="none", label=f"{r['label']} greedy"
            )
    ax.set_xscale("log", base=2)
    ks = sorted({p["k"] for r in results for p in r["curve"]})
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("k (samples per prompt)")
    ax.set_ylabel("fraction of prompts solved")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    task = settings["task"].get("kind", "task")
    ax.set_title(
        f"pass@k on {settings['num_prompts']} held-out {task} prompts, n={settings['n']}, "
        f"T={settings['temperature']:g}, top_p={settings['top_p']:g}",
        fontsize=10,
    )
    path = out_dir / "passk.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
