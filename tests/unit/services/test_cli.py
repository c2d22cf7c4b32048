"""`flywheel scale rollout N --run NAME`: argument validation and the error for a run that is not there."""

from __future__ import annotations

import pytest

from services import cli, faults
from services.control import check_target, scale_rollout


def test_parses_scale_rollout():
    args = cli.build_parser().parse_args(
        ["scale", "rollout", "3", "--run", "exp1", "--address", "10.0.0.1:6379", "--wait", "30"]
    )
    assert (args.command, args.role, args.n, args.run, args.address, args.wait) == (
        "scale",
        "rollout",
        3,
        "exp1",
        "10.0.0.1:6379",
        30.0,
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["scale", "rollout", "0", "--run", "x"], "N=0 is invalid"),
        (["scale", "rollout", "-2", "--run", "x"], "N=-2 is invalid"),
        (["scale", "rollout", "two", "--run", "x"], "N='two' is not an integer"),
        (["scale", "rollout", "2"], "--run"),
        (["scale", "learner", "2", "--run", "x"], "invalid choice: 'learner'"),
        (["scale"], "ROLE"),
    ],
)
def test_bad_arguments_exit_2_naming_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("bad", [0, -1, 2.0, None])
def test_python_api_rejects_a_bad_count_before_touching_ray(bad):
    with pytest.raises(ValueError, match="integer >= 1"):
        scale_rollout("x", bad, address="127.0.0.1:1")
    with pytest.raises(ValueError, match=repr(bad)):
        check_target(bad)


def test_fault_hook_parses_and_names_bad_input():
    assert faults.parse("worker=1, after_step=2, at=broadcast") == faults.KillWorker(
        worker=1, after_step=2, at="broadcast"
    )
    assert faults.from_env({}) == []
    assert faults.from_env({faults.ENV: "worker=1,after_step=2; worker=2,after_step=0,at=join"}) == [
        faults.KillWorker(worker=1, after_step=2),
        faults.KillWorker(worker=2, after_step=0, at="join"),
    ]
    with pytest.raises(ValueError, match="FLYWHEEL_FAULT_KILL_WORKER.*at"):
        faults.parse("worker=1,after_step=2,at=later")
    with pytest.raises(ValueError, match="not key=value"):
        faults.parse("worker1")
    with pytest.raises(ValueError, match="worker"):
        faults.parse("after_step=2")


def test_unreachable_cluster_is_a_clear_error_not_a_hang(capsys):
    assert cli.main(["scale", "rollout", "2", "--run", "x", "--address", "127.0.0.1:1"]) == 3
    err = capsys.readouterr().err
    assert "no Ray cluster answers at '127.0.0.1:1'" in err and "--address" in err
