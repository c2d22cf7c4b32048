"""Verifiers: answer extraction, each registered verifier on hand-written cases, reference completions, pickling."""

from __future__ import annotations

import json
import pickle

import pytest
from pydantic import TypeAdapter, ValidationError

from rollout.problem import Problem
from rollout.verifiers import (
    VERIFIERS,
    ExactConfig,
    MathVerifyConfig,
    NumericConfig,
    ReasoningGymConfig,
    VerifierConfig,
    extract_answer,
    make_verifier,
    parse_number,
)


@pytest.mark.parametrize(
    "text, how, expected",
    [
        ("so \\boxed{\\frac{1}{2}} and \\boxed{x^{2}}", "boxed", "x^{2}"),  # last box, nested braces
        ("no box here", "boxed", None),
        ("\\boxed{unclosed", "boxed", None),
        ("<answer> 42 </answer> then <answer>7</answer>", "answer_tag", "7"),
        ("<answer>\n-3\n</answer>", "answer_tag", "-3"),
        ("work\nAnswer: 12 apples\nanswer:  13", "answer_line", "13"),
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "hash_line", "72"),
        ("it costs $1,250.50 or 3/4 of 12", "last_number", "12"),
        ("pre <answer>5</answer> \\boxed{6}", "auto", "6"),  # boxed first
        ("pre <answer>5</answer>", "auto", "5"),
        ("  plain 9  ", "auto", "plain 9"),
        ("  plain 9  ", "none", "plain 9"),
    ],
)
def test_extraction(text, how, expected):
    assert extract_answer(text, how) == expected


def test_registry_holds_every_kind_and_configs_are_tagged():
    assert set(VERIFIERS) == {"exact", "numeric", "math_verify", "reasoning_gym"}
    cfg = TypeAdapter(VerifierConfig).validate_python({"kind": "numeric", "extract": "answer_tag"})
    assert isinstance(cfg, NumericConfig) and cfg.extract == "answer_tag"
    with pytest.raises(ValidationError):
        TypeAdapter(VerifierConfig).validate_python({"kind": "fuzzy"})
    with pytest.raises(ValidationError):
        ExactConfig(extract="first_line")


def test_exact_with_extraction_and_case():
    p = Problem("q", "Paris", "t")
    v = make_verifier(ExactConfig(extract="answer_tag", case_sensitive=False))
    assert v.score(p, "I think <answer> paris </answer>") == 1.0
    assert v.score(p, "paris") == 0.0  # the tag is required
    assert make_verifier(ExactConfig()).score(p, "paris") == 0.0


def test_gold_in_verifiable_form_is_extracted_too():
    p = Problem("q", "She has 3 + 4 = 7.\n#### 7", "gsm8k")
    v = make_verifier(ExactConfig(extract="hash_line"))
    assert v.score(p, "3 and 4 make 7\n#### 7") == 1.0 and v.score(p, "#### 8") == 0.0
    assert v.reference_completion(p) == p.answer  # a worked solution is its own reference


@pytest.mark.parametrize(
    "gold, pred, ok",
    [("1000", "1,000.0", True), ("0.5", "1/2", True), ("-3", "-3.000", True), ("7", "8", False), ("7", "seven", False)],
)
def test_numeric(gold, pred, ok):
    v = make_verifier(NumericConfig(extract="none"))
    assert v.score(Problem("q", gold, "t"), pred) == float(ok)


def test_numeric_tolerance_and_parse():
    assert parse_number("$1,234") == 1234 and parse_number("45%") == 45 and parse_number("x1") is None
    v = make_verifier(NumericConfig(extract="last_number", rel_tol=0.01))
    assert v.score(Problem("q", "100", "t"), "about 100.5") == 1.0
    assert v.score(Problem("q", "100", "t"), "about 102") == 0.0


@pytest.mark.parametrize(
    "gold, completion, ok",
    [
        ("\\frac{1}{2}", "The answer is \\boxed{0.5}", True),
        ("\\frac{1}{2}", "so \\boxed{\\dfrac{2}{4}}", True),
        ("3", "x = \\boxed{3}", True),
        ("\\sqrt{2}", "\\boxed{1.4142}", False),
        ("12", "\\boxed{13}", False),
    ],
)
def test_math_verify_equivalence(gold, completion, ok):
    assert make_verifier(MathVerifyConfig()).score(Problem("q", gold, "math"), completion) == float(ok)


def test_math_verify_off_the_main_thread():
    import threading

    out = []
    t = threading.Thread(
        target=lambda: out.append(make_verifier(MathVerifyConfig()).score(Problem("q", "2", "m"), "\\boxed{2}"))
    )
    t.start()
    t.join()
    assert out == [1.0]


def _rg_problem(name: str, **params):
    import reasoning_gym

    entry = reasoning_gym.create_dataset(name, size=1, seed=3, **params)[0]
    return Problem(entry["question"], str(entry["answer"]), name, metadata=json.dumps(entry["metadata"])), entry


def test_reasoning_gym_uses_the_generators_own_score():
    problem, entry = _rg_problem("chain_sum", min_terms=2, max_terms=2, min_digits=1, max_digits=1)
    v = make_verifier(ReasoningGymConfig())
    assert v.score(problem, f"thinking... <answer>{entry['answer']}</answer>") == 1.0
    assert v.score(problem, f"<answer>{int(entry['answer']) + 1}</answer>") == 0.0
    assert v.score(problem, str(entry["answer"])) == 0.0  # no tag, nothing extracted
    assert make_verifier(ReasoningGymConfig(extract="none")).score(problem, f" {entry['answer']} ") == 1.0


def test_reasoning_gym_needs_the_entry_metadata():
    with pytest.raises(ValueError, match="reasoning-gym metadata"):
        make_verifier(ReasoningGymConfig()).score(Problem("q", "1", "t"), "<answer>1</answer>")


@pytest.mark.parametrize(
    "cfg",
    [
        ExactConfig(),
        ExactConfig(extract="boxed"),
        ExactConfig(extract="answer_line"),
        NumericConfig(),
        NumericConfig(extract="hash_line"),
        MathVerifyConfig(),
        MathVerifyConfig(extract="answer_tag"),
        ReasoningGymConfig(),
    ],
)
def test_reference_completion_passes_and_verifiers_pickle(cfg):
    problem = _rg_problem("basic_arithmetic", min_terms=2, max_terms=2)[0]
    v = make_verifier(cfg)
    assert v.score(problem, v.reference_completion(problem)) == 1.0
    clone = pickle.loads(pickle.dumps(v.score))  # the reward process pool pickles the bound method
    assert clone(problem, v.reference_completion(problem)) == 1.0
