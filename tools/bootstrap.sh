#!/usr/bin/env bash
# Create or update .venv/ in the repo root with everything setdiv needs.
# Idempotent: a second run only checks that the pins are satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    echo "[bootstrap] creating .venv with $PY"
    "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip "setuptools>=68" wheel

# torch/torchvision first, pinned: this machine serves the 2.14.1 CUDA build from local disk.
"${PIP[@]}" install -q "torch==2.14.1" "torchvision==0.29.1"

# deepspeed builds against the installed torch, hence no build isolation.
if ! .venv/bin/python -c "import deepspeed" >/dev/null 2>&1; then
    echo "[bootstrap] installing deepspeed"
    DS_BUILD_OPS=0 "${PIP[@]}" install -q --no-build-isolation "deepspeed==0.19.8"
fi

"${PIP[@]}" install -q -e ".[dev]"

# A headless browser for the search page's test (tests/test_serve.py and the demo test skip without one).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[bootstrap] installing chromium (headless browser for the search page test)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
        >/dev/null 2>&1 || echo "[bootstrap] chromium not installed: that test will be skipped"
fi
# An HTTP server for the remote-shard tests (tests/test_remote.py, tests/test_train_web.py).
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[bootstrap] installing nginx (HTTP server for the remote-shard tests)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light) \
        >/dev/null 2>&1 || echo "[bootstrap] nginx not installed: the HTTP shard tests will be skipped"
fi
echo "[bootstrap] .venv ready: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
