"""RewardScorer under hostile reward functions (hang, raise, NaN, os._exit) and the code-execution sandbox."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from rollout.rewards import RewardConfig, RewardScorer, code_output_reward, code_problem_reward, run_sandboxed_code
from rollout.tasks import Problem

P = Problem(prompt="2+3=", answer="5", task="arithmetic+")


def hostile_score(problem: Problem, completion: str) -> float:
    """Module-level so spawned workers can import it; the completion scripts the misbehaviour."""
    if completion == "hang":
        time.sleep(30)  # long enough to fail the time bounds below, short enough not to wedge a broken run
    if completion == "raise":
        raise RuntimeError("verifier bug")
    if completion == "exit":
        os._exit(3)
    if completion in ("nan", "inf"):
        return float(completion)
    if completion == "pid":
        return float(os.getpid())
    return 1.0 if completion.strip() == problem.answer else 0.0


def items(*completions: str) -> list[tuple[Problem, str]]:
    return [(P, c) for c in completions]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")


@pytest.mark.faults
def test_hang_and_raise_are_counted_and_the_rest_scored_within_bound():
    cfg = RewardConfig(timeout_s=1.0, max_workers=2, failure_reward=-1.0)
    with RewardScorer(hostile_score, cfg) as scorer:
        scorer.score_batch(items("5"))  # start the workers outside the timed region
        t0 = time.monotonic()
        result = scorer.score_batch(items("5", "hang", "4", "raise", " 5\n", "hang"))
        elapsed = time.monotonic() - t0
    assert result.rewards == [1.0, -1.0, 0.0, -1.0, 1.0, -1.0]
    assert (result.ok, result.timeouts, result.errors, result.non_finite) == (3, 2, 1, 0)
    # two hangs on two workers overlap: ~1 s of timeouts + two worker restarts, nowhere near 30 s
    assert elapsed < 1.0 * 6 / 2 + 5.0


@pytest.mark.faults
def test_hung_worker_is_killed_and_replaced():
    with RewardScorer(hostile_score, RewardConfig(timeout_s=0.5)) as scorer:
        before = scorer.score_batch(items("pid")).rewards[0]
        result = scorer.score_batch(items("hang", "pid"))
        assert result.timeouts == 1
        after = result.rewards[1]
        assert after != before and not alive(int(before)) and alive(int(after))


@pytest.mark.faults
def test_pool_recovers_after_worker_exits():
    with RewardScorer(hostile_score, RewardConfig(timeout_s=5.0)) as scorer:
        result = scorer.score_batch(items("exit", "5", "exit", "4"))
        assert result.rewards == [0.0, 1.0, 0.0, 0.0]
        assert (result.ok, result.errors, result.timeouts) == (2, 2, 0)
        assert scorer.score_batch(items("5")).rewards == [1.0]


def test_non_finite_rewards_are_failures():
    with RewardScorer(hostile_score, RewardConfig(failure_reward=-0.5)) as scorer:
        result = scorer.score_batch(items("nan", "inf", "5"))
    assert result.rewards == [-0.5, -0.5, 1.0]
    assert (result.ok, result.non_finite, result.errors) == (1, 2, 0)


def test_drop_policy_returns_none_for_failures():
    cfg = RewardConfig(on_failure="drop", timeout_s=0.5)
    with RewardScorer(hostile_score, cfg) as scorer:
        result = scorer.score_batch(items("5", "raise", "nan", "hang", "4"))
    assert result.rewards == [1.0, None, None, None, 0.0]


def test_inline_isolation_counts_errors_in_process():
    scorer = RewardScorer(hostile_score, RewardConfig(isolation="inline", on_failure="drop"))
    result = scorer.score_batch(items("raise", "nan", "pid", "5"))
    assert result.rewards == [None, None, float(os.getpid()), 1.0]
    assert (result.ok, result.errors, result.non_finite) == (2, 1, 1)


def test_close_stops_workers_and_unpicklable_function_is_refused():
    scorer = RewardScorer(hostile_score, RewardConfig(max_workers=2))
    pid = int(scorer.score_batch(items("pid")).rewards[0])
    scorer.close()
    assert not alive(pid)
    with pytest.raises(ValueError, match="isolation='inline'"):
        RewardScorer(lambda p, c: 1.0, RewardConfig())
    with pytest.raises(ValidationError, match="on_failure"):
        RewardConfig(on_failure="skip")


def test_sandbox_runs_a_correct_program_and_scores_it():
    """More of the sandbox (hostile programs, limits, identities) in test_sandbox.py."""
    program = "a, b = map(int, input().split())\nprint(a + b)\n"
    result = run_sandboxed_code(program, "2 3\n", timeout_s=10)
    assert (result.returncode, result.stdout, result.timed_out, result.killed_by_signal) == (0, "5\n", False, None)
    assert code_output_reward("6", "print(2 * 3)") == 1.0
    assert code_output_reward("6", "print(7)") == 0.0
    assert code_output_reward("6", "print(6); raise SystemExit(1)") == 0.0


def test_code_problem_reward_scores_programs_through_the_process_pool():
    problem = Problem(prompt="print the sum of 2 and 3", answer="5", task="code")
    with RewardScorer(code_problem_reward, RewardConfig(timeout_s=15.0)) as scorer:
        result = scorer.score_batch(
            [(problem, "print(2 + 3)"), (problem, "print(23)"), (problem, "import sys; sys.exit(")]
        )
    assert result.rewards == [1.0, 0.0, 0.0] and result.ok == 3
