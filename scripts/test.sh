#!/usr/bin/env bash
# Evaluate a trained checkpoint on its data set's test cases (Synapse, BTCV or any other): Dice and HD95 (mm)
# per organ. The data set is the one in the config.yaml beside the checkpoint.
# Usage: scripts/test.sh runs/em-net_synapse/<timestamp>/checkpoint_best.pt [more main.py options]
#        scripts/test.sh runs/em-net_btcv/<timestamp>      # a run folder: best and latest side by side
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CHECKPOINT|RUN_DIR [main.py options]" >&2
  exit 2
fi
checkpoint=$(realpath "$1")
shift
cd "$(dirname "$0")/.."
exec python main.py test --checkpoint "$checkpoint" "$@"
