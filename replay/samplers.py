"""Which held groups a sample takes, and their importance weights.

Contract: `select(kind, n, n_held, priorities, ...)` returns `(positions, weights)` — `n` distinct
positions into the held groups in insertion order (0 = oldest) and one weight per position.
Within one call groups are drawn without replacement; across calls a group may be drawn again
until the remover (`max_times_sampled`) takes it out.

- fifo: the n oldest, oldest first. lifo: the n newest, newest first. uniform: n at random.
- prioritized (Schaul et al. 2016, "Prioritized Experience Replay"): P(i) = p_i^α / Σ p_j^α,
  weight w_i = (N·P(i))^-β / max_j (N·P(j))^-β, so weights are in (0, 1]. The draw is without
  replacement inside one call, which slightly flattens the marginals for large n (documented in PER).
All other samplers give weight 1.0.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

SamplerKind = Literal["fifo", "uniform", "prioritized", "lifo"]


def prioritized_probabilities(priorities: np.ndarray, alpha: float) -> np.ndarray:
    """`priorities` [N] (>0) -> P [N], P_i ∝ priorities_i ** alpha."""
    scaled = np.power(priorities.astype(np.float64), alpha)
    return scaled / scaled.sum()


def importance_weights(probs: np.ndarray, picked: np.ndarray, beta: float) -> np.ndarray:
    """probs [N], picked [n] positions -> weights [n] = (N P_i)^-β normalised by the buffer's max weight."""
    n_held = len(probs)
    w = np.power(n_held * probs[picked], -beta)
    return w / np.power(n_held * probs.min(), -beta)


def select(
    kind: SamplerKind,
    n: int,
    n_held: int,
    priorities: np.ndarray | None,
    rng: np.random.Generator,
    alpha: float = 1.0,
    beta: float = 0.4,
) -> tuple[np.ndarray, np.ndarray]:
    """Pick `n` of `n_held` groups. `priorities` [n_held] is needed only by "prioritized"."""
    if not 0 < n <= n_held:
        raise ValueError(f"cannot select {n} groups from {n_held}; need 0 < n_groups <= groups held")
    ones = np.ones(n)
    if kind == "fifo":
        return np.arange(n), ones
    if kind == "lifo":
        return np.arange(n_held - 1, n_held - 1 - n, -1), ones
    if kind == "uniform":
        return rng.choice(n_held, size=n, replace=False), ones
    if kind == "prioritized":
        if priorities is None or len(priorities) != n_held:
            raise ValueError("prioritized sampling needs one priority per held group")
        probs = prioritized_probabilities(priorities, alpha)
        picked = rng.choice(n_held, size=n, replace=False, p=probs)
        return picked, importance_weights(probs, picked, beta)
    raise ValueError(f"unknown sampler {kind!r}; choose fifo, uniform, prioritized or lifo")
