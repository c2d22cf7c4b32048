"""VLLMEngine against a plain transformers reference on the same tiny fp32 model.

One engine per module (start-up dominates). Block size 32 (vLLM CPU minimum) so a 40-token prompt fills a block and
enters the prefix cache, which is what makes the stale-KV trap after a weight update reachable.
"""

from __future__ import annotations

import pytest
import torch

from rollout.config import RolloutConfig
from rollout.engine import FINISH_LENGTH, FINISH_STOP

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # vLLM start-up alone is 5-30 s here

EOS = 2
CFG = RolloutConfig(engine="vllm", max_new_tokens=8, max_model_len=64, block_size=32, seed=0)
PROMPTS = [[1, 4, 5, 13, 6, 16], [1, 12, 3, 14, 16], [1, 7, 7, 15, 8, 16]]  # "<bos>12+3=" etc.
LONG_PROMPT = [1] + [3 + (7 * i) % 14 for i in range(39)]  # 40 tokens: one full 32-token block


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from rollout.engine_vllm import VLLMEngine

    eng = VLLMEngine(CFG, tiny_model_dir)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


@torch.no_grad()
def hf_logprobs(model, prompt, completion, temperature=1.0) -> list[float]:
    ids = torch.tensor([list(prompt) + list(completion)])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None]).squeeze(-1).tolist()


@torch.no_grad()
def hf_greedy(model, prompt, max_new) -> tuple[int, ...]:
    ids = list(prompt)
    for _ in range(max_new):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        if ids[-1] == EOS:
            break
    return tuple(ids[len(prompt) :])


def max_err(a, b) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def test_generate_shapes_and_behaviour_logprobs_match_hf(engine, hf_model):
    groups = engine.generate(PROMPTS, n=4, seed=3)
    assert [len(g) for g in groups] == [4, 4, 4]
    for prompt, group in zip(PROMPTS, groups):
        for c in group:
            assert 1 <= len(c.token_ids) <= CFG.max_new_tokens and len(c.logprobs) == len(c.token_ids)
            assert EOS not in c.token_ids[:-1]
            assert c.finish_reason == (FINISH_STOP if c.token_ids[-1] == EOS else FINISH_LENGTH)
            assert max_err(c.logprobs, hf_logprobs(hf_model, prompt, c.token_ids)) < 1e-4
    assert groups[0] != groups[1], "different prompts must not share sampling noise"
    assert all(len(set(g)) > 1 for g in groups), "samples of one prompt must differ"


def test_seeded_generate_is_deterministic(engine):
    assert engine.generate(PROMPTS, n=3, seed=11) == engine.generate(PROMPTS, n=3, seed=11)


def test_temperature_logprobs_are_the_sampling_distributions(engine, hf_model, monkeypatch):
    # Same LLM (logprobs_mode is fixed at start-up); only the per-request temperature changes.
    monkeypatch.setattr(engine, "cfg", CFG.model_copy(update={"temperature": 0.5}))
    (group,) = engine.generate(PROMPTS[:1], n=4, seed=5)
    for c in group:
        assert max_err(c.logprobs, hf_logprobs(hf_model, PROMPTS[0], c.token_ids, temperature=0.5)) < 1e-4
        assert max_err(c.logprobs, hf_logprobs(hf_model, PROMPTS[0], c.token_ids)) > 1e-2


@torch.no_grad()
def test_top_p_logprobs_match_hf_nucleus(engine, hf_model, monkeypatch):
    from rollout.engine_hf import sampling_logprobs

    monkeypatch.setattr(engine, "cfg", CFG.model_copy(update={"temperature": 0.7, "top_p": 0.5}))
    (group,) = engine.generate(PROMPTS[:1], n=4, seed=6)
    for c in group:
        ids = torch.tensor([PROMPTS[0] + list(c.token_ids)])
        logits = hf_model(input_ids=ids).logits[0, len(PROMPTS[0]) - 1 : -1]
        ref = sampling_logprobs(logits, 0.7, 0.5).gather(-1, ids[0, len(PROMPTS[0]) :, None]).squeeze(-1)
        assert max_err(c.logprobs, ref.tolist()) < 1e-4
        assert (
            max_err(
                c.logprobs,
                sampling_logprobs(logits, 0.7, 1.0).gather(-1, ids[0, len(PROMPTS[0]) :, None]).squeeze(-1).tolist(),
            )
            > 1e-2
        )  # the nucleus renormalisation is really in there


def test_greedy_equals_hf_greedy(engine, hf_model):
    assert engine.greedy(PROMPTS) == [hf_greedy(hf_model, p, CFG.max_new_tokens) for p in PROMPTS]


