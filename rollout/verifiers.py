"""Verifiers: one scorer of a completion's text against a problem's answer, for rewards, eval and pass@k.

Contract:
- A verifier is a registered class (`@register_verifier(kind)`) built from its own small frozen config
  (`VerifierConfig`, a union tagged by `kind`); `make_verifier(cfg)` picks it. Every verifier is
  picklable (it may run in the reward process pool) and has
  `score(problem, completion) -> float` in [0, 1] and `reference_completion(problem) -> str`, a
  completion the verifier accepts for the problem's own answer (`--dry-run` checks it scores 1.0; the
  cold start trains on it when there are no worked solutions).
- Answer extraction (`extract`) reads the answer out of a completion: `boxed` (last `\\boxed{...}`,
  nested braces allowed), `answer_tag` (last `<answer>...</answer>`, reasoning-gym's convention),
  `answer_line` (last `Answer: ...` line), `hash_line` (last `#### ...` line, GSM8K), `last_number`,
  `auto` (the first of boxed, answer_tag, hash_line, answer_line present, else the whole text) or
  `none` (the whole text). A completion without the required marker scores 0. The gold answer goes
  through the same extraction when it carries the marker (a GSM8K solution ends in `#### 72`), else is
  used whole.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from fractions import Fraction
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from rollout.problem import Problem

Extract = Literal["none", "boxed", "answer_tag", "answer_line", "hash_line", "last_number", "auto"]
_EXTRACT_DESCRIPTION = (
    "how the answer is read out of a completion: none (whole text), boxed, answer_tag (<answer>..</answer>), "
    "answer_line (Answer: ..), hash_line (#### ..), last_number, auto (first marker found)"
)
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+")


def _last_boxed(text: str) -> str | None:
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i : j - 1] if depth == 0 else None


def _last_match(pattern: str, text: str, flags: int = 0) -> str | None:
    found = re.findall(pattern, text, flags)
    return found[-1] if found else None


_EXTRACTORS = {
    "boxed": _last_boxed,
    "answer_tag": lambda t: _last_match(r"<answer>(.*?)</answer>", t, re.DOTALL),
    "hash_line": lambda t: _last_match(r"^\s*####\s*(.+?)\s*$", t, re.MULTILINE),
    "answer_line": lambda t: _last_match(r"^\s*answer\s*:\s*(.+?)\s*$", t, re.MULTILINE | re.IGNORECASE),
    "last_number": lambda t: _last_match(_NUMBER.pattern, t),
}
_WRAP = {
    "none": "{}",
    "auto": "{}",
    "last_number": "{}",
    "boxed": "\\boxed{{{}}}",
    "answer_tag": "<answer>{}</answer>",
    "answer_line": "Answer: {}",
    "hash_line": "#### {}",
}


def extract_answer(text: str, how: Extract) -> str | None:
    """The answer `how` reads from `text` (stripped), or None when its marker is absent."""
    if how == "none":
        return text.strip()
    if how == "auto":
        for name in ("boxed", "answer_tag", "hash_line", "answer_line"):
            if (found := _EXTRACTORS[name](text)) is not None:
                return found.strip()
        return text.strip()
    found = _EXTRACTORS[how](text)
    return None if found is None else found.strip()


def gold_answer(answer: str, how: Extract) -> str:
    """The reference answer: extracted when it carries the marker, else the whole (stripped) text."""
    found = extract_answer(answer, how)
    return answer.strip() if found is None else found


def wrap_answer(answer: str, how: Extract) -> str:
    """A completion `extract_answer(., how)` reads `answer` from."""
    return _WRAP[how].format(answer)


VERIFIERS: dict[str, type] = {}


def register_verifier(kind: str):
    def deco(cls):
        VERIFIERS[kind] = cls
        return cls

    return deco


class _Base:
    """Shared by the registered verifiers: extraction, the reference completion and the score protocol."""

    def __init__(self, cfg):
        self.cfg = cfg

    def score(self, problem: Problem, completion: str) -> float:
        pred = extract_answer(completion, self.cfg.extract)
        return 0.0 if pred is None else float(self.match(gold_answer(problem.answer, self.cfg.extract), pred, problem))

    def match(self, gold: str, pred: str, problem: Problem) -> float:
        raise NotImplementedError

    def reference_completion(self, problem: Problem) -> str:
        if extract_answer(problem.answer, self.cfg.extract) is not None and self.cfg.extract not in ("none", "auto"):
            return problem.answer  # already written in the verifiable form (e.g. a worked solution ending `#### 7`)
        return wrap_answer(gold_answer(problem.answer, self.cfg.extract), self.cfg.extract)


class ExactConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["exact"] = Field("exact", description="selects this verifier")
    extract: Extract = Field("none", description=_EXTRACT_DESCRIPTION)
    case_sensitive: bool = Field(True, description="false compares casefolded text (word answers)")


@register_verifier("exact")
class ExactVerifier(_Base):
    """1.0 iff the extracted answer equals the gold answer after stripping whitespace."""

    def match(self, gold: str, pred: str, problem: Problem) -> float:
        if not self.cfg.case_sensitive:
            gold, pred = gold.casefold(), pred.casefold()
        return float(gold == pred)


class NumericConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["numeric"] = Field("numeric", description="selects this verifier")
    extract: Extract = Field("last_number", description=_EXTRACT_DESCRIPTION)
    rel_tol: float = Field(0.0, ge=0.0, description="relative tolerance (0 = exact for integers and fractions)")
    abs_tol: float = Field(1e-9, ge=0.0, description="absolute tolerance for decimal answers")


def parse_number(text: str) -> Fraction | None:
    """`-1,234`, `3.50`, `7/2`, `$12`, `45%` -> an exact Fraction; None if `text` is not one number."""
    cleaned = text.strip().strip("$").rstrip("%").replace(",", "").strip()
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


@register_verifier("numeric")
class NumericVerifier(_Base):
    """1.0 iff both answers parse as numbers equal within the tolerances (`1,000` == `1000.0`, `1/2` == `0.5`)."""

    def match(self, gold: str, pred: str, problem: Problem) -> float:
        g, p = parse_number(gold), parse_number(pred)
        if g is None or p is None:
            return 0.0
        return float(g == p or math.isclose(float(g), float(p), rel_tol=self.cfg.rel_tol, abs_tol=self.cfg.abs_tol))


class MathVerifyConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["math_verify"] = Field("math_verify", description="selects this verifier")
    extract: Extract = Field(
        "none",
        description="none lets math-verify find the answer itself (last \\boxed{}, then LaTeX, then expressions)",
    )
    float_rounding: int = Field(6, ge=0, description="decimal places compared for floats (math_verify.verify)")
    timeout_s: int = Field(5, ge=1, description="math-verify's own parse/verify timeout (main thread only)")


class _QuietMathVerify(logging.Filter):
    """math-verify logs a warning per call when its signal-based timeout is off (off the main thread);
    the reward pool's `reward.timeout_s` bounds those calls instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


