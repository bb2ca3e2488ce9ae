#!/usr/bin/env bash
# Install the core and the test layer (scripts/setup.sh --test: test extras + llama-cpp-python) and run the
# default CPU-only test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export TQDM_DISABLE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