def test_teacher_forced_matches_hf(engine, hf_model):
    completion = [5, 9, 11, 2]
    assert (
        max_err(engine.teacher_forced_logprobs(PROMPTS[1], completion), hf_logprobs(hf_model, PROMPTS[1], completion))
        < 1e-4
    )


def _perturbed(hf_model, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in hf_model.state_dict().items()}


def test_load_weights_refreshes_cached_prompt(engine, hf_model):
    original = {k: v.clone() for k, v in hf_model.state_dict().items()}
    (before,) = engine.generate([LONG_PROMPT], n=2, seed=1)  # LONG_PROMPT's first block now cached
    completion = list(before[0].token_ids)
    old = engine.teacher_forced_logprobs(LONG_PROMPT, completion)
    new_weights = _perturbed(hf_model, seed=0)
    try:
        engine.load_weights(new_weights.items(), policy_version=1)
        assert engine.policy_version == 1
        hf_model.load_state_dict(new_weights)
        ref = hf_logprobs(hf_model, LONG_PROMPT, completion)
        assert max_err(old, ref) > 1e-3, "perturbation too small to show the update"
        assert max_err(engine.teacher_forced_logprobs(LONG_PROMPT, completion), ref) < 1e-4
        (after,) = engine.generate([LONG_PROMPT], n=2, seed=1)  # reads the prefix cache if stale
        for c in after:
            assert max_err(c.logprobs, hf_logprobs(hf_model, LONG_PROMPT, c.token_ids)) < 1e-4
    finally:
        hf_model.load_state_dict(original)
        engine.load_weights(original.items(), policy_version=2)
    assert engine.generate([LONG_PROMPT], n=2, seed=1) == [before]


def test_without_prefix_cache_reset_cached_prompt_is_stale(engine, hf_model):
    """Guards the test above: skipping reset_prefix_cache really corrupts logprobs of a cached prompt."""
    original = {k: v.clone() for k, v in hf_model.state_dict().items()}
    engine.generate([LONG_PROMPT], n=1, seed=2)
    new_weights = _perturbed(hf_model, seed=1)
    try:
        engine.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": list(new_weights.items()), "is_checkpoint_format": True}
        )
        hf_model.load_state_dict(new_weights)
        (after,) = engine.generate([LONG_PROMPT], n=1, seed=2)
        stale_err = max_err(after[0].logprobs, hf_logprobs(hf_model, LONG_PROMPT, after[0].token_ids))
        print(f"stale prefix-cache logprob error without reset: {stale_err:.4f} nats")
        assert stale_err > 1e-3
    finally:
        hf_model.load_state_dict(original)
        engine.load_weights(original.items(), policy_version=3)


def test_teacher_forced_needs_one_spare_position(engine, hf_model):
    completion = [5, 9, 11, 2]
    fits = [1] + [3 + i % 14 for i in range(CFG.max_model_len - len(completion) - 2)]  # total = max_model_len - 1
    assert max_err(engine.teacher_forced_logprobs(fits, completion), hf_logprobs(hf_model, fits, completion)) < 1e-4
    with pytest.raises(ValueError, match="max_model_len"):
        engine.teacher_forced_logprobs(fits + [3], completion)


def test_bad_tensor_is_rejected_before_vllm_applies_it_and_the_starting_weights_come_back(engine, hf_model):
    version = engine.policy_version
    with pytest.raises(KeyError, match="not a parameter"):
        engine.load_weights([("model.nope.weight", torch.zeros(1))], policy_version=version + 1)
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights([("lm_head.weight", torch.zeros(3, 3))], policy_version=version + 1)
    assert engine.policy_version == version
    engine.reload_initial_weights()  # a streamed reload that failed midway leaves vLLM unusable until a full one
    assert engine.policy_version == 0
    completion = [5, 9, 11, 2]  # the starting weights (hf_model's) are served again
    assert (
        max_err(engine.teacher_forced_logprobs(PROMPTS[1], completion), hf_logprobs(hf_model, PROMPTS[1], completion))
        < 1e-4
    )


def test_bf16_wire_tensors_stream_into_an_fp32_engine(engine, hf_model):
    original = {k: v.clone() for k, v in hf_model.state_dict().items()}
    wire = {k: v.bfloat16() for k, v in _perturbed(hf_model, seed=4).items()}
    completion = [5, 9, 11, 2]
    try:
        engine.load_weights(iter(wire.items()), policy_version=5)  # a one-pass stream, as from the transport
        hf_model.load_state_dict({k: v.float() for k, v in wire.items()})
        got = engine.teacher_forced_logprobs(PROMPTS[0], completion)
        assert max_err(got, hf_logprobs(hf_model, PROMPTS[0], completion)) < 1e-4
    finally:
        hf_model.load_state_dict(original)
        engine.load_weights(original.items(), policy_version=6)
