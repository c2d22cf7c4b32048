"""`learner.logprobs`: chunked completion-only log-probs and entropy equal the full log-softmax, in value
and in gradient (fp32, atol 1e-5 on values, 1e-5 relative on gradients); the value head; the fallback."""

from __future__ import annotations

import pytest
import torch

from learner.batch import collate
from learner.logprobs import CompletionModel, chunked_head_logprobs, completion_outputs
from replay.schema import traces_to_batch
from tests.unit.learner.test_batch import random_traces


def tiny_qwen(vocab: int = 512, seed: int = 0, **overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        **overrides,
    )
    return Qwen2ForCausalLM(cfg).float()


def full_reference(model, tb, temperature):
    """The previous path: full [B, T, V] logits, log_softmax, gather; entropy from the full distribution."""
    out = model(input_ids=tb.input_ids, attention_mask=tb.attention_mask, position_ids=tb.position_ids)
    p, t = tb.prompt_len, tb.completion_ids.shape[1]
    logp_all = torch.log_softmax(out.logits[:, p - 1 : p - 1 + t].float() / temperature, dim=-1)
    logp = logp_all.gather(-1, tb.completion_ids[..., None]).squeeze(-1) * tb.mask
    entropy = -(logp_all.exp() * logp_all).sum(-1) * tb.mask
    return logp, entropy


def batch(seed=0):
    return collate(traces_to_batch(random_traces(seed, groups=3, size=3)), pad_id=0)


