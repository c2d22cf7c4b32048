"""Shared test fixtures: a tiny model + tokenizer built once per session (no network)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# The run secret the driver gives every actor (services/auth.py); tests that build transports or actors
# directly get this one (local Ray workers inherit it). Tests of a missing or wrong secret override it.
os.environ.setdefault("FLYWHEEL_RUN_SECRET", "flywheel-test-secret")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A freshly initialised 2-layer Llama + char tokenizer for the arithmetic alphabet, in HF format."""
    from learner.tiny_model import TinyModelSpec, build_tiny_model
    from rollout.tasks import ARITHMETIC_ALPHABET

    spec = TinyModelSpec(
        alphabet=ARITHMETIC_ALPHABET, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2
    )
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), spec)


BPE_CORPUS = [
    *(f"State the final answer to the following arithmetic problem: {a} + {b} =" for a in range(40) for b in (3, 17)),
    *(f"<answer>{a + 3}</answer>" for a in range(40)),
    "Calculate the sum. Answer: 12\n#### 12 \\boxed{12} héllo wörld",
]


@pytest.fixture(scope="session")
def bpe_model_dir(tmp_path_factory):
    """A tiny Qwen2-architecture model with a byte-level BPE tokenizer (no BOS, ChatML template), in HF format."""
    from learner.bpe_model import BPEModelSpec, build_bpe_model

    spec = BPEModelSpec(
        vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2
    )  # head size 32: the smallest vLLM's CPU attention runs
    return build_bpe_model(tmp_path_factory.mktemp("bpe_model"), spec, BPE_CORPUS)
