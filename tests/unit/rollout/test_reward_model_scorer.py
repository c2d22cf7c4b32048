import math

import pytest
from pydantic import ValidationError

from rollout.problem import Problem
from rollout.render import RenderConfig, Renderer
from rollout.reward_model_scorer import (
    ModelRewardMix,
    ModelScores,
    RewardModelConfig,
    RewardModelScorer,
    RunningNormalizer,
    mix_rewards,
)
from rollout.rewards import RewardConfig


def test_running_normalizer_matches_population_statistics():
    norm = RunningNormalizer(eps=0.0)
    out = norm([1.0, 2.0, 3.0])
    assert norm.mean == 2.0 and math.isclose(norm.std, math.sqrt(2 / 3))
    assert [round(x, 6) for x in out] == [round(-1 / math.sqrt(2 / 3), 6), 0.0, round(1 / math.sqrt(2 / 3), 6)]
    norm([5.0])  # the statistics keep running over batches
    assert norm.mean == 2.75 and norm.count == 4


def test_mix_rewards_weights_and_failures():
    cfg = RewardModelConfig(path="x", model_weight=0.5, verifier_weight=2.0)
    assert mix_rewards([1.0, None, 3.0], [1.0, 0.0, None], cfg) == [2.5, None, None]
    pure = RewardModelConfig(path="x")  # verifier weight 0: a failed verifier does not drop the sample
    assert mix_rewards([1.0, 3.0], [None, 0.0], pure) == [1.0, 3.0]


def test_model_reward_mix_keeps_gold_and_proxy_and_counts_failures():
    cfg = RewardModelConfig(path="x", normalize="running")
    mix = ModelRewardMix(cfg, lambda items: ModelScores([1.0, None, 3.0], ok=2, errors=1))
    items = [(Problem("p", "a", "t"), "c")] * 3
    out = mix.rewards(items, [1.0, 0.0, 0.0])
    assert out[1] is None and math.isclose(out[0], -1.0, abs_tol=1e-5) and math.isclose(out[2], 1.0, abs_tol=1e-5)
    stats = mix.take_stats()
    assert stats["gold_reward_mean"] == pytest.approx(1 / 3) and stats["model_score_mean"] == 2.0
    assert stats["model_errors"] == 1 and stats["model_timeouts"] == 0
    assert mix.take_stats()["gold_reward_mean"] is None  # reset per window


def test_reward_kind_model_requires_a_model_section():
    with pytest.raises(ValidationError, match="kind=model needs reward.model.path"):
        RewardConfig(kind="model")
    with pytest.raises(ValidationError, match="kind=verifier takes no model"):
        RewardConfig(model={"path": "x"})
    assert RewardConfig(kind="model", model={"path": "x"}).model.placement == "actor"


def test_scorer_scores_batches_and_counts_a_failing_batch(tiny_model_dir, tmp_path):
    from learner.reward_model import init_reward_model, save_reward_model

    rm_dir = save_reward_model(init_reward_model(tiny_model_dir), tiny_model_dir, tmp_path / "rm")
    renderer = Renderer.from_pretrained(RenderConfig(), rm_dir)
    scorer = RewardModelScorer(RewardModelConfig(path=str(rm_dir), batch_size=2), renderer)
    items = [(Problem(f"{a}+1=", str(a + 1), "t"), str(a + 1)) for a in range(5)]
    result = scorer.score(items)
    assert result.ok == 5 and all(isinstance(s, float) for s in result.scores)
    alone = scorer.score(items[3:4]).scores[0]
    assert math.isclose(alone, result.scores[3], rel_tol=1e-4, abs_tol=1e-5)  # batching does not change a score
    bad = scorer.score([(Problem("1+1=", "2", "t"), "x")] * 2 + items[:1])  # 'x' is not in the char vocabulary
    assert bad.errors == 2 and bad.ok == 1 and bad.scores[:2] == [None, None]
