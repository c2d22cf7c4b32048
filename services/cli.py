"""`flywheel`: operate Flywheel runs from a shell.

    flywheel scale rollout N --run NAME [--address ADDR] [--wait SECONDS] [--secret-file PATH]
    flywheel sweep --config BASE.yaml --name S --grid KEY=V1,V2 ... [--seeds 0,1] [--max-concurrent N]
    flywheel evaluate --config CFG --model DIR [--model DIR2 ...] [--n 64] [--workers N]
    python -m services.cli ...

`scale rollout` sets the run's rollout worker count (services/control.py): the loop starts or
drains workers within about a second, without stopping the learner. The call is signed with the
run's secret: --secret-file if given, else $FLYWHEEL_RUN_SECRET, else runs/NAME/run_secret (written by
the run's driver). Exit codes: 0 done, 2 bad arguments, 3 no such run (or no cluster at the address),
4 refused: no secret, or not this run's.
`sweep` runs a grid of runs as Ray jobs and writes one report (services/sweep.py). Exit codes: 0
every run finished, 1 some did not, 2 bad arguments or an invalid run config.
`evaluate` is `python -m services.evaluate` (pass@k curves; see its --help).
"""

from __future__ import annotations

import argparse
import sys


def _worker_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"N={text!r} is not an integer; give the number of rollout workers, e.g. 2"
        ) from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"N={n} is invalid: a run needs at least 1 rollout worker (give N >= 1)")
    return n


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flywheel", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    scale = sub.add_parser("scale", help="change the number of workers of a running run")
    what = scale.add_subparsers(dest="role", required=True, metavar="ROLE")
    rollout = what.add_parser("rollout", help="set the number of rollout workers")
    rollout.add_argument("n", type=_worker_count, metavar="N", help="desired rollout workers (>= 1)")
    rollout.add_argument("--run", required=True, help="the run's run.name")
    rollout.add_argument(
        "--address", default=None, help="the run's Ray cluster (default: $RAY_ADDRESS, else the local cluster)"
    )
    rollout.add_argument(
        "--wait", type=float, default=0.0, metavar="SECONDS", help="wait up to this long for N active workers"
    )
    rollout.add_argument(
        "--secret-file",
        default=None,
        metavar="PATH",
        help="file holding the run's secret (default: $FLYWHEEL_RUN_SECRET, else runs/NAME/run_secret)",
    )
    from services.sweep import add_arguments

    add_arguments(sub.add_parser("sweep", help="run a grid of configs x seeds as Ray jobs, resumable, one report"))
    evaluate = sub.add_parser("evaluate", help="pass@k / maj@k curves of models (services/evaluate.py)", add_help=False)
    evaluate.add_argument("args", nargs="*", help="python -m services.evaluate's arguments (see flywheel evaluate -h)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["evaluate"]:  # its own parser takes everything after the command, options included
        from services.evaluate import main as evaluate

        return evaluate(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "sweep":
        from services.sweep import main as sweep

        return sweep(args)
    from services.auth import AuthError, read_run_secret
    from services.control import RunNotFound, scale_rollout

    try:
        secret = read_run_secret(args.secret_file, default_file=f"runs/{args.run}/run_secret")
        report = scale_rollout(args.run, args.n, address=args.address, wait_s=args.wait, secret=secret)
    except RunNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except AuthError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    print(f"requested {args.n} rollout worker(s) for run {args.run!r}")
    print(f"membership as the loop last reported it: {report.format()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
