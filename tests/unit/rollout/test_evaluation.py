"""Greedy decoding handles left padding and stop tokens; accuracy uses the renderer and the given verifier."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from learner.tiny_model import build_tokenizer
from rollout.evaluation import greedy_accuracy, greedy_generate
from rollout.render import RenderConfig, Renderer
from rollout.tasks import ARITHMETIC_ALPHABET, ArithmeticTask, Problem, TaskConfig

SCORE = ArithmeticTask(TaskConfig()).score


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(ARITHMETIC_ALPHABET)


@pytest.fixture(scope="module")
def renderer(tok):
    return Renderer(RenderConfig(), tok)


class ScriptedLM(torch.nn.Module):
    """Emits, after the '=' of each row, `answer_of(prompt)` then <eos> (a fake with known outputs)."""

    def __init__(self, tokenizer, answer_of):
        super().__init__()
        self.tok, self.answer_of = tokenizer, answer_of

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=False):
        # Its "cache" is the ids seen so far: with one, `input_ids` holds only the new tokens.
        if past_key_values is not None:
            input_ids = torch.cat([past_key_values, input_ids], dim=1)
        logits = torch.zeros(*input_ids.shape, len(self.tok))
        for i, row in enumerate(input_ids.tolist()):
            text = self.tok.decode([t for t, m in zip(row, attention_mask[i].tolist()) if m], skip_special_tokens=True)
            prompt, _, done = text.partition("=")
            target = self.tok.encode(self.answer_of(prompt + "="), add_special_tokens=False) + [self.tok.eos_token_id]
            logits[i, -1, target[min(len(done), len(target) - 1)]] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=input_ids if use_cache else None)


PROBLEMS = [
    Problem("1+2=", "3", "arithmetic+"),
    Problem("45+67=", "112", "arithmetic+"),
    Problem("999+1=", "1000", "arithmetic+"),
]


def test_oracle_scores_one_and_constant_scores_zero(tok, renderer):
    truth = {p.prompt: p.answer for p in PROBLEMS}
    assert greedy_accuracy(ScriptedLM(tok, truth.__getitem__), renderer, PROBLEMS, 6, SCORE) == 1.0
    assert greedy_accuracy(ScriptedLM(tok, lambda _: "7"), renderer, PROBLEMS, 6, SCORE) == 0.0


def test_partial_accuracy_and_small_batches(tok, renderer):
    wrong_on_second = {"1+2=": "3", "45+67=": "111", "999+1=": "1000"}
    acc = greedy_accuracy(ScriptedLM(tok, wrong_on_second.__getitem__), renderer, PROBLEMS, 6, SCORE, batch_size=2)
    assert acc == pytest.approx(2 / 3)


def test_budget_truncates_completion(tok, renderer):
    truth = {p.prompt: p.answer for p in PROBLEMS}
    # 3 tokens cannot spell "1000": only the first two problems can be right.
    assert greedy_accuracy(ScriptedLM(tok, truth.__getitem__), renderer, PROBLEMS, 3, SCORE) == pytest.approx(2 / 3)


def test_the_given_score_function_decides_and_partial_credit_is_not_correct(tok, renderer):
    truth = {p.prompt: p.answer for p in PROBLEMS}
    lm = ScriptedLM(tok, truth.__getitem__)
    assert greedy_accuracy(lm, renderer, PROBLEMS, 6, lambda p, c: float(c == "3")) == pytest.approx(1 / 3)
    assert greedy_accuracy(lm, renderer, PROBLEMS, 6, lambda p, c: 0.99) == 0.0


@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_matches_single_rows(tiny_model_dir, tok, renderer, use_cache):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [renderer.encode_prompt(p) for p in PROBLEMS]
    stop = {tok.eos_token_id}
    batched = greedy_generate(model, prompts, stop, tok.pad_token_id, 8, use_cache)
    singles = [greedy_generate(model, [p], stop, tok.pad_token_id, 8, use_cache)[0] for p in prompts]
    assert batched == singles
    assert all(len(c) <= 8 and tok.eos_token_id not in c[:-1] for c in batched)


def test_empty_problem_list_is_an_error(tok, renderer):
    with pytest.raises(ValueError, match="no problems"):
        greedy_accuracy(ScriptedLM(tok, lambda _: "1"), renderer, [], 4, SCORE)


def test_kv_cache_decodes_exactly_what_recomputing_the_prefix_does(tiny_model_dir, bpe_model_dir, tok, renderer):
    """Greedy, left-padded, rows stopping at different steps: the cached path (HF `past_key_values`) gives the
    same tokens as recomputing the whole prefix, on the char Llama and the Qwen2-shaped BPE model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = [renderer.encode_prompt(p) for p in PROBLEMS]
    llama = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for stop in ({tok.eos_token_id}, set(), {prompts[0][-1]}):  # eos, no stop (full budget), a frequent token
        cached = greedy_generate(llama, prompts, stop, tok.pad_token_id, 16, use_cache=True)
        assert cached == greedy_generate(llama, prompts, stop, tok.pad_token_id, 16, use_cache=False)
    assert [len(c) for c in greedy_generate(llama, prompts, set(), tok.pad_token_id, 16)] == [16, 16, 16]
    bpe_tok = AutoTokenizer.from_pretrained(bpe_model_dir)
    qwen = AutoModelForCausalLM.from_pretrained(bpe_model_dir).eval()
    rows = [bpe_tok.encode(t) for t in ("What is 1+2?", "Add 45 and 67, then reverse the digits:", "Hi")]
    pad = bpe_tok.pad_token_id if bpe_tok.pad_token_id is not None else 0
    cached = greedy_generate(qwen, rows, set(), pad, 12, use_cache=True)
    assert cached == greedy_generate(qwen, rows, set(), pad, 12, use_cache=False)
    assert len(set(map(tuple, cached))) > 1  # rows differ: the comparison is not between constant outputs
