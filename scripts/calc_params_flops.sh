#!/usr/bin/env bash
# Parameters, FLOPs and MACs of every registered model at the Synapse window (128^3), one table, also written
# to runs/flops/synapse_128x128x128/flops.{csv,md}. Extra arguments go to main.py flops, e.g.
#   scripts/calc_params_flops.sh --set model.roi_size=[96,96,96]
#   scripts/calc_params_flops.sh --counter calflops      # needs: pip install -r requirements-flops.txt
set -euo pipefail
cd "$(dirname "$0")/.."
exec python main.py flops --all --data_config synapse "$@"
