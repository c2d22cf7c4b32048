"""HFEngine: shapes, eos handling, seeded determinism, logprob exactness, weight loading; RolloutConfig checks."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError

from rollout.config import RolloutConfig
from rollout.engine import FINISH_LENGTH, FINISH_STOP, make_engine
from rollout.engine_hf import HFEngine, sampling_logprobs

EOS = 2
CFG = RolloutConfig(engine="hf", max_new_tokens=8, max_model_len=64, seed=0)
PROMPTS = [[1, 4, 5, 13, 6, 16], [1, 12, 16], [1, 7, 7, 15, 8, 3, 9, 16]]  # different lengths: padding matters


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return HFEngine(CFG, tiny_model_dir)


@torch.no_grad()
def reference_logprobs(model, prompt, completion, temperature=1.0) -> list[float]:
    ids = torch.tensor([list(prompt) + list(completion)])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None]).squeeze(-1).tolist()


def max_err(a, b) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def test_generate_shapes_and_eos_handling(engine):
    groups = engine.generate(PROMPTS, n=4, seed=1)
    assert [len(g) for g in groups] == [4, 4, 4]
    for c in (c for g in groups for c in g):
        assert 1 <= len(c.token_ids) <= CFG.max_new_tokens and len(c.logprobs) == len(c.token_ids)
        assert EOS not in c.token_ids[:-1]
        assert c.finish_reason == (FINISH_STOP if c.token_ids[-1] == EOS else FINISH_LENGTH)
        assert c.finish_reason == FINISH_STOP or len(c.token_ids) == CFG.max_new_tokens


def test_uniform_policy_stops_at_eos_and_has_exact_logprobs(tiny_model_dir):
    eng = HFEngine(CFG, tiny_model_dir)
    lm_head = eng.model.state_dict()["lm_head.weight"]
    eng.load_weights([("lm_head.weight", torch.zeros_like(lm_head))], policy_version=7)
    assert eng.policy_version == 7
    completions = [c for g in eng.generate(PROMPTS, n=8, seed=0) for c in g]
    vocab = lm_head.shape[0]
    assert all(lp == pytest.approx(-math.log(vocab), abs=1e-6) for c in completions for lp in c.logprobs)
    reasons = {c.finish_reason for c in completions}
    assert reasons == {FINISH_STOP, FINISH_LENGTH}  # 24 uniform draws of 8 tokens: both happen for seed 0


def test_seeded_generate_is_deterministic_and_seed_matters(engine):
    a = engine.generate(PROMPTS, n=3, seed=5)
    assert a == engine.generate(PROMPTS, n=3, seed=5)
    assert a != engine.generate(PROMPTS, n=3, seed=6)
    assert engine.generate(PROMPTS, n=3) != engine.generate(PROMPTS, n=3)  # unseeded: generator advances


def test_behaviour_logprobs_equal_teacher_forced(engine):
    for prompt, group in zip(PROMPTS, engine.generate(PROMPTS, n=4, seed=2)):
        for c in group:
            assert max_err(c.logprobs, engine.teacher_forced_logprobs(prompt, c.token_ids)) < 1e-5
            assert max_err(c.logprobs, reference_logprobs(engine.model, prompt, c.token_ids)) < 1e-5


def test_temperature_logprobs_are_the_sampling_distributions(tiny_model_dir):
    eng = HFEngine(CFG.model_copy(update={"temperature": 0.5}), tiny_model_dir)
    for prompt, group in zip(PROMPTS, eng.generate(PROMPTS, n=2, seed=3)):
        for c in group:
            assert max_err(c.logprobs, reference_logprobs(eng.model, prompt, c.token_ids, 0.5)) < 1e-5
            assert max_err(c.logprobs, reference_logprobs(eng.model, prompt, c.token_ids)) > 1e-2


@torch.no_grad()
def test_greedy_equals_argmax_chain(engine):
    expected = []
    for prompt in PROMPTS:
        ids = list(prompt)
        for _ in range(CFG.max_new_tokens):
            ids.append(int(engine.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == EOS:
                break
        expected.append(tuple(ids[len(prompt) :]))
    assert engine.greedy(PROMPTS) == expected


def test_load_weights_changes_outputs_and_policy_version(tiny_model_dir):
    eng = HFEngine(CFG, tiny_model_dir)
    completion = [5, 9, 11, 2]
    before = eng.teacher_forced_logprobs(PROMPTS[0], completion)
    g = torch.Generator().manual_seed(0)
    new = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in eng.model.state_dict().items()}
    eng.load_weights(new.items(), policy_version=1)
    assert eng.policy_version == 1
    after = eng.teacher_forced_logprobs(PROMPTS[0], completion)
    assert max_err(before, after) > 1e-3
    assert all(torch.equal(v, new[k]) for k, v in eng.model.state_dict().items())


def test_load_weights_rejects_unknown_names_and_shapes_and_recovers_the_starting_weights(tiny_model_dir):
    engine = HFEngine(CFG, tiny_model_dir)
    start = {k: v.clone() for k, v in engine.model.state_dict().items()}
    with pytest.raises(KeyError, match="not a parameter"):
        engine.load_weights([("model.nope.weight", torch.zeros(1))], policy_version=1)
    head = start["lm_head.weight"]
    norm = start["model.norm.weight"]
    with pytest.raises(ValueError, match="shape"):  # streamed: the head went in before the bad norm arrived
        engine.load_weights([("lm_head.weight", torch.zeros_like(head)), ("model.norm.weight", torch.zeros(3))], 1)
    assert engine.policy_version == 0
    assert torch.equal(engine.model.state_dict()["model.norm.weight"], norm)  # the bad tensor was never applied
    engine.reload_initial_weights()  # what the rollout worker does after an update failed midway
    assert engine.policy_version == 0
    assert all(torch.equal(v, start[k]) for k, v in engine.model.state_dict().items())


def test_load_weights_streams_wire_dtype_tensors_and_casts_them_on_load(tiny_model_dir):
    engine = HFEngine(CFG, tiny_model_dir)
    g = torch.Generator().manual_seed(1)
    new = {k: (v + 0.01 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in engine.model.state_dict().items()}
    pulled = []

    def stream():  # one tensor at a time, as buckets arrive; the engine must not need them all at once
        for item in new.items():
            pulled.append(item[0])
            yield item

    engine.load_weights(stream(), policy_version=3)
    assert engine.policy_version == 3 and len(pulled) == len(new)
    for k, v in engine.model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, new[k].float())


@pytest.mark.parametrize(
    "prompts, match",
    [
        ([], "no prompts"),
        ([[]], "prompt 0 is empty"),
        ([[1] * 57], "max_model_len"),
        ([[1, 99]], "outside the vocabulary"),
    ],
)
def test_bad_prompts_raise_clear_errors(engine, prompts, match):
    with pytest.raises(ValueError, match=match):
        engine.generate(prompts, n=2)


def test_sampling_logprobs_top_p_hand_computed():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    p07 = sampling_logprobs(logits, 1.0, 0.7).exp()[0]
    assert torch.allclose(p07, torch.tensor([0.625, 0.375, 0.0]))
    p045 = sampling_logprobs(logits, 1.0, 0.45).exp()[0]
    assert torch.allclose(p045, torch.tensor([1.0, 0.0, 0.0]))
    t2 = sampling_logprobs(logits, 2.0, 1.0).exp()[0]
    assert torch.allclose(t2, torch.tensor([0.5, 0.3, 0.2]).sqrt() / torch.tensor([0.5, 0.3, 0.2]).sqrt().sum())


def test_make_engine_picks_hf_and_import_is_cheap(tiny_model_dir, tmp_path):
    assert isinstance(make_engine(CFG, tiny_model_dir), HFEngine)
    with pytest.raises(FileNotFoundError, match="config.json"):
        make_engine(CFG, tmp_path)
    code = (
        "import sys, rollout.engine, rollout.config; "
        "assert 'vllm' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[3]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"group_size": 1}, "rollout.group_size"),
        ({"temperature": 0.0}, "rollout.temperature"),
        ({"max_new_tokens": 64}, "rollout.max_new_tokens"),
        ({"engine": "tgi"}, "engine"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"devcie": "cpu"}, "devcie"),
    ],
)
def test_rollout_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        RolloutConfig(**kwargs)


def test_max_model_len_beyond_model_positions_is_rejected(tiny_model_dir):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        HFEngine(CFG.model_copy(update={"max_model_len": 65}), tiny_model_dir)


STOP_CHARS = tuple("aeiou0123456789=")


def _stops_inside(tok, ids) -> bool:
    return any(s in tok.decode(list(ids), skip_special_tokens=True) for s in STOP_CHARS)


def test_stop_strings_end_a_completion_at_the_token_that_completes_them(bpe_model_dir):
    from transformers import AutoTokenizer

    from rollout.render import StopConditions

    tok = AutoTokenizer.from_pretrained(bpe_model_dir)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    stop = StopConditions(frozenset({im_end}), STOP_CHARS)
    eng = HFEngine(RolloutConfig(engine="hf", max_new_tokens=12, max_model_len=64), bpe_model_dir, stop)
    prompt = tok.encode("<|im_start|>user\nState the answer: 12 + 3 =<|im_end|>\n<|im_start|>assistant\n")
    completions = [c for g in eng.generate([prompt, prompt[:5]], n=16, seed=3) for c in g]
    by_string = [c for c in completions if c.finish_reason == FINISH_STOP and c.token_ids[-1] != im_end]
    assert by_string, "no completion hit a stop string: the test would prove nothing"
    for c in completions:
        assert len(c.logprobs) == len(c.token_ids)
        assert not _stops_inside(tok, c.token_ids[:-1]) and im_end not in c.token_ids[:-1]  # nothing after a stop
        if c.finish_reason == FINISH_LENGTH:
            assert len(c.token_ids) == 12 and not _stops_inside(tok, c.token_ids)
    for c in by_string:
        assert _stops_inside(tok, c.token_ids)  # the last token completed a stop string and is kept
    greedy = eng.greedy([prompt])[0]
    assert not _stops_inside(tok, greedy[:-1])
