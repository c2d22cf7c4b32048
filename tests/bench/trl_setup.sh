#!/usr/bin/env bash
# Create (or verify) the TRL baseline venv from deploy/requirements-trl.lock. Idempotent: when the venv
# exists and was built from the current lock (sha256 stamp inside the venv) it only prints that and exits.
#   bash tests/bench/trl_setup.sh            # -> /work/main/.venv-trl (repo root/.venv-trl)
#   TRL_VENV=/tmp/v PYTHON=python3.11 bash tests/bench/trl_setup.sh
# torch==2.13.0 goes in first (the CPU wheel on disk; an unpinned torch pulls a multi-GB CUDA build), then
# the lock with --no-deps so pip can never swap torch or pull torchvision (CUDA builds break CPU torch).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${TRL_VENV:-$ROOT/.venv-trl}"
PYTHON="${PYTHON:-python3.11}"
LOCK="$ROOT/deploy/requirements-trl.lock"
TORCH_PIN="torch==2.13.0"
STAMP="$VENV/.flywheel-trl-lock.sha256"

want="$(sha256sum "$LOCK" | cut -d' ' -f1) $TORCH_PIN"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    echo "trl_setup: $VENV is up to date with $LOCK (delete $STAMP to force a reinstall)"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "trl_setup: creating venv $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --no-input)
echo "trl_setup: installing $TORCH_PIN (CPU wheel) first"
"${PIP[@]}" "$TORCH_PIN" 2>&1 | grep -v "^WARNING: Location" || true
echo "trl_setup: installing $LOCK with --no-deps"
"${PIP[@]}" --no-deps -r "$LOCK" 2>&1 | grep -v "^WARNING: Location" || true

echo "trl_setup: checking the venv"
if "$VENV/bin/python" -m pip list 2>/dev/null | grep -qiE '^torch(vision|audio|codec) '; then
    echo "trl_setup: ERROR: torchvision/torchaudio/torchcodec present in $VENV; they break CPU torch." \
         "Uninstall them ($VENV/bin/pip uninstall -y torchvision torchaudio torchcodec) and rerun." >&2
    exit 1
fi
"$VENV/bin/python" -m pip check
"$VENV/bin/python" - <<'PY'
import torch, transformers, trl
from trl import GRPOConfig, GRPOTrainer  # noqa: F401  (the import the baseline needs)
assert torch.__version__.startswith("2.13.0"), f"torch {torch.__version__}; expected 2.13.0 (CPU)"
print(f"trl_setup: ok: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
PY
echo "$want" > "$STAMP"
