"""load_prompt_dataset on a hand-written hostile JSONL: every bad-row reason counted exactly, valid rows kept, split."""

from __future__ import annotations

import itertools
import json

import pytest
from pydantic import ValidationError

from rollout.datasets import DatasetError, DatasetTask, DatasetTaskConfig, load_prompt_dataset
from rollout.tasks import Problem


def encode(problem: Problem) -> list[int]:
    """<bos> + one id per character; rejects the control character \\x07 like a closed-alphabet tokenizer."""
    if "\x07" in problem.prompt:
        raise ValueError(f"character {chr(7)!r} outside the alphabet")
    return [1] + [ord(ch) for ch in problem.prompt]


VALID = [{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(20)] + [
    {"prompt": "q-tagged", "answer": "x", "task": "mathy", "extra": [1, 2]},  # extra keys are ignored
    {"prompt": "q0", "answer": "a0"},  # a duplicate is kept
    {"prompt": "ünïcode ✓", "answer": "ok"},
]
BAD_LINES = {
    "invalid_json": ['{"prompt": "x", "answer": ', "not json at all", '{"prompt": "x"} trailing'],
    "invalid_utf8": [b'{"prompt": "\xff\xfe", "answer": "1"}'],
    "wrong_type": [
        '["prompt", "answer"]',
        '"just a string"',
        '{"prompt": 5, "answer": "1"}',
        '{"prompt": "x", "answer": null}',
        '{"prompt": "x", "answer": "1", "task": 3}',
    ],
    "missing_field": ['{"prompt": "x"}', '{"answer": "1"}', "{}"],
    "empty_prompt": ['{"prompt": "", "answer": "1"}', '{"prompt": "  \\n ", "answer": "1"}'],
    "empty_answer": ['{"prompt": "x", "answer": ""}'],
    "unencodable": ['{"prompt": "bell \\u0007", "answer": "1"}', '{"prompt": "lone \\ud800", "answer": "1"}'],
    "too_long": [json.dumps({"prompt": "y" * 10, "answer": "1"})],  # 11 ids with <bos>, limit 10
}


def write_hostile(tmp_path):
    lines = [json.dumps(r).encode() for r in VALID]
    for bad in BAD_LINES.values():
        lines += [b if isinstance(b, bytes) else b.encode() for b in bad]
    lines += [b"", b"   "]  # blank lines are not rows
    order = sorted(range(len(lines)), key=lambda i: (i * 7919) % len(lines))  # interleave good and bad
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(lines[i] for i in order) + b"\n")
    return path


def cfg(path, **kw) -> DatasetTaskConfig:
    return DatasetTaskConfig(**{"path": str(path), "max_prompt_tokens": 10, "eval_size": 3, "eval_fraction": 0.2, **kw})


def test_every_reason_counted_exactly_and_valid_rows_kept(tmp_path):
    data = load_prompt_dataset(cfg(write_hostile(tmp_path)), encode)
    assert data.skipped == {reason: len(lines) for reason, lines in BAD_LINES.items()}
    kept = sorted((p.prompt, p.answer, p.task) for p in data.train + data.eval)
    expected = sorted((r["prompt"], r["answer"], r.get("task", "dataset")) for r in VALID)
    assert kept == expected


def test_split_is_disjoint_by_prompt_and_deterministic(tmp_path):
    path = write_hostile(tmp_path)
    a, b = load_prompt_dataset(cfg(path), encode), load_prompt_dataset(cfg(path), encode)
    assert a == b
    assert {p.prompt for p in a.train}.isdisjoint({p.prompt for p in a.eval})
    assert len({p.prompt for p in a.eval}) == 3  # min(eval_size=3, ceil(0.2 * 23 distinct prompts)=5)
    other_seeds = [{p.prompt for p in load_prompt_dataset(cfg(path, seed=s), encode).eval} for s in range(1, 6)]
    assert any(s != {p.prompt for p in a.eval} for s in other_seeds)


def test_split_ignores_row_order(tmp_path):
    rows = [json.dumps(r) for r in VALID]
    (tmp_path / "a.jsonl").write_text("\n".join(rows))
    (tmp_path / "b.jsonl").write_text("\n".join(reversed(rows)))
    eval_a = load_prompt_dataset(cfg(tmp_path / "a.jsonl"), encode).eval
    eval_b = load_prompt_dataset(cfg(tmp_path / "b.jsonl"), encode).eval
    assert sorted(p.prompt for p in eval_a) == sorted(p.prompt for p in eval_b)


def test_duplicates_of_an_eval_prompt_all_go_to_eval(tmp_path):
    rows = [{"prompt": "dup", "answer": "1"}] * 3 + [{"prompt": f"p{i}", "answer": "1"} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for seed in range(30):
        data = load_prompt_dataset(cfg(tmp_path / "d.jsonl", seed=seed), encode)
        n_dup = [p.prompt for p in data.eval].count("dup")
        assert n_dup in (0, 3) and [p.prompt for p in data.train].count("dup") == 3 - n_dup


def test_error_mode_names_file_line_and_reason(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "answer": "2"}\n{"prompt": 7, "answer": "3"}\n')
    with pytest.raises(DatasetError, match=rf"{path}:4: wrong_type: field 'prompt' is a int"):
        load_prompt_dataset(cfg(path, on_bad_row="error"), encode)


def test_missing_file_and_no_valid_rows_raise_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_prompt_dataset(cfg(tmp_path / "nope.jsonl"), encode)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DatasetError, match=r"0 valid row\(s\)"):
        load_prompt_dataset(cfg(tmp_path / "empty.jsonl"), encode)
    (tmp_path / "bad.jsonl").write_text("garbage\n{}\n")
    with pytest.raises(DatasetError, match=r"skipped: \{'invalid_json': 1, 'missing_field': 1\}"):
        load_prompt_dataset(cfg(tmp_path / "bad.jsonl"), encode)


def test_config_rejects_unknown_fields_and_bad_policy(tmp_path):
    with pytest.raises(ValidationError, match="eval_frac"):
        DatasetTaskConfig(path="x", max_prompt_tokens=5, eval_frac=0.1)
    with pytest.raises(ValidationError, match="on_bad_row"):
        DatasetTaskConfig(path="x", max_prompt_tokens=5, on_bad_row="ignore")


def test_task_interface_matches_arithmetic(tmp_path):
    task = DatasetTask(cfg(write_hostile(tmp_path)), load_prompt_dataset(cfg(write_hostile(tmp_path)), encode))
    assert task.name == "dataset" and task.skipped_rows == task.data.skipped and task.skipped_rows
    first = list(itertools.islice(task.train_stream(seed=5), 3 * len(task.data.train)))
    assert first == list(itertools.islice(task.train_stream(seed=5), len(first)))
    assert sorted(first[: len(task.data.train)], key=repr) == sorted(task.data.train, key=repr)  # one pass = each once
    eval_prompts = {p.prompt for p in task.eval_set()}
    assert not eval_prompts & {p.prompt for p in first}
    assert task.score(Problem("q", "42", "dataset"), " 42\n") == 1.0
    assert task.score(Problem("q", "42", "dataset"), "420") == 0.0
