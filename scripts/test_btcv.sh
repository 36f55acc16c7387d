#!/usr/bin/env bash
# Evaluate a trained checkpoint on the BTCV test cases: Dice and HD95 (mm) per organ.
# Usage: scripts/test_btcv.sh runs/em-net_btcv/<timestamp>/checkpoint_best.pt [more main.py options]
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CHECKPOINT [main.py options]" >&2
  exit 2
fi
checkpoint=$(realpath "$1")
shift
cd "$(dirname "$0")/.."
exec python main.py test --checkpoint "$checkpoint" "$@"