@pytest.mark.parametrize("chunk", [1, 7, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_and_entropy_equal_the_full_log_softmax(chunk, temperature):
    model, tb = tiny_qwen(), batch()
    want_lp, want_ent = full_reference(model, tb, temperature)
    got_lp, got_ent, values = completion_outputs(model, tb.tokens(), temperature, chunk, "detached")
    assert values is None
    assert torch.allclose(got_lp, want_lp, atol=1e-5), (got_lp - want_lp).abs().max()
    assert torch.allclose(got_ent, want_ent, atol=1e-5)
    assert (got_lp[tb.mask == 0] == 0).all() and (got_ent[tb.mask == 0] == 0).all()


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_chunked_gradients_equal_the_full_path_for_logprobs_and_entropy():
    model, tb = tiny_qwen(seed=1), batch(1)
    weights = torch.randn(tb.mask.shape, generator=torch.Generator().manual_seed(0))
    want_lp, want_ent = full_reference(model, tb, 0.9)
    want = _grads(model, (want_lp * weights).sum() + 0.3 * (want_ent * weights).sum())
    got_lp, got_ent, _ = completion_outputs(model, tb.tokens(), 0.9, 5, "grad")
    got = _grads(model, (got_lp * weights).sum() + 0.3 * (got_ent * weights).sum())
    assert want.keys() == got.keys()
    for name in want:
        scale = want[name].abs().max().clamp(min=1e-6)
        assert ((got[name] - want[name]).abs().max() / scale) < 1e-5, name


def test_detached_entropy_carries_no_gradient_and_none_is_not_computed():
    model, tb = tiny_qwen(), batch()
    _, ent, _ = completion_outputs(model, tb.tokens(), 1.0, 8, "detached")
    assert not ent.requires_grad
    _, ent, _ = completion_outputs(model, tb.tokens(), 1.0, 8, "none")
    assert ent is None


def test_no_full_vocabulary_tensor_in_the_forward():
    # a [B, T, V] tensor of this batch would be B*T*V floats; the chunked path peaks at chunk*V per tensor
    model, tb = tiny_qwen(vocab=4096), batch()
    b, t = tb.mask.shape
    seen = []

    def record(_module, _inputs, output):
        seen.append(output.numel())

    handle = model.get_output_embeddings().register_forward_hook(record)
    completion_outputs(model, tb.tokens(), 1.0, 4, "grad")
    handle.remove()
    assert seen and max(seen) <= 4 * 4096 < b * t * 4096


def test_value_head_reads_the_trunk_at_the_positions_before_each_token():
    model, tb = tiny_qwen(), batch()
    wrapped = CompletionModel(model, value_head=True, chunk_tokens=3)
    torch.nn.init.normal_(wrapped.value_head.weight)
    lp, _, values = wrapped(tb.input_ids, tb.attention_mask, tb.position_ids, tb.completion_ids, tb.mask)
    hidden = model.model(input_ids=tb.input_ids, attention_mask=tb.attention_mask, position_ids=tb.position_ids)
    p, t = tb.prompt_len, tb.completion_ids.shape[1]
    want = wrapped.value_head(hidden.last_hidden_state[:, p - 1 : p - 1 + t]).squeeze(-1)
    assert torch.allclose(values, want, atol=1e-6)
    assert torch.allclose(lp, full_reference(model, tb, 1.0)[0], atol=1e-5)


def test_heads_with_a_logit_transform_use_the_full_logits_path():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=5.0,
    )
    model, tb = Gemma2ForCausalLM(cfg).float(), batch()
    want_lp, _ = full_reference(model, tb, 1.0)
    got_lp, _, _ = completion_outputs(model, tb.tokens(), 1.0, 4)
    assert torch.allclose(got_lp, want_lp, atol=1e-5)


def test_chunked_head_on_no_tokens_is_empty():
    head = torch.nn.Linear(8, 20, bias=False)
    logp, ent = chunked_head_logprobs(head, torch.zeros(0, 8), torch.zeros(0, dtype=torch.long), entropy="grad")
    assert logp.shape == (0,) and ent.shape == (0,)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy", ["none", "detached"])
def test_hand_written_head_gradient_equals_autograd_through_the_full_log_softmax(temperature, entropy):
    # the plain linear head (tied, bias-free) takes _LinearHeadLogprob; fp32, 1e-5 relative on gradients
    model, tb = tiny_qwen(seed=2), batch(2)
    weights = torch.randn(tb.mask.shape, generator=torch.Generator().manual_seed(1))
    want_lp, want_ent = full_reference(model, tb, temperature)
    want = _grads(model, (want_lp * weights).sum())
    calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    got_lp, got_ent, _ = completion_outputs(model, tb.tokens(), temperature, 5, entropy)
    handle.remove()
    assert not calls  # the module was not called: the hand-written path ran
    assert torch.allclose(got_lp, want_lp, atol=1e-5)
    if entropy == "detached":
        assert not got_ent.requires_grad and torch.allclose(got_ent, want_ent, atol=1e-5)
    got = _grads(model, (got_lp * weights).sum())
    assert want.keys() == got.keys()
    for name in want:
        scale = want[name].abs().max().clamp(min=1e-6)
        assert ((got[name] - want[name]).abs().max() / scale) < 1e-5, name


def test_hand_written_head_gradient_in_bf16_matches_the_checkpointed_path():
    # bf16 head and hidden states: the same logits rounding as the module path, so gradients agree to
    # bf16 rounding (2e-2 relative); hidden [n, H] and the head weight both get gradients
    torch.manual_seed(3)
    head = torch.nn.Linear(16, 300, bias=False).to(torch.bfloat16)
    hidden = torch.randn(23, 16, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 300, (23,))
    g = torch.randn(23)
    out = {}
    for name, fused in (("fused", True), ("module", False)):
        head.zero_grad()
        hidden.grad = None
        wrapped = head if fused else torch.nn.Sequential(head)  # not a bare Linear: the checkpointed path
        logp, _ = chunked_head_logprobs(wrapped, hidden, targets, 0.8, 6, "none")
        (logp * g).sum().backward()
        out[name] = (logp.detach(), hidden.grad.clone(), head.weight.grad.clone())
    for got, want in zip(out["fused"], out["module"]):
        assert ((got.float() - want.float()).abs().max() / want.float().abs().max()) < 2e-2
