"""Sampling-based evaluation estimators: unbiased pass@k, mean@k and maj@k from n samples per prompt.

Contract (every estimator is the exact expectation over all k-subsets of the n samples, so it is
unbiased for the metric of k fresh samples and equals brute-force enumeration; tests check both):
- `pass_at_k(n, c, k)`: probability that a random k-subset holds at least one of the c correct
  samples, 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, "Evaluating Large Language Models Trained on
  Code"), in their numerically stable product form. A sample is correct when its score >= `SOLVED_AT`.
- `mean_at_k(scores, k)`: the expected mean score of k samples, which is the mean of all n scores.
- `maj_at_k(answers, scores, ks)`: the expected score of a majority vote over a k-subset's extracted
  answers (Wang et al. 2023, self-consistency; Lewkowycz et al. 2022 report it as maj1@k). An answer of
  `None` (nothing extracted) never wins a vote. An answer's score is the mean score of the samples that
  gave it. Ties are broken uniformly at random, so a subset whose vote ties between s answers scores the
  mean of those s answers' scores; a subset in which every sample abstains scores 0.
- `default_ks(n)`: 1, 2, 4, ... up to n, and n itself.
Inputs are validated: k must satisfy 1 <= k <= n, scores lie in [0, 1].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Iterable, Sequence

import numpy as np

SOLVED_AT = 1.0  # a sample whose score reaches this counts as correct for pass@k
MAX_SAMPLES = 1000  # maj@k counts subsets in float64: C(n, k) <= 2**n must stay finite


def _check_k(n: int, k: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is out of range for n={n} samples per prompt: use 1 <= k <= n (sample more)")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - prod_{i=n-c+1}^{n} (1 - k/i)."""
    _check_k(n, k)
    if not 0 <= c <= n:
        raise ValueError(f"c={c} correct samples is impossible with n={n} samples")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_at_k(scores: Sequence[float], k: int) -> float:
    """Expected mean score of k samples drawn without replacement: the mean of all n scores."""
    _check_k(len(scores), k)
    return float(sum(scores) / len(scores))


def default_ks(n: int) -> list[int]:
    """Powers of two up to n, plus n: the k values a pass@k curve is usually drawn at."""
    if n < 1:
        raise ValueError(f"n={n}: a pass@k curve needs at least one sample per prompt")
    return sorted({2**i for i in range(n.bit_length()) if 2**i <= n} | {n})


def _check_scores(scores: Sequence[float]) -> None:
    bad = [s for s in scores if not 0.0 <= s <= 1.0]
    if bad:
        raise ValueError(f"scores must lie in [0, 1] (verifier scores), got {bad[:4]}")


def _answer_groups(answers: Sequence[Hashable | None], scores: Sequence[float]) -> tuple[list[tuple[int, float]], int]:
    """(count, mean score) per distinct non-None answer, and the number of abstaining samples."""
    members: dict[Hashable, list[float]] = {}
    abstain = 0
    for a, s in zip(answers, scores):
        if a is None:
            abstain += 1
        else:
            members.setdefault(a, []).append(float(s))
    return [(len(v), sum(v) / len(v)) for v in members.values()], abstain


def _times_factor(p: np.ndarray, low: np.ndarray, m: int, t: int) -> np.ndarray:
    """p * (sum_{x<t} C(m,x) z^x + u C(m,t) z^t); `p [U, Z]` is a polynomial in u (rows) and z (columns)."""
    out = np.zeros_like(p)
    width = p.shape[1]
    for x in range(min(t, width)):
        out[:, x:] += low[x] * p[:, : width - x]
    if t < width:
        out[1:, t:] += math.comb(m, t) * p[:-1, : width - t]
    return out


def _credit_at_max(groups: list[tuple[int, float]], low_count: int, t: int, n: int) -> np.ndarray:
    """`[n+1]`: for each subset size y, the summed vote credit of the subsets whose top answer count is t.

    Answers with fewer than t samples (and abstentions) can never reach the top: they enter as
    (1+z)^low_count. Each answer with >= t samples contributes a factor with the variable u marking "this
    answer has exactly t samples in the subset". A dual part D (the derivative with respect to a weight
    on each answer's u term) carries sum_j score_j over tied answers j; dividing D's u^s term by s gives
    the uniform tie-break's expected credit.
    """
    high = [(m, w) for m, w in groups if m >= t]
    low_count += sum(m for m, _ in groups if m < t)
    p = np.zeros((len(high) + 1, n + 1))
    p[0, :] = [math.comb(low_count, y) for y in range(n + 1)]
    d = np.zeros_like(p)
    for m, w in high:
        low = [math.comb(m, x) for x in range(t)]
        tie = np.zeros_like(p)  # p * (w u C(m,t) z^t)
        if t <= n:
            tie[1:, t:] = w * math.comb(m, t) * p[:-1, : n + 1 - t]
        d = _times_factor(d, low, m, t) + tie
        p = _times_factor(p, low, m, t)
    ties = np.arange(1, len(high) + 1, dtype=np.float64)[:, None]
    return (d[1:] / ties).sum(axis=0)


def maj_at_k(answers: Sequence[Hashable | None], scores: Sequence[float], ks: Iterable[int]) -> dict[int, float]:
    """Expected majority-vote score of k samples, for each k in `ks` (see the module docstring for ties)."""
    n, ks = len(answers), list(ks)
    if len(scores) != n:
        raise ValueError(f"maj_at_k got {n} answers but {len(scores)} scores; pass one of each per sample")
    if n > MAX_SAMPLES:
        raise ValueError(f"maj_at_k supports at most {MAX_SAMPLES} samples per prompt, got {n}")
    for k in ks:
        _check_k(n, k)
    _check_scores(scores)
    groups, abstain = _answer_groups(answers, scores)
    credit = np.zeros(n + 1)
    for t in range(1, max((m for m, _ in groups), default=0) + 1):
        credit += _credit_at_max(groups, abstain, t, n)
    return {k: float(min(1.0, credit[k] / math.comb(n, k))) for k in ks}


@dataclasses.dataclass(frozen=True)
class PromptSamples:
    """The n scored samples of one prompt: verifier scores and extracted answers (None = no answer)."""

    scores: tuple[float, ...]
    answers: tuple[str | None, ...]

    @property
    def correct(self) -> int:
        return sum(s >= SOLVED_AT for s in self.scores)


@dataclasses.dataclass(frozen=True)
class CurvePoint:
    """One k of a pass@k curve: the mean over prompts and its standard error (std over prompts / sqrt(P))."""

    k: int
    pass_at_k: float
    pass_at_k_stderr: float
    mean_at_k: float
    maj_at_k: float
    maj_at_k_stderr: float


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def curve(prompts: Sequence[PromptSamples], ks: Sequence[int]) -> list[CurvePoint]:
    """pass@k, mean@k and maj@k averaged over prompts (each prompt weighs the same), for every k in `ks`."""
    if not prompts:
        raise ValueError("no prompts to evaluate: pass at least one PromptSamples")
    n = len(prompts[0].scores)
    if any(len(p.scores) != n or len(p.answers) != n for p in prompts):
        raise ValueError("every prompt needs the same number n of scores and answers")
    maj = [maj_at_k(p.answers, p.scores, ks) for p in prompts]
    points = []
    for k in ks:
        pk, pk_se = _mean_stderr([pass_at_k(n, p.correct, k) for p in prompts])
        mk, mk_se = _mean_stderr([m[k] for m in maj])
        mean = sum(mean_at_k(p.scores, k) for p in prompts) / len(prompts)
        points.append(CurvePoint(k, pk, pk_se, mean, mk, mk_se))
    return points
