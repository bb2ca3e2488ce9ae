#!/usr/bin/env bash
# Create .venv (if missing) and install prunepilot in two layers:
#   bash scripts/setup.sh          core: what pruning, evaluation and GGUF export need (torch, transformers, gguf ...)
#   bash scripts/setup.sh --test   core + the test extras (pytest, openai, lm-eval ...) + llama-cpp-python
# torch is pinned to the CPU wheel 2.13.0: a bare `torch` requirement would pull a multi-GB CUDA build.
#
# llama-cpp-python (the real llama.cpp, to check exported GGUF files and to serve a controller model over an
# OpenAI-compatible API in the tests) compiles llama.cpp on install: about 7-13 minutes on 2 cores, once. Pruning
# never uses it, so only the test layer builds it. It is built portable (GGML_NATIVE=OFF: the native build crashes
# on multi-token prompts on CPUs that advertise AMX/AVX-512) into a wheel cache ($PRUNEPILOT_WHEELS, default
# ~/.cache/prunepilot/wheels), so later installs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LLAMA_CPP_VERSION=0.3.36
WHEELS=${PRUNEPILOT_WHEELS:-$HOME/.cache/prunepilot/wheels}
LAYER=${1:-core}
case "$LAYER" in core|--test) ;; *) echo "usage: bash scripts/setup.sh [--test]" >&2; exit 2 ;; esac
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# --no-compile: byte-compiling every file of torch and transformers at install took half of setup (about 35 of
# 70 s here); Python compiles the modules it imports on first use instead.
PIP=".venv/bin/python -m pip"
INSTALL="$PIP install -q --no-compile"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
$INSTALL "torch==2.13.0"
if [ "$LAYER" = core ]; then
  $INSTALL -e .
  exit 0
fi
$INSTALL -e ".[test]"
if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $LLAMA_CPP_VERSION (portable, once; about 7-13 minutes on 2 cores) into $WHEELS"
  mkdir -p "$WHEELS"
  CMAKE_ARGS="-DGGML_NATIVE=OFF" $PIP wheel -q --no-deps "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$WHEELS"
fi
$INSTALL --find-links "$WHEELS" "llama-cpp-python[server]==$LLAMA_CPP_VERSION"
