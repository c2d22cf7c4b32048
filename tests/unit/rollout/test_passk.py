"""pass@k / mean@k / maj@k against brute-force enumeration of every k-subset, plus hand values and invariants."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout import passk


def _subsets(n: int, k: int):
    return list(itertools.combinations(range(n), k))


def brute_pass(scores, k):
    subs = _subsets(len(scores), k)
    return sum(any(scores[i] >= 1.0 for i in s) for s in subs) / len(subs)


def brute_mean(scores, k):
    subs = _subsets(len(scores), k)
    return sum(sum(scores[i] for i in s) / k for s in subs) / len(subs)


def brute_maj(answers, scores, k):
    """Majority vote per subset; a tie between s answers scores the mean of their (per-answer mean) scores."""
    by_answer: dict = {}
    for a, s in zip(answers, scores):
        if a is not None:
            by_answer.setdefault(a, []).append(s)
    answer_score = {a: sum(v) / len(v) for a, v in by_answer.items()}
    total = 0.0
    subs = _subsets(len(answers), k)
    for sub in subs:
        votes = Counter(answers[i] for i in sub if answers[i] is not None)
        if not votes:
            continue
        top = max(votes.values())
        tied = [a for a, c in votes.items() if c == top]
        total += sum(answer_score[a] for a in tied) / len(tied)
    return total / len(subs)


def test_pass_at_k_hand_values():
    assert passk.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert passk.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert passk.pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)
    assert passk.pass_at_k(4, 0, 4) == 0.0
    assert passk.pass_at_k(4, 1, 4) == 1.0
    assert passk.pass_at_k(200, 3, 100) == pytest.approx(1 - math.comb(197, 100) / math.comb(200, 100))


def test_pass_at_k_is_stable_where_binomials_overflow_floats():
    # C(2000, 1000) overflows a float; the product form does not.
    assert passk.pass_at_k(2000, 1, 1000) == pytest.approx(0.5)
    assert passk.pass_at_k(2000, 0, 1000) == 0.0


@pytest.mark.parametrize("n, c, k", [(2, 1, 4), (4, 1, 0), (4, 5, 2), (4, -1, 2)])
def test_bad_arguments_say_what_is_wrong(n, c, k):
    with pytest.raises(ValueError, match=r"k=|c="):
        passk.pass_at_k(n, c, k)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_and_mean_equal_brute_force_for_every_k(n):
    for c in range(n + 1):
        scores = [1.0] * c + [0.0] * (n - c)
        for k in range(1, n + 1):
            assert passk.pass_at_k(n, c, k) == pytest.approx(brute_pass(scores, k), abs=1e-12)
    scores = [0.0, 0.5, 1.0, 0.25, 1.0, 0.0, 0.75, 1.0][:n]
    for k in range(1, n + 1):
        assert passk.mean_at_k(scores, k) == pytest.approx(brute_mean(scores, k), abs=1e-12)


def test_maj_at_k_hand_case_with_a_tie():
    # answers: A (correct) x2, B x2, C x1. k=4 subsets (5 of them): drop one sample each time.
    answers, scores = ["A", "A", "B", "B", "C"], [1.0, 1.0, 0.0, 0.0, 0.0]
    # drop an A -> B wins (0); drop a B -> A wins (1); drop C -> A/B tie (0.5). Mean = (0+0+1+1+0.5)/5.
    assert passk.maj_at_k(answers, scores, [4])[4] == pytest.approx(2.5 / 5)
    assert passk.maj_at_k(answers, scores, [1])[1] == pytest.approx(2 / 5)  # maj@1 is the fraction correct
    assert passk.maj_at_k(answers, scores, [5])[5] == pytest.approx(0.5)  # the full set ties A/B


def test_maj_at_k_abstentions_never_win():
    answers, scores = [None, None, None, "7"], [0.0, 0.0, 0.0, 1.0]
    # k=2: a subset with "7" (3 of 6) votes 7; the other 3 abstain entirely and score 0.
    assert passk.maj_at_k(answers, scores, [2])[2] == pytest.approx(0.5)
    assert passk.maj_at_k([None] * 3, [0.0] * 3, [1, 3]) == {1: 0.0, 3: 0.0}


answers_strategy = st.integers(min_value=1, max_value=8).flatmap(
    lambda n: st.tuples(
        st.lists(st.one_of(st.none(), st.sampled_from("abcd")), min_size=n, max_size=n),
        st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=n, max_size=n),
    )
)


@settings(max_examples=150, deadline=None)
@given(answers_strategy)
def test_maj_at_k_equals_brute_force(case):
    answers, raw = case
    # one score per answer (a verifier is a function of the answer), abstentions score 0
    per_answer = {a: raw[i] for i, a in enumerate(answers)}
    scores = [0.0 if a is None else per_answer[a] for a in answers]
    n = len(answers)
    got = passk.maj_at_k(answers, scores, range(1, n + 1))
    for k in range(1, n + 1):
        assert got[k] == pytest.approx(brute_maj(answers, scores, k), abs=1e-12), (answers, scores, k)


@settings(max_examples=100, deadline=None)
@given(answers_strategy)
def test_maj_at_k_with_samples_of_one_answer_scored_differently(case):
    answers, scores = case  # the answer's score is the mean of its samples' scores
    n = len(answers)
    got = passk.maj_at_k(answers, scores, range(1, n + 1))
    for k in range(1, n + 1):
        assert got[k] == pytest.approx(brute_maj(answers, scores, k), abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))))
def test_pass_at_k_invariants(nc):
    n, c = nc
    values = [passk.pass_at_k(n, c, k) for k in range(1, n + 1)]
    assert values[0] == pytest.approx(c / n)  # pass@1 is the fraction correct
    assert values[-1] == (1.0 if c else 0.0)  # pass@n: any correct sample
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))  # non-decreasing in k
    if c < n:
        assert all(passk.pass_at_k(n, c + 1, k) >= v - 1e-12 for k, v in zip(range(1, n + 1), values))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.lists(st.sampled_from(["x", "y", "z", None]), min_size=n, max_size=n)))
def test_maj_is_at_most_pass_with_binary_consistent_scores(answers):
    scores = [1.0 if a == "x" else 0.0 for a in answers]  # "x" is the right answer
    n, c = len(answers), scores.count(1.0)
    maj = passk.maj_at_k(answers, scores, range(1, n + 1))
    for k in range(1, n + 1):
        assert 0.0 <= maj[k] <= passk.pass_at_k(n, c, k) + 1e-12
    assert maj[1] == pytest.approx(c / n)


def test_maj_at_k_scales_to_64_samples():
    answers = [str(i % 9) for i in range(64)]  # 9 answers, counts 8 and 7
    scores = [1.0 if a == "0" else 0.0 for a in answers]
    got = passk.maj_at_k(answers, scores, passk.default_ks(64))
    assert set(got) == {1, 2, 4, 8, 16, 32, 64}
    assert got[1] == pytest.approx(8 / 64)
    assert got[64] == 1.0  # "0" holds 8 samples, every other answer 7
    assert all(0.0 <= v <= 1.0 for v in got.values())


def test_default_ks():
    assert passk.default_ks(64) == [1, 2, 4, 8, 16, 32, 64]
    assert passk.default_ks(12) == [1, 2, 4, 8, 12]
    assert passk.default_ks(1) == [1]


def test_curve_averages_prompts_with_stderr():
    prompts = [
        passk.PromptSamples(scores=(1.0, 0.0, 0.0, 0.0), answers=("4", "5", "5", None)),
        passk.PromptSamples(scores=(1.0, 1.0, 0.0, 0.0), answers=("9", "9", "1", "2")),
    ]
    points = {p.k: p for p in passk.curve(prompts, [1, 2, 4])}
    assert points[1].pass_at_k == pytest.approx((0.25 + 0.5) / 2)
    assert points[1].pass_at_k_stderr == pytest.approx(abs(0.25 - 0.5) / 2)  # std of two / sqrt(2)
    assert points[4].pass_at_k == 1.0 and points[4].pass_at_k_stderr == 0.0
    assert points[2].mean_at_k == pytest.approx((0.25 + 0.5) / 2)
    assert points[4].maj_at_k == pytest.approx((0.0 + 1.0) / 2)  # "5" wins the first, "9" the second
    with pytest.raises(ValueError, match="same number"):
        passk.curve([prompts[0], passk.PromptSamples((1.0,), ("1",))], [1])
