"""The built-in faithful double of a real checkpoint: a Qwen2-architecture causal LM with a byte-level BPE
tokenizer trained offline on the task's text, in HF format.

Contract: `build_bpe_model(out_dir, spec, corpus)` writes `config.json`, `generation_config.json`,
`model.safetensors` and a tokenizer that `AutoTokenizer`, `AutoModelForCausalLM` and vLLM load from the
directory with no network, shaped like a Qwen2.5-Instruct checkpoint:
- byte-level BPE (Qwen2's pre-tokenizer regex: digits split one by one, NFC), trained with the
  `tokenizers` library on `corpus`; special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`;
- **no BOS** (`bos_token` None), eos `<|im_end|>`, pad `<|endoftext|>`; the generation config lists both
  ends as eos ids;
- a ChatML chat template (`<|im_start|>role\\ncontent<|im_end|>\\n`, generation prompt
  `<|im_start|>assistant\\n`), without Qwen's default system prompt;
- `Qwen2ForCausalLM` with grouped-query attention, qkv biases, tied embeddings by default and the
  embedding rows padded past the tokenizer's size (as Qwen pads 151,665 tokens to 151,936 rows).
The same spec, corpus and seed give bit-identical files; the directory is a cache keyed by both.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

# Qwen2's pre-tokenizer split (tokenizer.json of the Qwen2/2.5 releases): contractions, letter runs,
# single digits, punctuation runs, newlines, spaces.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
FORMAT = 1  # bumped when the files written for the same spec change


class BPEModelSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    vocab_size: int = Field(1024, ge=260, description="BPE tokenizer size incl. 256 byte tokens and 3 specials")
    hidden_size: int = Field(128, ge=16)
    intermediate_size: int = Field(512, ge=16)
    num_hidden_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int | None = Field(None, ge=1, description="None = num_attention_heads // 2 (GQA)")
    max_position_embeddings: int = Field(256, ge=8)
    tie_word_embeddings: bool = True
    # 10k (Qwen2Config's default) rather than Qwen2.5's 1M: a 1M base barely rotates most dimensions over the
    # ~100 positions of a built-in model, leaving it little sense of digit positions.
    rope_theta: float = Field(10_000.0, gt=0)
    pad_vocab_to: int = Field(64, ge=1, description="embedding rows rounded up to a multiple of this")
    seed: int = 0


def corpus_digest(corpus: Sequence[str]) -> str:
    h = hashlib.sha256()
    for text in corpus:
        h.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def build_bpe_tokenizer(corpus: Sequence[str], vocab_size: int):
    """A Qwen2-style byte-level BPE `PreTrainedTokenizerFast` trained on `corpus` (no BOS, ChatML template)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    return Qwen2TokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        chat_template=CHATML_TEMPLATE,
    )


def _num_kv_heads(spec: BPEModelSpec) -> int:
    kv = spec.num_key_value_heads or max(1, spec.num_attention_heads // 2)
    if spec.num_attention_heads % kv:
        raise ValueError(
            f"num_attention_heads={spec.num_attention_heads} is not a multiple of num_key_value_heads={kv}"
        )
    return kv


def build_bpe_model(out_dir: str | Path, spec: BPEModelSpec, corpus: Sequence[str]) -> Path:
    """Write a freshly initialised model + tokenizer trained on `corpus` to `out_dir` (idempotent)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    marker = out / "flywheel_spec.json"
    stamp = {**spec.model_dump(), "corpus_sha256": corpus_digest(corpus), "format": FORMAT}
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return out
    if not corpus:
        raise ValueError("the BPE tokenizer needs training text: the task gave an empty corpus")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_bpe_tokenizer(corpus, spec.vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (ENDOFTEXT, IM_END)}
    rows = -(-len(tokenizer) // spec.pad_vocab_to) * spec.pad_vocab_to
    config = Qwen2Config(
        vocab_size=rows,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=_num_kv_heads(spec),
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=ids[IM_END],
        pad_token_id=ids[ENDOFTEXT],
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids[IM_END], ids[ENDOFTEXT]], pad_token_id=ids[ENDOFTEXT], bos_token_id=None
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    marker.write_text(json.dumps(stamp))
    return out
