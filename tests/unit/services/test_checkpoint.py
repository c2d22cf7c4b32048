"""The checkpoint directory protocol, the resume config check and the loop-state round trip (no Ray)."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest

from services.checkpoint import (
    CheckpointStore,
    check_resumable,
    decode,
    driver_rng,
    encode,
    find_resume,
    restore_driver_rng,
)
from services.config import ConfigError, load_config
from services.evaluator import EvalState
from services.loop import ActorLearnerLoop, LoopState
from services.publisher import PublishState


def _save(store: CheckpointStore, step: int, **extra) -> None:
    tmp = store.begin(step)
    (tmp / "weights.bin").write_bytes(b"x" * 10)
    store.commit(tmp, {"learner_step": step, **extra})


def test_keeps_the_last_k_and_latest_names_the_newest(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in (10, 20, 30):
        _save(store, step)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-000020", "step-000030"]
    point = store.latest()
    assert point.path.name == "step-000030" and point.learner_step == 30
    assert (point.path / "weights.bin").exists()


def test_a_crash_mid_write_leaves_the_previous_latest_valid(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    _save(store, 10)
    tmp = store.begin(20)  # the process dies while ranks write their shares: no commit
    (tmp / "weights.bin").write_bytes(b"partial")
    assert store.latest().learner_step == 10
    # a crash after the rename but before `latest` moved: still the previous, complete checkpoint
    (tmp_path / "checkpoints" / "step-000020").mkdir()
    assert store.latest().learner_step == 10
    _save(store, 30)  # the next save clears the abandoned temp dir
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert store.latest().learner_step == 30


def test_latest_naming_a_missing_checkpoint_is_a_clear_error(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    _save(store, 10)
    (tmp_path / "checkpoints" / "latest").write_text("step-000099")
    with pytest.raises(ConfigError, match="step-000099.*missing or incomplete"):
        store.latest()


def test_resume_without_a_checkpoint(tmp_path):
    cfg = load_config(None)
    with pytest.raises(ConfigError, match="--resume .*no checkpoint there"):
        find_resume(cfg, tmp_path, explicit=True)
    assert find_resume(load_config(None, ["run.resume=auto"]), tmp_path, explicit=False) is None
    _save(CheckpointStore(tmp_path, keep=2), 5)
    assert find_resume(load_config(None, ["run.resume=auto"]), tmp_path, explicit=False).learner_step == 5
    assert find_resume(cfg, tmp_path, explicit=False) is None  # run.resume=never ignores it


def test_mismatched_config_names_every_field_that_differs():
    saved = load_config(None, ["rollout.group_size=4"]).model_dump(mode="json")
    with pytest.raises(ConfigError) as err:
        check_resumable(saved, load_config(None, ["rollout.group_size=8", "model.hidden_size=256"]))
    msg = str(err.value)
    assert "rollout.group_size: checkpoint has 4, this run has 8" in msg
    assert "model.hidden_size" in msg and "learner.lr" not in msg
    # budgets, cadence and resources may change on resume
    check_resumable(
        saved,
        load_config(
            None,
            [
                "rollout.group_size=4",
                "run.max_learner_steps=999",
                "run.name=other",
                "run.checkpoint_every_steps=7",
                "learner.max_consecutive_nonfinite=2",
            ],
        ),
    )


def test_loop_state_round_trips_through_json():
    """The loop's, publisher's and evaluator's state go into loop.json as one flat dict and come back apart."""
    lp = object.__new__(ActorLearnerLoop)
    lp.s = LoopState(steps=7, traces_consumed=56, versions_consumed={0, 1, 2}, produced_at={0: 4, 2: 8})
    lp.s.cursors = {0: (40, 10)}
    lp.publisher = SimpleNamespace(s=PublishState(version=3, publish_t={0: 0.0, 1: 1.5}))
    lp.evaluator = SimpleNamespace(s=EvalState(evals=[(1, 1.5, 0.25)], seconds_to_target=None))
    saved = json.loads(json.dumps(encode(lp.persisted_state())))
    assert {"version", "publish_t", "evals", "seconds_to_target", "steps", "cursors"} <= set(saved)  # one flat record
    lp.restore_state(decode(saved))
    back, pub, ev = lp.s, lp.publisher.s, lp.evaluator.s
    assert (
        back.versions_consumed == {0, 1, 2} and back.produced_at == {0: 4, 2: 8} and pub.publish_t == {0: 0.0, 1: 1.5}
    )
    assert [tuple(e) for e in ev.evals] == [(1, 1.5, 0.25)] and tuple(back.cursors[0]) == (40, 10)
    assert back.steps == 7 and pub.version == 3 and back.reward_failures == LoopState().reward_failures


def test_driver_rng_restores_python_and_numpy_draws():
    random.seed(1)
    np.random.seed(2)
    state = json.loads(json.dumps(driver_rng()))
    expected = (random.random(), np.random.rand())
    random.seed(99)
    np.random.seed(99)
    restore_driver_rng(state)
    assert (random.random(), np.random.rand()) == expected


def test_driver_refuses_a_mismatched_resume_before_starting_anything(tmp_path, capsys):
    from services.driver import main, with_replay_dir

    run = tmp_path / "r"
    saved = with_replay_dir(
        load_config("deploy/configs/e2e_small.yaml", [f"run.runs_dir={tmp_path}", "run.name=r"]), run
    )
    store = CheckpointStore(run, keep=2)
    store.commit(store.begin(3), {"learner_step": 3, "policy_version": 3, "config": saved.model_dump(mode="json")})
    code = main(["--config", "deploy/configs/e2e_small.yaml", "--resume", str(run), "rollout.group_size=8"])
    err = capsys.readouterr().err
    assert code == 2 and "rollout.group_size: checkpoint has 4, this run has 8" in err
    assert "replay.segment_dir" not in err and not (run / "summary.json").exists()
    assert main(["--config", "deploy/configs/e2e_small.yaml", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint there" in capsys.readouterr().err
