"""How each learner diagnostic combines across ranks (and across the updates of one sampled batch), and the
typed record a learner step returns.

Contract: `StepDiagnostics` is what `LearnerCore.train_step` returns and what crosses the learner rank ->
driver boundary: one optional float per diagnostic (None = this config does not produce it), each field
declaring its cross-rank reduction in its metadata: "mean" (weighted by each part's `tokens`, so a per-token
mean of the parts is the per-token mean of the whole), "sum" (counts), "min", "max". Names are the metric
names the loggers and dashboards read. Keys a registered objective variant adds beyond these ride in
`extra` and reduce by their suffix (`_min`, `_max`, `_sum`/`_count`) or "mean", so a new diagnostic is never
lost; the unit tests require every key the built-in variants emit to be a declared field. The record reads
as a `Mapping[str, float]` of the diagnostics it holds (`diag["loss"]`), so loggers iterate it unchanged.
NaN means "no data on this part" (e.g. a ratio minimum over zero tokens): reductions ignore it unless
every part has it. Inside a step, `reduce_diagnostics` combines plain per-update dicts the same way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Reduction = Literal["mean", "sum", "min", "max"]


def _d(reduce: Reduction):
    return field(default=None, metadata={"reduce": reduce})


@dataclass(frozen=True, repr=False)
class StepDiagnostics(Mapping[str, float]):
    """One learner step's diagnostics on one rank (or reduced over ranks by `reduce_step_diagnostics`)."""

    # the objective (learner.objective and the registered policy losses), per token unless noted
    loss: float | None = _d("mean")
    pg_loss: float | None = _d("mean")
    kl_loss: float | None = _d("mean")
    value_loss: float | None = _d("mean")
    entropy: float | None = _d("mean")
    kl_behaviour: float | None = _d("mean")
    kl_ref: float | None = _d("mean")
    kl_ref_coef: float | None = _d("mean")  # the coefficient this step used (adaptive with kl_ref_target)
    kl_prev: float | None = _d("mean")
    kl_teacher: float | None = _d("mean")
    adv_mean: float | None = _d("mean")
    adv_std: float | None = _d("mean")
    reward_mean: float | None = _d("mean")
    masked_token_frac: float | None = _d("mean")
    filtered_token_frac: float | None = _d("mean")
    clip_frac_low: float | None = _d("mean")
    clip_frac_high: float | None = _d("mean")
    clip_frac_dual: float | None = _d("mean")
    rho_clip_frac: float | None = _d("mean")
    ratio_mean: float | None = _d("mean")
    ratio_min: float | None = _d("min")
    ratio_max: float | None = _d("max")
    behaviour_weight_mean: float | None = _d("mean")
    behaviour_weight_max: float | None = _d("max")
    tis_frac: float | None = _d("mean")
    a_reg_mean: float | None = _d("mean")
    is_ratio_mean: float | None = _d("mean")
    is_ratio_min: float | None = _d("min")
    is_ratio_max: float | None = _d("max")
    ess_token: float | None = _d("mean")
    ess_seq: float | None = _d("mean")
    # the optimiser step (learner.step)
    grad_norm: float | None = _d("mean")
    lr: float | None = _d("mean")
    sample_weight_mean: float | None = _d("mean")
    tokens: float | None = _d("sum")
    sequences: float | None = _d("sum")
    padded_tokens: float | None = _d("sum")
    updates_applied: float | None = _d("sum")
    nonfinite_updates: float | None = _d("sum")
    skipped_nonfinite: float | None = _d("max")  # 1 when no update of the step was applied
    nonfinite_in_gradient: float | None = _d("max")  # 1 when the loss was finite but a gradient was not
    micro_batches: float | None = _d("max")
    max_micro_batch_tokens: float | None = _d("max")
    # timings: the slowest rank sets the step's time
    forward_s: float | None = _d("max")
    backward_s: float | None = _d("max")
    step_s: float | None = _d("max")
    prepass_s: float | None = _d("max")
    reference_s: float | None = _d("max")
    snapshot_refresh_s: float | None = _d("max")
    collate_s: float | None = _d("max")
    # diagnostics a registered variant adds beyond the declared ones, reduced by `reduction(name)`
    extra: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, values: Mapping[str, float]) -> StepDiagnostics:
        """Declared keys to their fields, the rest to `extra`."""
        declared = {k: float(v) for k, v in values.items() if k in REDUCTIONS}
        return cls(**declared, extra={k: float(v) for k, v in values.items() if k not in REDUCTIONS})

    def as_dict(self) -> dict[str, float]:
        """The diagnostics it holds, flat, under their metric names (None fields left out)."""
        out = {k: getattr(self, k) for k in REDUCTIONS if getattr(self, k) is not None}
        return out | dict(self.extra)

    def __getitem__(self, key: str) -> float:
        value = getattr(self, key, None) if key in REDUCTIONS else self.extra.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self.as_dict())

    def __repr__(self) -> str:
        return f"StepDiagnostics({self.as_dict()})"

    __hash__ = None  # a record, compared by value; `extra` is a dict


REDUCTIONS: dict[str, Reduction] = {
    f.name: f.metadata["reduce"] for f in dataclasses.fields(StepDiagnostics) if "reduce" in f.metadata
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


def reduce_step_diagnostics(parts: Sequence[StepDiagnostics]) -> StepDiagnostics:
    """Combine the ranks' step records into one, each diagnostic by its declared reduction."""
    return StepDiagnostics.from_mapping(reduce_diagnostics([p.as_dict() for p in parts]))
