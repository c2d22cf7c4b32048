"""The reasoning benchmark's bookkeeping on hand-made records: seconds to a gain, where the time went, the
seed spreads and the speedup ratios (null with a reason when a system never got there)."""

from __future__ import annotations

import pytest

from tests.bench import reasoning


def rollout(worker, generate_s, total_s, tokens, received=0.0):
    return {
        "kind": "rollout",
        "worker_id": worker,
        "generate_s": generate_s,
        "total_s": total_s,
        "tokens": tokens,
        "weights_received_s": received,
    }


def test_gains_first_eval_and_three_eval_mean():
    curve = [(0.0, 0.30), (10.0, 0.41), (20.0, 0.35), (30.0, 0.52), (40.0, 0.50), (50.0, 0.51)]
    g = reasoning.gains(curve)
    assert g["+10"] == {"first": 10.0, "mean3": 30.0}  # means: .41/.35 -> .3533 at 20 s, .4267 at 30 s
    assert g["+20"] == {"first": 30.0, "mean3": 50.0}  # 3-eval means: .4567, .49, .51 -> reached at 50 s
    assert reasoning.gains([(0.0, 0.9), (5.0, 0.95)])["+10"] == {"first": None, "mean3": None}


def test_flywheel_breakdown_splits_worker_and_learner_time():
    records = [
        {"kind": "eval", "policy_version": 0, "accuracy": 0.3, "t_published": 0.0},  # the initial eval: no eval_s
        rollout(0, 8.0, 9.0, 1000),
        rollout(0, 7.0, 7.5, 900, received=0.5),
        {"kind": "learner_step", "step_s": 3.0, "rank_tokens": [600]},
        {"kind": "learner_step", "step_s": 4.0, "rank_tokens": [500, 100]},
        {"kind": "eval", "policy_version": 1, "accuracy": 0.4, "t_published": 9.0, "worker": 1, "eval_s": 2.0},
        {"kind": "sync", "worker": 0, "policy_version": 1},
    ]
    b = reasoning.flywheel_breakdown(records, rl_wall_s=20.0)
    assert b["generation_s"] == 15.0 and b["reward_and_insert_s"] == 1.5 and b["weight_sync_s"] == 0.5
    assert b["eval_s"] == 2.0 and b["learner_s"] == 7.0
    assert b["rollout_idle_s"] == pytest.approx(20.0 - 17.0)  # the eval ran on worker 1, the dedicated one
    assert b["learner_idle_s"] == 13.0
    assert b["generated_tokens_per_s"] == 1900 / 20 and b["learner_tokens_per_s"] == 1200 / 20
    records[5]["worker"] = 0  # the same eval on the rollout worker takes its time
    assert reasoning.flywheel_breakdown(records, 20.0)["rollout_idle_s"] == pytest.approx(1.0)


def test_trl_breakdown_is_generate_then_train_in_one_process():
    trl = {
        "rl_seconds_total": 100.0,
        "step_seconds_total": 95.0,
        "generation_seconds_total": 70.0,
        "rollout_seconds_total": 72.0,
        "eval_seconds_total": 30.0,
        "generated_tokens": 5000,
    }
    b = reasoning.trl_breakdown(trl)
    assert (b["generation_s"], b["reward_and_insert_s"], b["learner_s"], b["idle_s"]) == (70.0, 2.0, 23.0, 5.0)
    assert b["weight_sync_s"] == 0.0 and b["eval_s"] == 30.0 and b["generated_tokens_per_s"] == 50.0


def seed(s20, final=0.5):
    curve = [(0.0, 0.3), (10.0, final)]
    breakdown = {"rl_wall_s": 10.0, "generation_s": 6.0, "learner_s": 3.0}
    breakdown |= {"generated_tokens_per_s": 100.0, "learner_tokens_per_s": 50.0}
    r = reasoning.seed_result(curve, breakdown, {})
    r["seconds_to_gain"]["+20"]["mean3"] = s20
    return r


def test_spread_needs_every_seed_for_a_mean_and_speedup_says_why_it_is_null():
    assert reasoning.spread([10.0, 20.0]) == {"per_seed": [10.0, 20.0], "mean": 15.0, "min": 10.0, "max": 20.0}
    assert reasoning.spread([10.0, None])["mean"] is None
    systems = {
        "async": {"summary": reasoning.summarize([seed(100.0), seed(140.0)])},
        "sync": {"summary": reasoning.summarize([seed(300.0), seed(180.0)])},
        "trl": {"summary": reasoning.summarize([seed(None), seed(500.0)])},
    }
    assert reasoning.speedup(systems, "sync", "async") == {"value": 2.0, "reason": None}
    miss = reasoning.speedup(systems, "trl", "async")
    assert miss["value"] is None and "trl did not reach +20" in miss["reason"]
    assert systems["async"]["summary"]["time_share"] == {"generation_s": 0.6, "learner_s": 0.3}
    assert reasoning.speedup({"async": systems["async"]}, "trl", "async")["reason"] == "trl or async was not run"


def test_the_reasoning_table_shows_the_ratios_and_the_spread(tmp_path, monkeypatch):
    import json

    from tests.bench import tables

    systems = {
        "async": {"summary": reasoning.summarize([seed(100.0), seed(140.0)])},
        "sync": {"summary": reasoning.summarize([seed(300.0), seed(180.0)])},
    }
    report = {"systems": systems, "seeds": [0, 1], "rl_s": 600, "loadavg_before": [3.0], "loadavg_after": [4.0]}
    report["speedup_vs_trl"] = reasoning.speedup(systems, "trl", "async")
    report["speedup_async_vs_sync"] = reasoning.speedup(systems, "sync", "async")
    (tmp_path / "reasoning.json").write_text(json.dumps(report))
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    text = tables.reasoning()
    assert "| seed mean (min-max) | async | sync |" in text
    assert "speedup_async_vs_sync: 2.00x" in text and "speedup_vs_trl: -x (trl or async was not run)" in text
    assert "| share of RL time: generation | 0.60 | 0.60 |" in text
