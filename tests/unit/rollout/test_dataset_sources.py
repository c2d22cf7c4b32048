"""Dataset sources beyond JSONL: Parquet and save_to_disk directories, field mapping, chat-turn columns, and
prompt lengths measured after rendering (a chat template can push a short prompt over the limit)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from rollout.datasets import DatasetError, DatasetTask, DatasetTaskConfig, load_prompt_dataset, read_rows
from rollout.render import RenderConfig, Renderer
from rollout.verifiers import MathVerifyConfig

ROWS = [{"question": f"What is {i} + {i}?", "solution": 2 * i, "source": "toy"} for i in range(12)]


def cfg(path, **kw) -> DatasetTaskConfig:
    base = {"path": str(path), "prompt_key": "question", "answer_key": "solution", "task_key": "source"}
    return DatasetTaskConfig(**{**base, "max_prompt_tokens": 64, "eval_size": 2, **kw})


def chars(problem) -> list[int]:
    return [1, *map(ord, problem.prompt)]


def test_parquet_with_field_mapping_and_numeric_answers(tmp_path):
    path = tmp_path / "math.parquet"
    pq.write_table(pa.Table.from_pylist([*ROWS, {"question": None, "solution": 1, "source": "toy"}]), path)
    data = load_prompt_dataset(cfg(path), chars)
    problems = sorted(data.train + data.eval, key=lambda p: int(p.answer))
    assert [(p.prompt, p.answer, p.task) for p in problems[:2]] == [
        ("What is 0 + 0?", "0", "toy"),
        ("What is 1 + 1?", "2", "toy"),
    ]
    assert len(problems) == 12 and data.skipped == {"wrong_type": 1}  # a null prompt
    assert [where for where, _ in read_rows(cfg(path))][0].endswith("math.parquet:row 0")


def test_not_a_parquet_file_is_a_clear_error(tmp_path):
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DatasetError, match="not a readable Parquet"):
        load_prompt_dataset(cfg(tmp_path / "x.parquet"), chars)


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert len(load_prompt_dataset(cfg(tmp_path / "ds"), chars).train) == 10
    dd = datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS[:6]), test=datasets.Dataset.from_list(ROWS[6:]))
    dd.save_to_disk(str(tmp_path / "dd"))
    train = load_prompt_dataset(cfg(tmp_path / "dd"), chars)  # "train" by default
    test = load_prompt_dataset(cfg(tmp_path / "dd", split="test"), chars)
    assert {p.answer for p in train.train + train.eval} == {str(2 * i) for i in range(6)}
    assert {p.answer for p in test.train + test.eval} == {str(2 * i) for i in range(6, 12)}
    with pytest.raises(DatasetError, match="task.split"):
        load_prompt_dataset(cfg(tmp_path / "dd", split="validation"), chars)


def test_messages_column(tmp_path):
    import json

    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(6)
    ]
    rows += [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q9"}], "answer": "a9"},
        {"messages": [{"role": "user"}]},  # no content
        {"messages": "q"},
        {"messages": [{"role": "assistant", "content": "only an answer"}]},
    ]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = load_prompt_dataset(cfg(tmp_path / "chat.jsonl", messages_key="messages", answer_key="answer"), chars)
    got = {p.prompt: (p.answer, p.messages) for p in data.train + data.eval}
    assert got["q0"] == ("a0", (("user", "q0"),))  # the trailing assistant turn is the answer, not the prompt
    assert got["q9"] == ("a9", (("system", "S"), ("user", "q9")))
    assert data.skipped == {"wrong_type": 2, "empty_prompt": 1}


def test_too_long_is_counted_after_rendering(tmp_path, bpe_model_dir):
    tok = AutoTokenizer.from_pretrained(bpe_model_dir)
    raw, chat = Renderer(RenderConfig(), tok), Renderer(RenderConfig(mode="chat", stop_tokens=("<|im_end|>",)), tok)
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    longest = max(len(raw.encode_prompt(p)) for p in load_prompt_dataset(cfg(path), raw.encode_prompt).train)
    limit = longest + 2  # every prompt fits raw; the chat template adds ~8 tokens around each
    assert load_prompt_dataset(cfg(path, max_prompt_tokens=limit), raw.encode_prompt).skipped == {}
    with pytest.raises(DatasetError, match="too_long.*after rendering"):
        load_prompt_dataset(cfg(path, max_prompt_tokens=limit, on_bad_row="error"), chat.encode_prompt)
    with pytest.raises(DatasetError, match="'too_long': 12"):  # skip mode counts every row, then has none left
        load_prompt_dataset(cfg(path, max_prompt_tokens=limit), chat.encode_prompt)


def test_dataset_task_scores_with_its_configured_verifier(tmp_path, bpe_model_dir):
    path = tmp_path / "m.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"question": f"half of {i}?", "solution": f"\\frac{{{i}}}{{2}}"} for i in range(1, 9)]),
        path,
    )
    renderer = Renderer(RenderConfig(), AutoTokenizer.from_pretrained(bpe_model_dir))
    task = DatasetTask.from_config(cfg(path, task_key="task", verifier=MathVerifyConfig()), renderer)
    p = task.eval_set()[0]
    assert task.score(p, task.reference_completion(p)) == 1.0
    assert task.score(p, f"\\boxed{{{int(p.prompt.split()[2].rstrip('?')) / 2}}}") == 1.0  # 3/2 == 1.5
    assert task.score(p, "\\boxed{100}") == 0.0
    with pytest.raises(ValueError, match="Renderer"):
        DatasetTask.from_config(cfg(path), None)
