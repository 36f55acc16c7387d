"""One run of an experiment, wherever it executes (this process, a worker process, a SLURM job): train it
(new, or resumed from its checkpoint_latest.pt) and test both of its checkpoints with the same code as a
single run, and keep its record (state, times, host, commit) in its own folder, which only this run writes.
"""
import datetime
import json
import os
import socket
import subprocess
import time
import traceback
from pathlib import Path

import test
import train
from core.errors import TrainingInterrupted, UserError
from core.fileio import atomic_path
from core.rundir import RunDir

PENDING, RUNNING, INTERRUPTED, FAILED, FINISHED = "pending", "running", "interrupted", "failed", "finished"
PROJECT = Path(__file__).resolve().parents[1]


def project_commit():
    """The project's git commit, with "-dirty" when files differ from it; "unknown" outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if commit and dirty else commit or "unknown"


def read_record(run_dir):
    """The run's record ({} before its first start)."""
    path = RunDir(run_dir).record
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_record(run_dir, record):
    path = RunDir(run_dir).record
    with atomic_path(path, ".json") as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


def _now():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _checkpoint_epochs(run):
    summaries = {}
    for path in run.checkpoints():
        summary = run.eval_dir(path) / "summary.json"
        if summary.is_file():
            summaries[path.stem.removeprefix("checkpoint_")] = json.loads(summary.read_text())["checkpoint"]["epoch"]
    return summaries


def train_here(cfg, run):
    """Train in this process: a new run, or the continuation of the one in the folder."""
    train.run(cfg, run, resume=run.path if run.latest.is_file() else None)


def execute(cfg, run_dir, key, commit=None, train_fn=train_here):
    """Train (with `train_fn(cfg, run)`), then test, the run `key` with `cfg` in `run_dir`; returns its record.
    A user error or a bug ends the run as "failed" with its first line (the traceback goes to
    <run>/error.txt); a stop signal ends it as "interrupted" and is raised again, for the caller to stop too."""
    run = RunDir(run_dir, overwrite=True)  # a folder of the experiment's: a run that never saved is redone
    record = read_record(run.path)
    record.update(key=key, state=RUNNING, started=_now(), ended=None, host=socket.gethostname(), pid=os.getpid(),
                  commit=commit or project_commit(), attempts=record.get("attempts", 0) + 1, error=None,
                  slurm_job=os.environ.get("SLURM_JOB_ID"))
    write_record(run.path, record)
    began = time.monotonic()
    try:
        train_fn(cfg, run)
        test.evaluate_run(cfg, run)
        record.update(state=FINISHED, epochs=_checkpoint_epochs(run))
    except TrainingInterrupted as err:
        record.update(state=INTERRUPTED, error=str(err), signal=err.exit_code - 128)
        raise
    except KeyboardInterrupt:
        record.update(state=INTERRUPTED, error="interrupted (second Ctrl-C)")
        raise
    except Exception as err:  # noqa: BLE001  (one failed run must not end the experiment)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        record.update(state=FAILED, error=first if isinstance(err, UserError) else f"{type(err).__name__}: {first}")
        run.path.mkdir(parents=True, exist_ok=True)
        (run.path / "error.txt").write_text(traceback.format_exc())
    finally:
        record.update(ended=_now(), wall_s=round(record.get("wall_s", 0.0) + time.monotonic() - began, 1))
        if run.path.is_dir():
            write_record(run.path, record)
    return record
