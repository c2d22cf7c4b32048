"""Stop conditions on the Qwen-shaped BPE model (no BOS, ChatML): vLLM and the HF engine end completions at the
same token for stop tokens and stop strings, keep every sampled token with its logprob, and vLLM on CPU survives
a batch of seeded chat prompts larger than its prefill token budget."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollout.config import RolloutConfig
from rollout.engine import FINISH_LENGTH, FINISH_STOP
from rollout.render import RenderConfig, Renderer, model_eos_ids
from rollout.tasks import Problem

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CFG = RolloutConfig(engine="vllm", max_new_tokens=10, max_model_len=96, seed=0)
STOP_CHARS = ("a", "e", "1", "5", "=")


@pytest.fixture(scope="module")
def renderer(bpe_model_dir):
    cfg = RenderConfig(mode="chat", stop_tokens=("<|im_end|>",), stop_strings=STOP_CHARS)
    return Renderer(cfg, AutoTokenizer.from_pretrained(bpe_model_dir), model_eos_ids(bpe_model_dir))


@pytest.fixture(scope="module")
def engines(bpe_model_dir, renderer):
    from rollout.engine_hf import HFEngine
    from rollout.engine_vllm import VLLMEngine

    vllm = VLLMEngine(CFG, bpe_model_dir, renderer.stop)
    yield vllm, HFEngine(CFG.model_copy(update={"engine": "hf"}), bpe_model_dir, renderer.stop)
    vllm.shutdown()


def prompts(renderer, n: int) -> list[list[int]]:
    return [renderer.encode_prompt(Problem(f"State the final answer: {i} + {3 * i} =", "", "t")) for i in range(n)]


def stopped_inside(renderer, ids) -> bool:
    text = renderer.tokenizer.decode(list(ids), skip_special_tokens=True)
    return any(s in text for s in STOP_CHARS)


def test_greedy_stops_at_the_same_token_in_both_engines(engines, renderer):
    vllm, hf = engines
    ps = prompts(renderer, 6)
    assert renderer.tokenizer.bos_token_id is None and all(
        p[0] == renderer.tokenizer.convert_tokens_to_ids("<|im_start|>") for p in ps
    )
    assert vllm.greedy(ps) == hf.greedy(ps)


def test_sampled_completions_end_at_a_stop_and_keep_their_logprobs(engines, renderer, bpe_model_dir):
    vllm, _ = engines
    model = AutoModelForCausalLM.from_pretrained(bpe_model_dir, dtype=torch.float32).eval()
    ps = prompts(renderer, 4)
    groups = vllm.generate(ps, n=8, seed=5)
    by_string = 0
    for prompt, group in zip(ps, groups):
        for c in group:
            assert len(c.logprobs) == len(c.token_ids) >= 1
            assert not stopped_inside(renderer, c.token_ids[:-1])  # nothing sampled after a stop
            if c.finish_reason == FINISH_LENGTH:
                assert len(c.token_ids) == CFG.max_new_tokens and not stopped_inside(renderer, c.token_ids)
            elif c.token_ids[-1] not in renderer.stop.token_ids:
                by_string += 1
                assert c.finish_reason == FINISH_STOP and stopped_inside(renderer, c.token_ids)
            with torch.no_grad():
                ids = torch.tensor([prompt + list(c.token_ids)])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1 : -1], -1)
            ref = logp.gather(-1, ids[0, len(prompt) :, None]).squeeze(-1).tolist()
            assert max(abs(a - b) for a, b in zip(ref, c.logprobs)) < 1e-4
            assert not any(s in renderer.completion_text(c.token_ids) for s in STOP_CHARS)
    assert by_string > 0, "no completion stopped on a string: the test would prove nothing"


def test_seeded_batch_beyond_the_prefill_budget(engines, renderer):
    vllm, _ = engines
    ps = prompts(renderer, 40)
    assert sum(len(p) for p in ps) * 8 > 4096  # vLLM's CPU max_num_batched_tokens
    groups = vllm.generate(ps, n=8, seed=11)
    assert [len(g) for g in groups] == [8] * 40


def test_reloading_tied_embeddings_updates_the_lm_head(engines, renderer, bpe_model_dir):
    """The head shares the embedding's weight; a reload sends it under the embedding's name only."""
    vllm, _ = engines
    model = AutoModelForCausalLM.from_pretrained(bpe_model_dir, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings and "lm_head.weight" not in dict(model.named_parameters())
    torch.manual_seed(0)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.05 * torch.randn_like(model.model.embed_tokens.weight))
    vllm.load_weights(list(model.named_parameters()), policy_version=1)
    prompt, completion = prompts(renderer, 1)[0], [7, 8, 9, 10]
    with torch.no_grad():
        ids = torch.tensor([prompt + completion])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1 : -1], -1)
    ref = logp.gather(-1, ids[0, len(prompt) :, None]).squeeze(-1).tolist()
    assert max(abs(a - b) for a, b in zip(ref, vllm.teacher_forced_logprobs(prompt, completion))) < 1e-4
