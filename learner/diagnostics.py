"""How each learner diagnostic combines across ranks (and across the updates of one sampled batch).

Contract: every key `learner.objective` and `learner.step` emit is declared in `REDUCTIONS` with one
of "mean" (weighted by each part's `tokens`, so a per-token mean of the parts is the per-token mean of
the whole), "sum" (counts), "min", "max". `reduce_diagnostics` applies them; NaN ("no data on this
part", e.g. a ratio minimum over zero tokens) is ignored unless every part has it. A key nobody
declared falls back to its suffix (`_min`, `_max`, `_sum`/`_count`) or "mean", so a new diagnostic is
never lost; the unit tests require every emitted key to be declared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

Reduction = Literal["mean", "sum", "min", "max"]

_MEAN = (
    "loss pg_loss kl_loss value_loss entropy kl_behaviour kl_ref adv_mean adv_std reward_mean masked_token_frac "
    "filtered_token_frac clip_frac_low clip_frac_high clip_frac_dual rho_clip_frac ratio_mean behaviour_weight_mean "
    "tis_frac a_reg_mean is_ratio_mean ess_token ess_seq grad_norm lr sample_weight_mean"
)
_MAX = (
    "ratio_max behaviour_weight_max is_ratio_max skipped_nonfinite nonfinite_in_gradient forward_s backward_s "
    "step_s prepass_s reference_s collate_s micro_batches max_micro_batch_tokens"
)
_SUM = "tokens sequences padded_tokens updates_applied nonfinite_updates"
_MIN = "ratio_min is_ratio_min"
REDUCTIONS: dict[str, Reduction] = {
    **dict.fromkeys(_MEAN.split(), "mean"),
    **dict.fromkeys(_MAX.split(), "max"),
    **dict.fromkeys(_SUM.split(), "sum"),
    **dict.fromkeys(_MIN.split(), "min"),
}


def reduction(name: str) -> Reduction:
    """The declared reduction of `name`, else the one its suffix implies, else "mean"."""
    if name in REDUCTIONS:
        return REDUCTIONS[name]
    for suffix, kind in (("_min", "min"), ("_max", "max"), ("_sum", "sum"), ("_count", "sum")):
        if name.endswith(suffix):
            return kind
    return "mean"


def _reduce(kind: Reduction, values: list[float], weights: list[float]) -> float:
    pairs = [(v, w) for v, w in zip(values, weights) if not math.isnan(v)]
    if not pairs:
        return float("nan")
    vals = [v for v, _ in pairs]
    if kind == "sum":
        return sum(vals)
    if kind in ("min", "max"):
        return min(vals) if kind == "min" else max(vals)
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total > 0 else sum(vals) / len(vals)


def reduce_diagnostics(parts: Sequence[Mapping[str, float]], weight_key: str = "tokens") -> dict[str, float]:
    """Combine per-rank (or per-update) diagnostics into one record, each key by its reduction."""
    if not parts:
        return {}
    weights = [float(p.get(weight_key, 1.0)) for p in parts]
    keys = list(dict.fromkeys(k for p in parts for k in p))
    return {
        k: _reduce(reduction(k), [float(p[k]) for p in parts if k in p], [w for p, w in zip(parts, weights) if k in p])
        for k in keys
    }
