import json

import pytest

from rollout.datasets import DatasetError
from rollout.preferences import PreferenceDataConfig, load_preferences
from rollout.render import RenderConfig, Renderer


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = [{"prompt": f"{a}+{a}=", "chosen": str(2 * a), "rejected": str(2 * a + 1)} for a in range(10)]


def test_loads_renders_and_splits_by_prompt(tiny_model_dir, tmp_path):
    renderer = Renderer.from_pretrained(RenderConfig(), tiny_model_dir)
    cfg = PreferenceDataConfig(path=str(_write(tmp_path / "p.jsonl", GOOD)), eval_fraction=0.2)
    data = load_preferences(cfg, renderer)
    assert len(data.train) == 8 and len(data.eval) == 2 and data.skipped == {}
    assert not {p.problem.key for p in data.train} & {p.problem.key for p in data.eval}
    pair = next(p for p in data.train + data.eval if p.problem.prompt == "3+3=")
    assert list(pair.prompt_ids) == renderer.encode_prompt(pair.problem)
    assert list(pair.chosen_ids) == renderer.target_ids(pair.problem, "6")
    assert list(pair.rejected_ids) == renderer.target_ids(pair.problem, "7")


def test_bad_rows_are_counted_by_reason(tiny_model_dir, tmp_path):
    renderer = Renderer.from_pretrained(RenderConfig(), tiny_model_dir)
    bad = [
        "{not json",
        [1, 2],
        {"prompt": "1+1=", "chosen": "2"},
        {"prompt": " ", "chosen": "2", "rejected": "3"},
        {"prompt": "1+1=", "chosen": "", "rejected": "3"},
        {"prompt": "1+1=", "chosen": "2", "rejected": "2"},
        {"prompt": "1+1=", "chosen": "x", "rejected": "3"},
        {"prompt": "1+1=", "chosen": "2" * 80, "rejected": "3"},
        {"prompt": "1+1=", "chosen": 2, "rejected": "3"},
    ]
    cfg = PreferenceDataConfig(path=str(_write(tmp_path / "p.jsonl", GOOD + bad)), max_tokens=40)
    data = load_preferences(cfg, renderer)
    assert len(data.train) + len(data.eval) == 10
    assert data.skipped == {
        "invalid_json": 1,
        "wrong_type": 2,
        "missing_field": 1,
        "empty_prompt": 1,
        "empty_reply": 1,
        "identical_replies": 1,
        "unencodable": 1,
        "too_long": 1,
    }
    with pytest.raises(DatasetError, match=r"p.jsonl:11: invalid_json"):
        load_preferences(cfg.model_copy(update={"on_bad_row": "error"}), renderer)


def test_chat_conversations_share_their_prompt(bpe_model_dir, tmp_path):
    renderer = Renderer.from_pretrained(RenderConfig(mode="chat", stop_tokens=("<|im_end|>",)), bpe_model_dir)
    rows = [
        {
            "chosen": [{"role": "user", "content": f"{a} + 3 ="}, {"role": "assistant", "content": str(a + 3)}],
            "rejected": [{"role": "user", "content": f"{a} + 3 ="}, {"role": "assistant", "content": str(a + 4)}],
            "margin": 1.5,
        }
        for a in range(6)
    ]
    rows.append(
        {
            "chosen": [{"role": "user", "content": "1 + 3 ="}, {"role": "assistant", "content": "4"}],
            "rejected": [{"role": "user", "content": "2 + 3 ="}, {"role": "assistant", "content": "5"}],
        }
    )
    rows.append({"prompt": [{"role": "user", "content": "9 + 3 ="}], "chosen": "12", "rejected": "13"})
    cfg = PreferenceDataConfig(path=str(_write(tmp_path / "c.jsonl", rows)), margin_key="margin", max_tokens=200)
    data = load_preferences(cfg, renderer)
    pairs = data.train + data.eval
    assert len(pairs) == 7 and data.skipped == {"prompt_mismatch": 1}  # a missing margin is 0
    pair = next(p for p in pairs if p.problem.prompt == "0 + 3 =")
    assert pair.problem.messages == (("user", "0 + 3 ="),) and pair.margin == 1.5
    assert renderer.tokenizer.decode(pair.prompt_ids).endswith("<|im_start|>assistant\n")
    assert renderer.tokenizer.decode(pair.chosen_ids).startswith("3")


def test_verified_pairs_keep_chosen_correct_and_rejected_wrong_only(tiny_model_dir, tmp_path):
    from rollout.preferences import verified_pairs
    from rollout.tasks import TaskConfig, make_task

    renderer = Renderer.from_pretrained(RenderConfig(), tiny_model_dir)
    task = make_task(TaskConfig(), renderer)
    rows = [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3", "answer": "2"},  # correct vs wrong: kept
        {"prompt": "2+2=", "chosen": "5", "rejected": "6", "answer": "4"},  # wrong vs wrong (graded): dropped
        {"prompt": "4+4=", "chosen": "7", "rejected": "8", "answer": "8"},  # mislabelled: dropped
        {"prompt": "5+5=", "chosen": "10", "rejected": "1", "answer": "10"},  # kept
        {"prompt": "6+6=", "chosen": "12", "rejected": "13"},  # no reference answer: cannot verify, dropped
    ]
    cfg = PreferenceDataConfig(path=str(_write(tmp_path / "p.jsonl", rows)))
    pairs = load_preferences(cfg, renderer)
    both = pairs.train + pairs.eval
    assert len(both) == 5
    out = verified_pairs(both, renderer, task.score)
    assert sorted(p.problem.prompt for p in out.kept) == ["1+1=", "5+5="]
    assert out.dropped == 3
    # A verifier that accepts every reply: no rejected reply is verified wrong, so nothing is kept.
    assert verified_pairs(both, renderer, lambda problem, text: 1.0).dropped == 5


def test_repeated_rows_are_skipped_as_duplicates_unless_kept_on_purpose(tiny_model_dir, tmp_path):
    from rollout.preferences import dedupe_pairs

    renderer = Renderer.from_pretrained(RenderConfig(), tiny_model_dir)
    rows = GOOD + [GOOD[3], GOOD[3], {**GOOD[5], "margin": 2.0}, {**GOOD[5], "rejected": "99"}]
    cfg = PreferenceDataConfig(path=str(_write(tmp_path / "p.jsonl", rows)), margin_key="margin", on_bad_row="error")
    data = load_preferences(cfg, renderer)
    pairs = data.train + data.eval
    # two repeats of row 3 and one of row 5 (a different margin is still the same pair); a new rejected is not
    assert len(pairs) == 11 and data.skipped == {"duplicate": 3}
    assert sum(p.problem.prompt == "5+5=" for p in pairs) == 2
    kept_all = load_preferences(cfg.model_copy(update={"deduplicate": False}), renderer)
    assert len(kept_all.train) + len(kept_all.eval) == 14 and kept_all.skipped == {}
    both = kept_all.train + kept_all.eval
    assert len(dedupe_pairs(both)) == 11 and dedupe_pairs(both)[0] is both[0]
