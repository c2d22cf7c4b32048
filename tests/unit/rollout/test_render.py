"""The Renderer: raw and chat rendering for a char tokenizer (BOS) and a Qwen-like BPE tokenizer (no BOS,
multi-character tokens, ChatML), stop conditions, completion text and cold-start targets."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from learner.tiny_model import build_tokenizer
from rollout.render import RenderConfig, Renderer, RenderError, model_eos_ids
from rollout.tasks import ARITHMETIC_ALPHABET, Problem

PROBLEM = Problem("State the final answer to the following arithmetic problem: 12 + 3 =", "15", "t")


@pytest.fixture(scope="module")
def qwen_tok(bpe_model_dir):
    return AutoTokenizer.from_pretrained(bpe_model_dir)


def chat(**kw) -> RenderConfig:
    return RenderConfig(mode="chat", stop_tokens=("<|im_end|>",), **kw)


def test_raw_char_tokenizer_puts_bos_first_one_id_per_character():
    tok = build_tokenizer(ARITHMETIC_ALPHABET)
    ids = Renderer(RenderConfig(), tok).encode_prompt(Problem("12+34=", "46", "t"))
    assert ids[0] == tok.bos_token_id == 1 and len(ids) == 7
    assert tok.decode(ids[1:]) == "12+34="


def test_raw_char_tokenizer_rejects_characters_outside_its_alphabet():
    with pytest.raises(ValueError, match="does not know"):
        Renderer(RenderConfig(), build_tokenizer(ARITHMETIC_ALPHABET)).encode_prompt(Problem("1 + x", "1", "t"))


def test_raw_bpe_tokenizer_has_no_bos_and_multi_character_tokens(qwen_tok):
    assert qwen_tok.bos_token_id is None
    ids = Renderer(RenderConfig(), qwen_tok).encode_prompt(PROBLEM)
    assert ids == qwen_tok.encode(PROBLEM.prompt, add_special_tokens=False)  # nothing added, no None id
    assert len(ids) < len(PROBLEM.prompt) and None not in ids
    assert qwen_tok.decode(ids) == PROBLEM.prompt
    pieces = qwen_tok.convert_ids_to_tokens(ids)
    assert max(len(p) for p in pieces) > 3 and "1" in pieces and "2" in pieces  # words merge, digits stay single


def test_chat_rendering_is_the_templates_own_ids(qwen_tok):
    renderer = Renderer(chat(system_prompt="Be brief."), qwen_tok)
    ids = renderer.encode_prompt(PROBLEM)
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROBLEM.prompt}]
    expected = qwen_tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert renderer.prompt_text(PROBLEM) == expected
    assert expected.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert expected.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert ids == qwen_tok.encode(expected, add_special_tokens=False)
    assert qwen_tok.convert_ids_to_tokens(ids[:1]) == ["<|im_start|>"]  # a special token, not its characters


def test_chat_turns_from_a_dataset_keep_their_own_system_turn(qwen_tok):
    problem = Problem("q2", "a", "t", messages=(("system", "S"), ("user", "q1"), ("assistant", "a1"), ("user", "q2")))
    text = Renderer(chat(system_prompt="ignored"), qwen_tok).prompt_text(problem)
    assert text.count("<|im_start|>") == 5 and "ignored" not in text and "<|im_start|>assistant\na1<|im_end|>" in text
    with pytest.raises(RenderError, match="render.mode=chat"):
        Renderer(RenderConfig(), qwen_tok).encode_prompt(problem)


def test_chat_without_a_template_is_an_error_naming_the_field():
    with pytest.raises(RenderError, match="render.mode='chat'.*no chat_template"):
        Renderer(RenderConfig(mode="chat"), build_tokenizer(ARITHMETIC_ALPHABET))


def test_stop_tokens_resolve_and_unknown_ones_are_errors(qwen_tok, bpe_model_dir):
    renderer = Renderer(chat(), qwen_tok, model_eos_ids(bpe_model_dir))
    im_end, eot = qwen_tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert renderer.stop.token_ids == {im_end, eot}  # eos + generation_config's eos ids
    assert "'<|im_end|>'" in renderer.describe_stop()
    with pytest.raises(RenderError, match="render.stop_tokens: '<\\|eot_id\\|>' is not a token"):
        Renderer(RenderConfig(stop_tokens=("<|eot_id|>",)), qwen_tok)
    with pytest.raises(RenderError, match="render.stop_tokens: 'answer>'"):
        Renderer(RenderConfig(stop_tokens=("answer>",)), qwen_tok)  # text of several tokens: a stop string
    with pytest.raises(RenderError, match="render.stop_token_ids: 100000"):
        Renderer(RenderConfig(stop_token_ids=(100000,)), qwen_tok)
    with pytest.raises(RenderError, match="no stop condition"):
        Renderer(RenderConfig(stop_at_eos=False), qwen_tok)


def test_completion_text_drops_the_stop_token_special_tokens_and_cuts_at_stop_strings(qwen_tok):
    renderer = Renderer(chat(stop_strings=("</answer>",)), qwen_tok)
    ids = qwen_tok.encode("<answer>15</answer> more", add_special_tokens=False)
    assert renderer.completion_text(ids) == "<answer>15"
    im_end = qwen_tok.convert_tokens_to_ids("<|im_end|>")
    plain = Renderer(chat(), qwen_tok)
    assert plain.completion_text([*qwen_tok.encode("x = 15", add_special_tokens=False), im_end]) == "x = 15"


def test_chat_target_is_the_assistant_turn_up_to_its_stop_token(qwen_tok):
    renderer = Renderer(chat(), qwen_tok)
    target = renderer.target_ids(PROBLEM, "<answer>15</answer>")
    im_end = qwen_tok.convert_tokens_to_ids("<|im_end|>")
    assert target[-1] == im_end and im_end not in target[:-1]
    assert qwen_tok.decode(target[:-1]) == "<answer>15</answer>"
    full = qwen_tok.apply_chat_template(
        [{"role": "user", "content": PROBLEM.prompt}, {"role": "assistant", "content": "<answer>15</answer>"}],
        tokenize=False,
    )
    assert qwen_tok.decode(renderer.encode_prompt(PROBLEM) + target) + "\n" == full


def test_template_end_of_turn_must_be_a_stop_token(qwen_tok):
    # A base-model tokenizer's eos (<|endoftext|>) is not what ChatML closes a turn with: the model would never stop.
    renderer = Renderer(RenderConfig(mode="chat", stop_at_eos=False, stop_tokens=("<|endoftext|>",)), qwen_tok)
    with pytest.raises(RenderError, match="render.stop_tokens"):
        renderer.target_ids(PROBLEM, "15")


def test_raw_target_ends_with_eos(qwen_tok):
    renderer = Renderer(RenderConfig(), qwen_tok)
    assert renderer.target_ids(PROBLEM, "15") == [*qwen_tok.encode("15", add_special_tokens=False), renderer.end_id]
    assert renderer.end_id == qwen_tok.eos_token_id
