"""The code sandbox against hostile programs, as this user and as a freshly made unprivileged one.

The must-show set (sandbox_battery.py): read the dataset and replay files, write into /dev/shm,
leave a file in /tmp, fork a child that outlives the program, signal the runner / a process of the
same user / another sandbox, open sockets, fork-bomb, allocate beyond the memory limit. Each must
fail (never print ESCAPED, never exit 0), be counted as a failed outcome, and leave no process of
its pid namespace and no file on the host.
"""

from __future__ import annotations

import importlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from rollout import sandbox
from rollout.rewards import RewardConfig, RewardScorer, code_problem_reward
from rollout.sandbox import SandboxUnavailable, run_sandboxed_code
from rollout.tasks import Problem
from tests.unit.rollout import sandbox_battery

REPO = Path(__file__).resolve().parents[3]
CI_USER = "flywheel-sbx-ci"


@pytest.fixture(scope="module")
def secret_files():
    """A dataset row and a replay segment any process of any user on the host could read."""
    root = Path(tempfile.mkdtemp(prefix="flywheel-secrets-"))
    (root / "replay" / "shard-0").mkdir(parents=True)
    dataset, segment = root / "dataset.jsonl", root / "replay" / "shard-0" / "traces-000000.arrow"
    dataset.write_text('{"prompt": "2+2=", "answer": "SECRET-ANSWER-4"}\n')
    segment.write_bytes(b"ARROW1 SECRET-ANSWER-4")
    for p in (root, root / "replay", root / "replay" / "shard-0"):
        p.chmod(0o755)
    for p in (dataset, segment):
        p.chmod(0o644)
    yield [str(dataset), str(segment)]
    shutil.rmtree(root)


def _check(findings: dict) -> None:
    names = set(sandbox_battery.programs({"token": "", "secret_files": [], "victim_pids": [], "listeners": []}))
    assert names <= set(findings), findings
    for name in names:
        f = findings[name]
        assert f["ns_seen"] and not f["escaped"], (name, f)
        assert f["outcome"] in ("exit_nonzero", "timeout", "signal"), (name, f)  # a failed, counted run
        assert f["leftover_processes"] == 0 and f["host_processes_left"] == [], (name, f)
        assert f["host_files_left"] == [] and f["victims_alive"], (name, f)
    assert findings["fork_bomb"]["outcome"] == "timeout"
    assert findings["fork_bomb"]["seconds"] < sandbox_battery.TIMEOUT_S + 3
    assert "MemoryError" in findings["allocate_beyond_the_memory_limit"]["stderr_tail"]
    signal = findings["signal_the_parent_and_others"]
    assert signal["other_sandbox_found"] and signal["other_sandbox_finished"], signal
    assert findings["connections_received"] == 0 and findings["listeners"] >= 1


@pytest.mark.faults
def test_hostile_programs_fail_and_leave_nothing(secret_files):
    control = subprocess.run([sys.executable, "-c", f"print(open({secret_files[0]!r}).read())"], capture_output=True)
    assert b"SECRET-ANSWER" in control.stdout  # unconfined, the same user reads the secrets
    findings = sandbox_battery.run_battery(secret_files)
    assert findings["uid"] == os.getuid()
    _check(findings)


def _interpreter_for(user: pwd.struct_passwd) -> str:
    """A Python of our minor version that `user` can run (ours may sit in a private home, e.g. /root)."""
    want = f"{sys.version_info.major}.{sys.version_info.minor}"
    for exe in (os.path.realpath(sys.executable), f"/usr/bin/python{want}", f"/usr/local/bin/python{want}"):
        probe = _as(user, [exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], {}, check=False)
        if probe.returncode == 0 and probe.stdout.strip() == want:
            return exe
    pytest.fail(f"no Python {want} that user {user.pw_name} can run: install python{want} system-wide")


def _as(user: pwd.struct_passwd, cmd: list[str], env: dict, check: bool = True) -> subprocess.CompletedProcess:
    ids = [f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    base = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
    return subprocess.run(
        ["setpriv", *ids, "--", *cmd], env={**base, **env}, capture_output=True, text=True, timeout=180, check=check
    )


def _stage(root: Path) -> None:
    """Our sandbox modules, the battery and pydantic, where an unprivileged user can read them."""
    (root / "rollout").mkdir()
    for name in ("__init__.py", "sandbox.py", "sandbox_bwrap.py", "sandbox_launcher.py"):
        shutil.copy(REPO / "rollout" / name, root / "rollout" / name)
    shutil.copy(Path(sandbox_battery.__file__), root / "sandbox_battery.py")
    for mod in ("pydantic", "pydantic_core", "typing_extensions", "annotated_types", "typing_inspection"):
        path = Path(importlib.import_module(mod).__file__)
        if path.name == "__init__.py":
            shutil.copytree(path.parent, root / path.parent.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, root / path.name)
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)


