"""The reasoning-gym task source: config checks, a held-out split by seed, determinism, over-long prompts."""

from __future__ import annotations

import itertools

import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from rollout.reasoning_gym_task import ReasoningGymTask, ReasoningGymTaskConfig
from rollout.render import RenderConfig, Renderer
from rollout.tasks import make_task

SMALL = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}  # 200 distinct problems


def cfg(**kw) -> ReasoningGymTaskConfig:
    return ReasoningGymTaskConfig(
        **{"name": "chain_sum", "params": SMALL, "max_prompt_tokens": 64, "eval_size": 40, **kw}
    )


def test_bad_generator_or_parameter_is_a_config_error():
    with pytest.raises(ValidationError, match="task.name='no_such_task'"):
        cfg(name="no_such_task")
    with pytest.raises(ValidationError, match="task.params"):
        cfg(params={"min_terms": 2, "bogus_knob": 1})


def test_eval_split_is_fixed_and_never_trained_on():
    task = make_task(cfg())
    assert isinstance(task, ReasoningGymTask)
    evals = task.eval_set()
    assert len(evals) == 40 == len({p.prompt for p in evals})
    assert make_task(cfg()).eval_set() == evals and make_task(cfg(seed=1)).eval_set() != evals
    train = list(itertools.islice(task.train_stream(seed=7), 2000))
    assert not {p.prompt for p in evals} & {p.prompt for p in train}
    assert task.skipped_rows["in_eval_split"] > 0  # the small problem space made the stream skip eval questions
    assert train[:50] == list(itertools.islice(make_task(cfg()).train_stream(seed=7), 50))
    assert train[:50] != list(itertools.islice(task.train_stream(seed=8), 50))


def test_problems_carry_the_entry_and_score_with_the_generators_scorer():
    task = make_task(cfg())
    p = task.eval_set()[0]
    assert p.task == "chain_sum" and p.metadata and "State the final answer" in p.prompt
    assert task.reference_completion(p) == f"<answer>{p.answer}</answer>"
    assert task.score(p, task.reference_completion(p)) == 1.0
    assert task.score(p, f"<answer>{int(p.answer) + 1}</answer>") == 0.0
    corpus = task.corpus(5)
    assert len(corpus) == 10 and corpus[1].startswith("<answer>")


def test_over_long_prompts_are_skipped_and_counted_in_rendered_tokens(bpe_model_dir):
    tok = AutoTokenizer.from_pretrained(bpe_model_dir)
    chat = Renderer(RenderConfig(mode="chat", stop_tokens=("<|im_end|>",)), tok)
    lengths = [len(chat.encode_prompt(p)) for p in make_task(cfg()).eval_set()]
    limit = sorted(lengths)[len(lengths) // 2]
    task = ReasoningGymTask(cfg(max_prompt_tokens=limit, eval_size=5), chat)
    stream = list(itertools.islice(task.train_stream(), 50))
    assert all(len(chat.encode_prompt(p)) <= limit for p in stream + task.eval_set())
    assert task.skipped_rows["too_long"] > 0
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        ReasoningGymTask(cfg(max_prompt_tokens=3), chat)
