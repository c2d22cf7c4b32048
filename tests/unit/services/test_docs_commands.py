"""Every command the README and the tutorial show exists: modules and `flywheel` subcommands answer `--help`,
`make` targets are in the Makefile, and the files and configs they name are in the repository."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
DOCS = [REPO / "README.md", REPO / "deploy/TUTORIAL.md", REPO / "deploy/ray/README.md"]
BIN = Path(sys.executable).parent
REPO_PATH = re.compile(r"`((?:deploy|tests|services|rollout|replay|learner|docker)/[\w./-]+)`")


def _commands(doc: Path) -> list[str]:
    """Each command of the doc's ```bash blocks: continuation lines and multi-line quotes joined, comments dropped."""
    commands, pending = [], ""
    for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if not pending and (not line.strip() or line.strip().startswith("#")):
                continue
            pending = f"{pending}\n{line}" if pending else line
            try:
                shlex.split(pending, comments=True)
            except ValueError:  # an open quote: the command goes on on the next line
                continue
            commands.append(pending.strip())
            pending = ""
    return commands


def _entry(command: str) -> tuple[str, ...] | None:
    """What to check of one command line: ("module", name) | ("flywheel", sub...) | ("make", target) | None."""
    words = shlex.split(command, comments=True)
    if words[0].endswith("python") and words[1:2] == ["-m"]:
        return ("module", words[2])
    if words[0].endswith("flywheel"):
        return ("flywheel", *[w for w in words[1:3] if not w.startswith("-") and not w.isdigit()])
    if words[0] == "make":
        return ("make", words[1])
    return None


ALL = sorted({e for doc in DOCS for c in _commands(doc) if (e := _entry(c)) is not None})


def test_the_docs_show_the_commands_a_user_needs():
    assert ("make", "run") in ALL and ("make", "test") in ALL
    assert ("module", "services.driver") in ALL
    assert any(e[:2] == ("flywheel", "scale") for e in ALL)
    assert any(e[:2] == ("flywheel", "evaluate") for e in ALL)


@pytest.mark.parametrize("entry", ALL, ids=lambda e: " ".join(e))
def test_documented_command_exists(entry):
    if entry[0] == "make":
        assert re.search(rf"^{re.escape(entry[1])}:", (REPO / "Makefile").read_text(), flags=re.M), entry
        return
    if entry[0] == "module":
        cmd = [sys.executable, "-m", entry[1], "--help"]
    else:
        cmd = [str(BIN / "flywheel"), *entry[1:], "--help"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    assert "usage" in out.stdout.lower()


def test_files_the_docs_name_exist():
    missing = []
    for doc in DOCS:
        for path in REPO_PATH.findall(doc.read_text()):
            if "<" not in path and not (REPO / path.split("::")[0]).exists():
                missing.append(f"{doc.name}: {path}")
    assert not missing, missing