@pytest.mark.faults
def test_hostile_programs_as_an_unprivileged_user(secret_files, tmp_path):
    """CI runs the suite as root; this runs the same battery as a new ordinary user (user namespaces, no root)."""
    if os.geteuid() != 0:
        pytest.skip(f"the suite already runs unprivileged (uid {os.geteuid()}): the test above is this test")
    if subprocess.run(["id", CI_USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", CI_USER], check=True)
    user = pwd.getpwnam(CI_USER)
    stage = Path(tempfile.mkdtemp(prefix="flywheel-sbx-stage-"))
    try:
        _stage(stage)
        userns = _as(user, ["unshare", "--user", "--map-root-user", "true"], {}, check=False)
        assert userns.returncode == 0, (
            f"unprivileged user namespaces are disabled on this host ({userns.stderr.strip()}): the sandbox cannot "
            "run as an ordinary user here; enable them (sysctl kernel.unprivileged_userns_clone=1, "
            "user.max_user_namespaces > 0)"
        )
        ctx = stage / "ctx.json"
        ctx.write_text(json.dumps({"secret_files": secret_files}))
        ctx.chmod(0o644)
        python = _interpreter_for(user)
        cmd = [python, "-S", str(stage / "sandbox_battery.py"), str(ctx)]
        out = _as(user, cmd, {"PYTHONPATH": str(stage)}, check=False)
    finally:
        shutil.rmtree(stage)
    # the battery's own traceback, not only setpriv's exit status, when it fails (it did under heavy load)
    assert out.returncode == 0, f"the battery exited {out.returncode}:\n{out.stderr[-4000:]}\n{out.stdout[-2000:]}"
    findings = json.loads(out.stdout)
    assert findings["uid"] == user.pw_uid != 0
    _check(findings)


@pytest.mark.faults
def test_each_failure_is_counted_by_the_scorer():
    """Through the reward path a run uses: every hostile program scores 0 and shows up as a failed sandbox run."""
    ctx = {"token": "t", "secret_files": ["/etc/hostname"], "victim_pids": [os.getpid()], "listeners": []}
    bodies = [b for n, b in sandbox_battery.programs(ctx).items() if n not in ("fork_bomb", "open_a_socket")]
    problem = Problem(prompt="escape", answer="ESCAPED", task="code")
    items = [(problem, sandbox_battery.source(b)) for b in bodies]
    items.append((problem, "print('ESCAPED')"))  # the control: a program that prints it honestly scores 1
    with RewardScorer(code_problem_reward, RewardConfig(timeout_s=6.0)) as scorer:
        result = scorer.score_batch(items)
    assert result.rewards == [0.0] * len(bodies) + [1.0] and result.ok == len(items)
    assert sum(result.sandbox.values()) == len(items) and result.sandbox["ok"] == 1, result.sandbox


def test_the_scorer_timeout_is_strictly_above_the_sandbox_timeout():
    """A program that never ends is ended by its sandbox inside the reward call: a scored 0, not a scorer timeout."""
    problem = Problem(prompt="loop", answer="done", task="code")
    with RewardScorer(code_problem_reward, RewardConfig(timeout_s=2.5)) as scorer:
        scorer.score_batch([(problem, "print('done')")])  # start the worker outside the timed part
        t0 = time.monotonic()
        result = scorer.score_batch([(problem, "while True: pass"), (problem, "print('done')")])
        elapsed = time.monotonic() - t0
    assert result.rewards == [0.0, 1.0] and (result.ok, result.timeouts) == (2, 0)
    assert result.sandbox == {"timeout": 1, "ok": 1} and elapsed < 2.5 + 1.0
    with pytest.raises(ValidationError, match=r"reward.sandbox.timeout_s=4.5 leaves no time"):
        RewardConfig(timeout_s=5.0, sandbox={"timeout_s": 4.5})
    assert RewardConfig(timeout_s=5.0, sandbox={"timeout_s": 4.0}).sandbox.timeout_s == 4.0


def test_a_correct_program_runs_in_a_read_only_minimal_view():
    program = (
        "import os, sys\nprint(sys.stdin.read().strip(), os.getuid(), os.getcwd(), sorted(os.listdir('/')))\n"
        "try:\n    open('/usr/x', 'w')\nexcept OSError as e:\n    print(e.errno)\n"
    )
    r = run_sandboxed_code(program, "hi\n", timeout_s=10)
    line1, line2 = r.stdout.splitlines()
    word, uid, cwd, listing = line1.split(" ", 3)
    assert (r.outcome, word, uid, cwd, line2) == ("ok", "hi", "65534", "/work", "30")  # EROFS
    visible = {"bin", "dev", "lib", "lib32", "lib64", "libx32", "proc", "sandbox", "sbin", "tmp", "usr", "work"}
    assert set(eval(listing)) <= visible and "etc" not in listing and "root" not in listing


def test_output_is_truncated_and_time_is_bounded():
    r = run_sandboxed_code("print('y' * 100000)", timeout_s=10, max_output_bytes=4096)
    assert r.outcome == "ok" and len(r.stdout) == 4096
    t0 = time.monotonic()
    r = run_sandboxed_code("import time\nwhile True: time.sleep(0.01)", timeout_s=1.0)
    assert r.timed_out and r.killed_by_signal == 9 and r.outcome == "timeout" and time.monotonic() - t0 < 3.0
    busy = run_sandboxed_code("while True: pass", timeout_s=10.0, cpu_s=1)
    assert not busy.timed_out and busy.killed_by_signal in (9, 24)  # hard / soft CPU limit
    with sandbox.call_budget(time.monotonic() + 0.5):  # less than the teardown margin left: nothing starts
        assert run_sandboxed_code("print(1)", timeout_s=10).outcome == "timeout"


def test_a_sandbox_that_cannot_start_says_why(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda *a, **k: None)
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        run_sandboxed_code("print(1)", timeout_s=5)
    monkeypatch.undo()
    monkeypatch.setattr(sandbox, "bwrap_args", lambda *a: ["--ro-bind", "/nonexistent-flywheel", "/x", "true"])
    with pytest.raises(SandboxUnavailable, match="could not start.*nonexistent-flywheel"):
        run_sandboxed_code("print(1)", timeout_s=5)
