"""The cold start: batch layout (char/raw and BPE/chat), worked solutions, loss goes down, determinism, the cache."""

from __future__ import annotations

import json

import pytest
import torch

from learner.sft import (
    MARKER,
    SFTConfig,
    cache_key,
    cold_start,
    lr_factor,
    reference_examples,
    save_cold_start,
    sft_batch,
    train_sft,
)
from learner.tiny_model import build_tokenizer
from rollout.render import RenderConfig, Renderer
from rollout.tasks import ARITHMETIC_ALPHABET, ArithmeticTask, Problem, TaskConfig

TASK = ArithmeticTask(TaskConfig(min_digits=1, max_digits=1))


def test_batch_masks_prompt_and_pads():
    tok = build_tokenizer(ARITHMETIC_ALPHABET)
    examples = [(Problem("1+2=", "3", "a"), "3"), (Problem("10+20=", "30", "a"), "30")]
    ids, labels, mask = sft_batch(Renderer(RenderConfig(), tok), examples)
    c = {ch: tok.convert_tokens_to_ids(ch) for ch in ARITHMETIC_ALPHABET}
    assert ids[0].tolist() == [1, c["1"], c["+"], c["2"], c["="], c["3"], 2, 0, 0, 0]
    assert labels[0].tolist() == [-100] * 5 + [c["3"], 2] + [-100] * 3
    assert ids[1].tolist() == [1, c["1"], c["0"], c["+"], c["2"], c["0"], c["="], c["3"], c["0"], 2]
    assert labels[1].tolist() == [-100] * 7 + [c["3"], c["0"], 2]
    assert mask.tolist() == [[1] * 7 + [0] * 3, [1] * 10]


def test_lr_schedule_values():
    cfg = SFTConfig(steps=110, warmup_steps=10, schedule="cosine")
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.55)
    assert lr_factor(110, cfg) == pytest.approx(0.1)
    assert lr_factor(50, SFTConfig(warmup_steps=10, schedule="constant")) == 1.0


def test_config_rejects_unknown_fields():
    with pytest.raises(ValueError):
        SFTConfig(stepz=3)


def test_training_reduces_loss(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    renderer = Renderer(RenderConfig(), AutoTokenizer.from_pretrained(tiny_model_dir))
    cfg = SFTConfig(steps=40, batch_size=16, warmup_steps=5)
    losses = train_sft(model, renderer, reference_examples(TASK, 0), cfg)
    assert len(losses) == 40
    assert losses[0] > 2.0  # ~ln(vocab=17) at init
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_cold_start_is_deterministic_and_cached(tiny_model_dir, tmp_path):
    cfg = SFTConfig(steps=3, batch_size=4, warmup_steps=1)
    a = cold_start(tiny_model_dir, tmp_path / "a", TASK, cfg, threads=1)
    b = cold_start(tiny_model_dir, tmp_path / "b", TASK, cfg, threads=1)
    wa, wb, w0 = _weights(a), _weights(b), _weights(tiny_model_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], w0[k]) for k in wa)
    assert (a / "tokenizer.json").exists()
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    assert cold_start(tiny_model_dir, tmp_path / "a", TASK, cfg) == tmp_path / "a"
    assert (a / "model.safetensors").stat().st_mtime_ns == stamp
    cold_start(tiny_model_dir, tmp_path / "a", TASK, cfg.model_copy(update={"steps": 4}))
    assert json.loads((a / MARKER).read_text())["key"]["sft"]["steps"] == 4


def test_a_cold_start_trained_elsewhere_and_saved_under_its_key_is_reused(tiny_model_dir, tmp_path):
    """cold_start_curve.py --save: a model trained outside `cold_start` and saved under the same key is what the
    driver's `cold_start` returns, untouched; a different config still trains."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = SFTConfig(steps=3, batch_size=4, warmup_steps=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    renderer = Renderer(RenderConfig(), AutoTokenizer.from_pretrained(tiny_model_dir))
    losses = train_sft(model, renderer, reference_examples(TASK, 0), cfg)
    out = save_cold_start(
        model, renderer, tmp_path / "c", cache_key(tiny_model_dir, TASK, cfg, RenderConfig()), losses[-1]
    )
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert cold_start(tiny_model_dir, out, TASK, cfg) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((out / MARKER).read_text())["final_loss"] == losses[-1]
    cold_start(tiny_model_dir, out, TASK, cfg.model_copy(update={"steps": 2}))
    assert (out / "model.safetensors").stat().st_mtime_ns != stamp


def test_missing_base_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="build the base model"):
        cold_start(tmp_path / "nope", tmp_path / "out", TASK, SFTConfig(steps=1))


def test_chat_batch_trains_on_the_assistant_tokens_only(bpe_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bpe_model_dir)
    renderer = Renderer(RenderConfig(mode="chat", system_prompt="Be brief.", stop_tokens=("<|im_end|>",)), tok)
    problem = Problem("State the final answer to the following arithmetic problem: 12 + 3 =", "15", "t")
    ids, labels, mask = sft_batch(renderer, [(problem, "<answer>15</answer>"), (problem, "15")])
    trained = [[t for t, lab in zip(ids[i].tolist(), labels[i].tolist()) if lab != -100] for i in range(2)]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(trained[0]) == "<answer>15</answer><|im_end|>" and trained[0][-1] == im_end
    assert tok.decode(trained[1]) == "15<|im_end|>"
    prompt = renderer.encode_prompt(problem)
    assert ids[0, : len(prompt)].tolist() == prompt and (labels[0, : len(prompt)] == -100).all()
    assert mask[1].sum() == len(prompt) + len(trained[1])  # right padding after the shorter row
    assert tok.bos_token_id is None and None not in ids.flatten().tolist()


def test_worked_solutions_are_loaded_and_held_out_prompts_dropped(tmp_path):
    from learner.sft import load_solutions, training_examples
    from rollout.datasets import DatasetError

    held_out = TASK.eval_set()[0].prompt
    rows = [{"prompt": "1+2=", "completion": "1 then 2: 3"}, {"prompt": held_out, "completion": "x"}]
    path = tmp_path / "solutions.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    examples = load_solutions(path, {held_out})
    assert [(p.prompt, c) for p, c in examples] == [("1+2=", "1 then 2: 3")]
    stream = training_examples(TASK, SFTConfig(solutions_path=str(path)))
    assert [next(stream)[1] for _ in range(3)] == ["1 then 2: 3"] * 3
    path.write_text('{"prompt": "1+2="}\n')
    with pytest.raises(DatasetError, match=r"solutions.jsonl:1: .*cold_start.solutions_path"):
        load_solutions(path, set())


def test_cache_key_covers_render_and_tokenizer(tiny_model_dir, tmp_path):
    import shutil

    from learner.sft import cache_key

    cfg = SFTConfig(steps=1)
    key = cache_key(tiny_model_dir, TASK, cfg, RenderConfig())
    assert cache_key(tiny_model_dir, TASK, cfg, RenderConfig(stop_strings=("=",))) != key
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert cache_key(copy, TASK, cfg, RenderConfig()) == key
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text().replace('"<bos>"', '"<BOS>"'))
    assert cache_key(copy, TASK, cfg, RenderConfig()) != key
