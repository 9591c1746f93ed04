#!/usr/bin/env bash
# The main job: set up, train the default single-channel recipe briefly on simulated data (CPU),
# then predict on a held-out simulated movie and print the metrics table. Extra args go to `decode-accel demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec .venv/bin/decode-accel demo --out outputs/demo "$@"
