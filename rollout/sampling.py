"""Group sampling: problems -> one engine call -> scored completions, `group_size` per problem.

Two outputs of the same sampling: `sample_group_batch` gives a `ScoredBatch` (flat column buffers, what a
rollout worker turns into replay's Arrow batch without a `Trace` per completion: rollout/scored_batch.py),
`sample_groups` gives `Trace` records (tests, tools). Same rows, values and order.

Contract:
- one `engine.generate` call for all problems; problem i's `group_size` traces share one fresh
  `group_id` (or `group_ids[i]` when given) and appear consecutively, in problem order.
- prompts are `renderer.encode_prompt(problem)`; `reward = score(problem, text)` where
  `text = renderer.completion_text(completion)` (stop token dropped, no special tokens, cut at a stop
  string); the trace keeps every sampled completion token.
- `policy_version` is the engine's version when sampling started, `policy_version_max` when it
  ended (they differ only if a weight update landed during the call).
- `task = problem.task`; `metadata` is JSON `{"answer": ..., "finish_reason": ...}`.
- every returned trace passes `replay.schema.validate_trace` (checked once over the batch: `validate_traces`).
  Completions are never empty (`RolloutConfig.max_new_tokens >= 1`; an eos-only completion is a 1-token
  trace); an engine that returns an empty completion or the wrong number per prompt breaks its contract and raises here.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from replay.schema import Trace, validate_traces
from rollout.engine import Completion, Engine
from rollout.problem import Problem
from rollout.render import Renderer
from rollout.scored_batch import ScoredBatch

EMPTY_COMPLETION = "engine returned an empty completion; engines must return >= 1 token (max_new_tokens >= 1)"


def sample_groups(
    engine: Engine,
    problems: Sequence[Problem],
    renderer: Renderer,
    score: Callable[[Problem, str], float],
    group_size: int,
    seed: int | None = None,
    score_batch: Callable[[list[tuple[Problem, str]]], list[float | None]] | None = None,
    group_ids: Sequence[str] | None = None,
    step_rewards: Callable[[Problem, Sequence[int]], tuple[float, ...]] | None = None,
) -> list[Trace]:
    """Sample `group_size` completions per problem and return them as scored Traces.

    With `score_batch` (e.g. an isolated `rollout.rewards.RewardScorer`) every completion is scored
    in one call instead of by `score`; a `None` reward (a failed, dropped score) drops its whole
    group, since groups are the unit of advantage estimation and of replay. `group_ids` (one per
    problem) replaces the fresh random ids, so that sampling the same prompt again yields the same id.
    With `step_rewards` (problem, completion ids) -> per-token rewards, each trace carries them as
    `token_rewards` (process rewards).
    """
    sampled = _sample(engine, problems, renderer, score, group_size, seed, score_batch, group_ids)
    if sampled is None:
        return []
    traces = []
    for g in sampled.kept():
        traces += [
            _trace(g.group_id, g.problem, g.prompt, c, r, sampled.version_min, sampled.version_max, step_rewards)
            for c, r in zip(g.completions, g.rewards)
        ]
    validate_traces(traces)  # one vectorised check of the whole batch, not a one-row batch per trace
    return traces


def sample_group_batch(
    engine: Engine,
    problems: Sequence[Problem],
    renderer: Renderer,
    score: Callable[[Problem, str], float],
    group_size: int,
    seed: int | None = None,
    score_batch: Callable[[list[tuple[Problem, str]]], list[float | None]] | None = None,
    group_ids: Sequence[str] | None = None,
    step_rewards: Callable[[Problem, Sequence[int]], tuple[float, ...]] | None = None,
) -> ScoredBatch:
    """`sample_groups` as flat columns (a `ScoredBatch`): the same arguments, rows and values, no `Trace`s.

    The trace contract is checked when the batch is built for replay (`ScoredBatch.to_arrow`)."""
    sampled = _sample(engine, problems, renderer, score, group_size, seed, score_batch, group_ids)
    kept = list(sampled.kept()) if sampled is not None else []
    completions = [c for g in kept for c in g.completions]
    if any(not c.token_ids for c in completions):
        raise RuntimeError(EMPTY_COMPLETION)
    offsets = np.zeros(len(completions) + 1, dtype=np.int64)
    np.cumsum([len(c.token_ids) for c in completions], out=offsets[1:])
    token_rewards = None
    if step_rewards is not None:
        token_rewards = tuple(step_rewards(g.problem, c.token_ids) for g in kept for c in g.completions)
    version = engine.policy_version  # no problems: no engine call
    return ScoredBatch(
        group_size=group_size,
        group_ids=tuple(g.group_id for g in kept),
        prompts=tuple(tuple(int(t) for t in g.prompt) for g in kept),
        tasks=tuple(g.problem.task for g in kept),
        answers=tuple(g.problem.answer for g in kept),
        offsets=offsets,
        completion_ids=_flat(completions, "token_ids", np.int32, int(offsets[-1])),
        behaviour_logprobs=_flat(completions, "logprobs", np.float32, int(offsets[-1])),
        rewards=np.array([float(r) for g in kept for r in g.rewards], dtype=np.float64),
        finish_reasons=tuple(c.finish_reason for c in completions),
        token_rewards=token_rewards,
        policy_version=sampled.version_min if sampled is not None else version,
        policy_version_max=sampled.version_max if sampled is not None else version,
    )


def _flat(completions: list[Completion], attr: str, dtype, count: int) -> np.ndarray:
    """One values buffer `[T]` from every completion's `attr` (token ids or logprobs), no per-row arrays."""
    return np.fromiter(itertools.chain.from_iterable(getattr(c, attr) for c in completions), dtype=dtype, count=count)


