#!/usr/bin/env bash
# Train EM-Net on BTCV with the reference protocol (SGD). Extra arguments go to main.py,
# e.g. --set data.data_dir=/data/BTCV --set trainer.device=cuda:1
set -euo pipefail
cd "$(dirname "$0")/.."
exec python main.py train --data_config btcv --model_config em_net --trainer_config sgd "$@"
