"""Fail an image build whose installed packages differ from the pins (stdlib only; run with the image's venv).

    python docker/check_pins.py LOCK [--skip NAME ...] [--pin NAME==VERSION ...] [--cuda]

Every `name==version` line of LOCK (minus --skip) and every --pin must be installed at exactly that
version; a local build label is ignored (torch 2.13.0+cu128 satisfies torch==2.13.0). With --cuda,
torch must also be a CUDA build. Exit 1 lists every difference, so a dependency's install that
replaced a pinned package (e.g. vLLM pulling another torch) stops the build instead of shipping.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata


def read_pins(lock: str, skip: set[str]) -> dict[str, str]:
    pins = {}
    with open(lock) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if "==" in line:
                name, version = (x.strip() for x in line.split("==", 1))
                if name.lower() not in skip:
                    pins[name.lower()] = version
    return pins


def differences(pins: dict[str, str]) -> list[str]:
    out = []
    for name, want in sorted(pins.items()):
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            out.append(f"{name}: pinned {want}, not installed")
            continue
        if have.split("+")[0] != want.split("+")[0]:
            out.append(f"{name}: pinned {want}, installed {have}")
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lock")
    ap.add_argument("--skip", action="append", default=[], help="a lock entry this image replaces")
    ap.add_argument("--pin", action="append", default=[], help="NAME==VERSION pinned outside the lock")
    ap.add_argument("--cuda", action="store_true", help="torch must be a CUDA build")
    args = ap.parse_args(argv)
    pins = read_pins(args.lock, {s.lower() for s in args.skip})
    pins.update({p.split("==")[0].lower(): p.split("==")[1] for p in args.pin})
    problems = differences(pins)
    if args.cuda:
        import torch

        if torch.version.cuda is None:
            problems.append(f"torch {torch.__version__} is not a CUDA build")
    for p in problems:
        print(f"pin check: {p}", file=sys.stderr)
    if problems:
        print(f"pin check: {len(problems)} difference(s) from {args.lock}; the build stops here", file=sys.stderr)
        return 1
    print(f"pin check: {len(pins)} pins match")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
