"""Preference pairs from sampled completions, labelled by a gold scorer (a verifier).

Contract: `sampled_preference_rows(engine, renderer, problems, score, n, ...)` samples `n` completions per
problem in one engine call and returns JSON-ready rows `{prompt, answer, chosen, rejected, margin}` for
`rollout.preferences`:
- verified pairs: chosen scores >= 1 (correct), rejected < 1 (wrong);
- graded pairs (when `graded` is given, e.g. `char_match`): among wrong completions, the one with the higher
  graded gold score is chosen, when the scores differ by at least `min_grade_gap`.
Completions are de-duplicated per prompt (by text) before pairing; at most `max_pairs_per_prompt` pairs per
prompt, verified pairs first. `margin` is the gold score difference (verified: 1 - graded(rejected)).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence

from rollout.problem import Problem

Score = Callable[[Problem, str], float]


def char_match(problem: Problem, completion: str) -> float:
    """Graded gold score: the fraction of the answer's characters the completion has in the right place."""
    answer = problem.answer
    hits = sum(a == b for a, b in zip(answer, completion))
    return hits / max(len(answer), len(completion), 1)


def _pairs_of(problem: Problem, texts: list[str], score: Score, graded: Score | None, gap: float) -> list[tuple]:
    correct = [t for t in texts if score(problem, t) >= 1.0]
    wrong = [t for t in texts if t not in correct]
    grade = (lambda t: graded(problem, t)) if graded else (lambda t: 0.0)
    verified = [(c, w, 1.0 - grade(w)) for c, w in itertools.product(correct, wrong)]
    ranked = []
    if graded is not None:
        for a, b in itertools.combinations(wrong, 2):
            ga, gb = grade(a), grade(b)
            if abs(ga - gb) >= gap:
                ranked.append((a, b, ga - gb) if ga > gb else (b, a, gb - ga))
    return verified + ranked


def sampled_preference_rows(
    engine,
    renderer,
    problems: Sequence[Problem],
    score: Score,
    n: int,
    seed: int = 0,
    graded: Score | None = None,
    min_grade_gap: float = 0.25,
    max_pairs_per_prompt: int = 4,
) -> list[dict]:
    """Rows of (prompt, chosen, rejected) built from `n` samples per problem (see module docstring)."""
    groups = engine.generate([renderer.encode_prompt(p) for p in problems], n=n, seed=seed)
    rng = random.Random(seed)
    rows = []
    for problem, group in zip(problems, groups):
        texts = list(dict.fromkeys(renderer.completion_text(c.token_ids) for c in group))
        texts = [t for t in texts if t.strip()]
        pairs = _pairs_of(problem, texts, score, graded, min_grade_gap)
        verified = [p for p in pairs if score(problem, p[0]) >= 1.0]
        rest = [p for p in pairs if score(problem, p[0]) < 1.0]
        rng.shuffle(verified)
        rng.shuffle(rest)
        for chosen, rejected, margin in (verified + rest)[:max_pairs_per_prompt]:
            rows.append(
                {
                    "prompt": problem.prompt,
                    "answer": problem.answer,
                    "chosen": chosen,
                    "rejected": rejected,
                    "margin": round(margin, 6),
                }
            )
    return rows
