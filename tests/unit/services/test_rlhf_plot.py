import json

from services.rlhf_plot import draw_overoptimisation, gold_vs_proxy

RECORDS = [
    {"kind": "rollout", "t": 0.5, "gold_reward_mean": 0.1, "model_score_mean": -0.2},
    {"kind": "learner_step", "t": 1.0, "kl_ref": 0.01},
    {"kind": "rollout", "t": 1.5, "gold_reward_mean": 0.3, "model_score_mean": 0.4},
    {"kind": "rollout", "t": 1.6, "gold_reward_mean": None, "model_score_mean": None},
    {"kind": "learner_step", "t": 2.0, "kl_ref": 0.05},
    {"kind": "rollout", "t": 2.5, "gold_reward_mean": 0.2, "model_score_mean": 0.9},
    {"kind": "rollout", "t": 2.6, "gold_reward_mean": 0.0, "model_score_mean": 0.0},  # a zero score is a score
]


def test_gold_vs_proxy_pairs_each_rollout_with_the_latest_kl():
    s = gold_vs_proxy(RECORDS)
    assert s == {
        "t": [0.5, 1.5, 2.5, 2.6],
        "kl": [None, 0.01, 0.05, 0.05],
        "gold": [0.1, 0.3, 0.2, 0.0],
        "proxy": [-0.2, 0.4, 0.9, 0.0],
    }


def test_figure_drawn_only_for_reward_model_runs(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = draw_overoptimisation(tmp_path)
    assert out is not None and out.stat().st_size > 10_000
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "rollout", "t": 1.0, "reward_mean": 1.0}) + "\n")
    assert draw_overoptimisation(tmp_path) is None
