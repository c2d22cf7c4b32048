"""The built-in Qwen2-shaped BPE model: loads like a Qwen checkpoint (no BOS, ChatML, two ends, padded vocab),
digits tokenised one by one, and a cache keyed by spec and training text."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learner.bpe_model import BPEModelSpec, build_bpe_model
from tests.conftest import BPE_CORPUS


def test_shape_of_a_qwen_checkpoint(bpe_model_dir):
    tok = AutoTokenizer.from_pretrained(bpe_model_dir)
    model = AutoModelForCausalLM.from_pretrained(bpe_model_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.tie_word_embeddings
    assert tok.bos_token is None and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size > len(tok)  # padded rows, as Qwen
    assert model.config.num_key_value_heads == model.config.num_attention_heads // 2
    gen = json.loads((bpe_model_dir / "generation_config.json").read_text())
    assert set(gen["eos_token_id"]) == set(tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_ids_to_tokens(tok.encode("1234", add_special_tokens=False)) == ["1", "2", "3", "4"]
    assert tok.encode("héllo wörld", add_special_tokens=False)  # byte-level: any text encodes, no unknowns
    assert tok.decode(tok.encode("héllo wörld", add_special_tokens=False)) == "héllo wörld"


def test_same_spec_and_corpus_give_identical_files_and_a_cache_hit(tmp_path):
    spec = BPEModelSpec(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    a = build_bpe_model(tmp_path / "a", spec, BPE_CORPUS)
    b = build_bpe_model(tmp_path / "b", spec, BPE_CORPUS)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    assert (
        build_bpe_model(tmp_path / "a", spec, BPE_CORPUS) == a and (a / "model.safetensors").stat().st_mtime_ns == stamp
    )
    build_bpe_model(tmp_path / "a", spec, [*BPE_CORPUS, "new text"])  # other training text: rebuilt
    assert (a / "model.safetensors").stat().st_mtime_ns != stamp


def test_forward_pass_and_sizes(tmp_path):
    spec = BPEModelSpec(
        hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1
    )
    model = AutoModelForCausalLM.from_pretrained(build_bpe_model(tmp_path, spec, BPE_CORPUS))
    assert model.config.num_key_value_heads == 1 and model.config.num_hidden_layers == 3
    logits = model(input_ids=torch.tensor([[3, 4, 5]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size) and torch.isfinite(logits).all()
