#!/usr/bin/env bash
# Set up and run the main job end to end: prune a model (default: SmolLM2-135M from ../shared),
# evaluate perplexity before/after (8 windows of 1,024 WikiText-2 tokens: a first look, not the full protocol),
# write model + recipe + report.json + plots to runs/quickstart.
# Installs only the core layer (scripts/setup.sh: torch + prunepilot; no test extras, no llama.cpp build).
#   bash scripts/quickstart.sh [MODEL_PATH_OR_HUB_NAME] [extra `prunepilot prune` options]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=${1:-../shared/models/smollm2-135m-instruct}
shift || true
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
.venv/bin/prunepilot prune "$MODEL" --method wanda --sparsity 0.5 --calib web --n-samples 16 --seqlen 512 \
  --eval wikitext2 --eval-seqlen 1024 --eval-max-windows 8 --out runs/quickstart --overwrite "$@"
echo "report: runs/quickstart/report.json  plot: runs/quickstart/sparsity.png  model: runs/quickstart/model"
