"""Group sampling: problems -> one engine call -> scored `Trace`s, `group_size` per problem.

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

import json
import uuid
from collections.abc import Callable, Sequence

from replay.schema import Trace, validate_traces
from rollout.engine import Completion, Engine
from rollout.problem import Problem
from rollout.render import Renderer


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
    if group_ids is not None and len(group_ids) != len(problems):
        raise ValueError(f"{len(group_ids)} group_ids for {len(problems)} problems; pass one per problem or None")
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: a group needs at least 2 completions (rollout.group_size >= 2)")
    if not problems:
        return []
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
    traces = []
    for i, (problem, prompt, group) in enumerate(zip(problems, prompts, groups)):
        group_rewards = rewards[i * group_size : (i + 1) * group_size]
        if any(r is None for r in group_rewards):
            continue
        group_id = group_ids[i] if group_ids is not None else uuid.uuid4().hex
        traces += [
            _trace(group_id, problem, prompt, c, r, version_min, version_max, step_rewards)
            for c, r in zip(group, group_rewards)
        ]
    validate_traces(traces)  # one vectorised check of the whole batch, not a one-row batch per trace
    return traces


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
        raise RuntimeError("engine returned an empty completion; engines must return >= 1 token (max_new_tokens >= 1)")
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