@register_verifier("math_verify")
class MathVerifyVerifier(_Base):
    """Mathematical equivalence by HF's math-verify (`\\frac12` == `0.5`, `x=2` == `2`, sets, intervals)."""

    def match(self, gold: str, pred: str, problem: Problem) -> float:
        from math_verify import parse, verify

        # math-verify's timeouts use signal.alarm, which only the main thread may set.
        timeout = self.cfg.timeout_s if threading.current_thread() is threading.main_thread() else None
        if timeout is None:
            logging.getLogger("math_verify").addFilter(_QuietMathVerify())
        gold_parsed = parse(gold, parsing_timeout=timeout) or parse(f"${gold}$", parsing_timeout=timeout)
        pred_parsed = parse(pred, parsing_timeout=timeout)
        if not gold_parsed or not pred_parsed:
            return 0.0
        return float(verify(gold_parsed, pred_parsed, float_rounding=self.cfg.float_rounding, timeout_seconds=timeout))

    def reference_completion(self, problem: Problem) -> str:
        if self.cfg.extract == "none" and "\\boxed{" in problem.answer:
            return problem.answer
        return super().reference_completion(problem) if self.cfg.extract != "none" else f"\\boxed{{{problem.answer}}}"


class ReasoningGymConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["reasoning_gym"] = Field("reasoning_gym", description="selects this verifier")
    extract: Extract = Field("answer_tag", description=_EXTRACT_DESCRIPTION + "; reasoning-gym prompts ask for tags")


@register_verifier("reasoning_gym")
class ReasoningGymVerifier(_Base):
    """reasoning-gym's own `score_answer(answer, entry)` of the problem's generator (partial credit allowed).

    Needs the entry's metadata on the problem (`Problem.metadata`, JSON), as the reasoning-gym task sets it."""

    def __init__(self, cfg: ReasoningGymConfig):
        super().__init__(cfg)
        self._scorers: dict[str, object] = {}

    def __getstate__(self) -> dict:
        return {"cfg": self.cfg}  # generators are rebuilt on use, never pickled

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["cfg"])

    def match(self, gold: str, pred: str, problem: Problem) -> float:
        if problem.metadata is None:
            raise ValueError(
                f"task {problem.task!r} problems carry no reasoning-gym metadata; the reasoning_gym verifier "
                "only scores task.kind=reasoning_gym problems"
            )
        metadata = json.loads(problem.metadata)
        name = metadata.get("source_dataset", problem.task)
        entry = {"question": problem.prompt, "answer": problem.answer, "metadata": metadata}
        return float(self._scorer(name).score_answer(pred, entry))

    def _scorer(self, name: str):
        if name not in self._scorers:
            import reasoning_gym

            self._scorers[name] = reasoning_gym.create_dataset(name, size=1, seed=0)
        return self._scorers[name]


VerifierConfig = Annotated[
    ExactConfig | NumericConfig | MathVerifyConfig | ReasoningGymConfig, Field(discriminator="kind")
]


def make_verifier(cfg: ExactConfig | NumericConfig | MathVerifyConfig | ReasoningGymConfig):
    """The registered verifier for `cfg.kind`."""
    return VERIFIERS[cfg.kind](cfg)
