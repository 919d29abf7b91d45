#!/usr/bin/env bash
# Sets up everything specd needs on this machine: a virtualenv in .venv with the pinned
# dependencies, and redis-server. Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.specd-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "==> installing specd and its dependencies into .venv"
  # llama-cpp-python compiles llama.cpp for this CPU (about 10 minutes on 2 cores, once: pip
  # caches the wheel). AMX is left out: some virtual machines advertise it and then fault on
  # its first instruction, and llama.cpp uses it only for batched passes.
  export CMAKE_ARGS="${CMAKE_ARGS:--DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'}"
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
  if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
    echo "    (building llama-cpp-python from source the first time: about 10 minutes on 2 cores)"
  fi
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[test,bench]'
  touch "$stamp"
fi

if ! command -v redis-server >/dev/null 2>&1; then
  echo "==> installing redis-server"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq redis-server >/dev/null
  # The Debian package starts a system server on 6379; specd starts its own.
fi
