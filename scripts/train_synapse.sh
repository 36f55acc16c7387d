#!/usr/bin/env bash
# Train EM-Net on SYNAPSE with the reference protocol (SGD). Extra arguments go to main.py,
# e.g. --set data.data_dir=/data/SYNAPSE --set trainer.device=cuda:1
set -euo pipefail
cd "$(dirname "$0")/.."
exec python main.py train --data_config synapse --model_config em_net --trainer_config sgd "$@"
