from dataclasses import dataclass

from rollout.engine import Completion
from rollout.preference_sampling import char_match, sampled_preference_rows
from rollout.problem import Problem


class _Renderer:
    def encode_prompt(self, problem):
        return [ord(c) for c in problem.prompt]

    def completion_text(self, ids):
        return "".join(chr(i) for i in ids)


@dataclass
class _Engine:
    texts: list

    def generate(self, prompts, n, seed=None):
        assert n == len(self.texts[0])
        return [[Completion(tuple(ord(c) for c in t), (0.0,) * len(t), "stop") for t in g] for g in self.texts]


def _exact(problem, text):
    return float(text == problem.answer)


def test_char_match_counts_characters_in_place():
    p = Problem("12+9=", "210", "t")
    assert char_match(p, "210") == 1.0 and char_match(p, "211") == 2 / 3 and char_match(p, "2100") == 3 / 4
    assert char_match(p, "") == 0.0


def test_verified_pairs_first_then_graded_pairs():
    problems = [Problem("1+1=", "20", "t"), Problem("5+5=", "01", "t")]
    engine = _Engine([["20", "21", "99", "20"], ["00", "99", "09", "00"]])
    rows = sampled_preference_rows(engine, _Renderer(), problems, _exact, n=4, graded=char_match)
    first = [r for r in rows if r["prompt"] == "1+1="]
    # texts de-duplicated: {20, 21, 99}; verified: 20>21, 20>99; graded among wrong: 21 (0.5) > 99 (0)
    assert [(r["chosen"], r["rejected"]) for r in first[:2]] in (
        [("20", "21"), ("20", "99")],
        [("20", "99"), ("20", "21")],
    )
    assert (first[2]["chosen"], first[2]["rejected"], first[2]["margin"]) == ("21", "99", 0.5)
    second = [r for r in rows if r["prompt"] == "5+5="]  # nothing correct: graded pairs only (00 and 09 tie at 0.5)
    assert {(r["chosen"], r["rejected"]) for r in second} == {("00", "99"), ("09", "99")}
    assert all(r["answer"] == p.answer for p in problems for r in rows if r["prompt"] == p.prompt)


def test_pairs_per_prompt_capped():
    engine = _Engine([["20", "21", "22", "23", "24", "25"]])
    rows = sampled_preference_rows(engine, _Renderer(), [Problem("1+1=", "20", "t")], _exact, 6, max_pairs_per_prompt=3)
    assert len(rows) == 3 and all(r["chosen"] == "20" for r in rows)
