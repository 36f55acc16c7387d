"""`python -m experiments.torchrun_entry CONFIG.json RUN_DIR`: one process of an experiment run's training under
torchrun (experiments/slurm.py starts it): a new run in RUN_DIR, or the continuation of the one there. A user
error or a stop is one line from rank 0 and the exit status main.py would give."""
import json
import os
import sys
from pathlib import Path

import train
from core.errors import UserError
from core.rundir import RunDir


def main(config_path, run_dir):
    cfg = json.loads(Path(config_path).read_text())
    run = RunDir(run_dir, overwrite=True)
    try:
        train.run(cfg, run, resume=run.path if run.latest.is_file() else None)
    except UserError as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None


if __name__ == "__main__":
    main(*sys.argv[1:3])
