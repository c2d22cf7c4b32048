"""Build a tiny Llama-style causal LM and a character tokenizer, offline, in HF format.

Contract: `build_tiny_model(out_dir, spec)` writes `config.json`, `model.safetensors` and a
tokenizer (`tokenizer.json` + `tokenizer_config.json`) that `transformers.AutoTokenizer`,
`AutoModelForCausalLM` and vLLM load from the directory with no network. The tokenizer maps each
character of `spec.alphabet` to one token; special tokens are `<pad>`=0, `<bos>`=1, `<eos>`=2, and its
post-processor puts `<bos>` first (`encode(text, add_special_tokens=True)` = `[<bos>] + one id per
character`, the raw rendering of rollout/render.py). It has no chat template. The built-in
Qwen2-shaped model with a BPE tokenizer is learner/bpe_model.py.
The same spec and seed give bit-identical weights, so the directory is a cache keyed by the spec.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
# Bumped when the tokenizer files change for the same spec (2: <bos> added by the post-processor), so a
# cached directory from before is rebuilt rather than silently encoding prompts differently.
TOKENIZER_FORMAT = 2


class TinyModelSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    alphabet: str
    # Defaults (~1.05M params with the arithmetic alphabet) from tests/bench/recipe_probe.py: the
    # smallest size that learned 1-2 digit addition in a few hundred SFT steps and kept climbing under RL.
    hidden_size: int = Field(128, ge=16)
    intermediate_size: int = Field(512, ge=16)
    num_hidden_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    max_position_embeddings: int = Field(64, ge=8)
    seed: int = 0

    def cache_key(self) -> str:
        import hashlib

        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


def build_tokenizer(alphabet: str):
    """A char-level `PreTrainedTokenizerFast`: one token per character, no merges, no spaces on decode."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if len(set(alphabet)) != len(alphabet):
        raise ValueError(f"alphabet {alphabet!r} repeats a character; each character must appear once")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<pad>"
    )


def build_tiny_model(out_dir: str | Path, spec: TinyModelSpec) -> Path:
    """Write a freshly initialised model + tokenizer for `spec` to `out_dir` (idempotent)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    marker = out / "flywheel_spec.json"
    stamp = {**spec.model_dump(), "tokenizer_format": TOKENIZER_FORMAT}
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.alphabet)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    marker.write_text(json.dumps(stamp))
    return out