class _Group(NamedTuple):
    problem: Problem
    prompt: Sequence[int]
    completions: list[Completion]
    rewards: list[float]
    group_id: str


class _Sampled:
    """One engine call's groups and rewards, before they become records."""

    def __init__(self, problems, prompts, groups, rewards, group_ids, group_size, version_min, version_max):
        self.problems, self.prompts, self.groups, self.rewards = problems, prompts, groups, rewards
        self.group_ids, self.group_size = group_ids, group_size
        self.version_min, self.version_max = version_min, version_max

    def kept(self):
        """Every group without a failed (None) score, in problem order, as a `_Group`."""
        gs = self.group_size
        for i, (problem, prompt, group) in enumerate(zip(self.problems, self.prompts, self.groups)):
            group_rewards = self.rewards[i * gs : (i + 1) * gs]
            if any(r is None for r in group_rewards):
                continue
            group_id = self.group_ids[i] if self.group_ids is not None else uuid.uuid4().hex
            yield _Group(problem, prompt, group, group_rewards, group_id)


def _sample(engine, problems, renderer, score, group_size, seed, score_batch, group_ids) -> _Sampled | None:
    """Generate and score; None when there are no problems."""
    if group_ids is not None and len(group_ids) != len(problems):
        raise ValueError(f"{len(group_ids)} group_ids for {len(problems)} problems; pass one per problem or None")
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: a group needs at least 2 completions (rollout.group_size >= 2)")
    if not problems:
        return None
    prompts = [renderer.encode_prompt(p) for p in problems]
    version_min = engine.policy_version
    groups = engine.generate(prompts, n=group_size, seed=seed)
    version_max = engine.policy_version
    if len(groups) != len(problems) or any(len(g) != group_size for g in groups):
        raise RuntimeError(
            f"engine returned {[len(g) for g in groups]} completions for {len(problems)} prompts, "
            f"expected {group_size} each: the engine breaks the Engine.generate contract"
        )
    items = [
        (problem, renderer.completion_text(c.token_ids)) for problem, group in zip(problems, groups) for c in group
    ]
    rewards = score_batch(items) if score_batch is not None else [score(p, text) for p, text in items]
    return _Sampled(problems, prompts, groups, rewards, group_ids, group_size, version_min, version_max)


def _trace(
    group_id: str,
    problem: Problem,
    prompt: Sequence[int],
    c: Completion,
    reward: float,
    version_min: int,
    version_max: int,
    step_rewards: Callable[[Problem, Sequence[int]], tuple[float, ...]] | None = None,
) -> Trace:
    if not c.token_ids:
        raise RuntimeError(EMPTY_COMPLETION)
    trace = Trace(
        group_id=group_id,
        prompt_ids=tuple(int(t) for t in prompt),
        completion_ids=c.token_ids,
        behaviour_logprobs=c.logprobs,
        reward=float(reward),
        policy_version=version_min,
        policy_version_max=version_max,
        task=problem.task,
        metadata=json.dumps({"answer": problem.answer, "finish_reason": c.finish_reason}),
        token_rewards=None if step_rewards is None else step_rewards(problem, c.token_ids),
    )
    return trace


def drop_uniform_groups(traces: Sequence[Trace]) -> tuple[list[Trace], int]:
    """Keep the groups whose total rewards (outcome + token rewards) are not all equal; return (kept traces,
    number of groups dropped).

    Exact float equality on purpose: verifiable rewards are discrete, and a group whose rewards differ
    by any amount has a non-zero group-relative advantage.
    """
    rewards: dict[str, set[float]] = {}
    for t in traces:  # a group whose step rewards differ still has a signal (process rewards)
        total = t.reward + (sum(t.token_rewards) if t.token_rewards is not None else 0.0)
        rewards.setdefault(t.group_id, set()).add(total)
    uniform = {g for g, r in rewards.items() if len(r) == 1}
    return [t for t in traces if t.group_id not in uniform], len(uniform)
