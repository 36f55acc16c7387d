"""`main.py experiment FILE`: run an experiment's grid, or continue it where it stopped, or show it.

Running the same command again continues the experiment: a finished run (trained and tested) is skipped, an
interrupted one resumes from its checkpoint_latest.pt, a failed one is listed with its one-line error and
retried only with --retry-failed. A run whose resolved config differs from the config.yaml it saved is a
one-line error naming the run and the key, unless --force. experiment.json records every run.
"""
import datetime
import json
import os
import shutil
import socket
import sys

from tqdm import tqdm

import config
import data
from core.errors import ConfigError
from core.fileio import atomic_path
from core.rundir import RunDir

from . import job
from .splits import write_folds

STATE_FILE = "experiment.json"


def current_state(run, record):
    """The state of `run` from its record and folder: a "running" record whose process is gone on this host
    was interrupted (or never saved anything: then it is pending again)."""
    state = record.get("state", job.PENDING)
    folder = RunDir(run.path)
    if state == job.RUNNING and record.get("host") == socket.gethostname() and not record.get("slurm_job") \
            and not _alive(record.get("pid")):
        state = job.INTERRUPTED if folder.latest.is_file() else job.PENDING
    if state == job.FINISHED and not all((folder.eval_dir(p) / "summary.json").is_file() for p in folder.checkpoints()):
        state = job.INTERRUPTED  # trained, but its evaluation did not finish
    return state


def _alive(pid):
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def states(experiment):
    """{run key: (state, record)} of every run of the grid."""
    result = {}
    for run in experiment.runs:
        record = job.read_record(run.path)
        result[run.key] = (current_state(run, record), record)
    return result


def check_configs(experiment, force):
    """A run that saved a config must get the same one again: the experiment file may have changed since."""
    for run in experiment.runs:
        saved_path = RunDir(run.path).config
        if force or not saved_path.is_file():
            continue
        saved, now = config.load_config(saved_path), experiment.config(run)
        for section in sorted(set(saved) | set(now)):
            for key in sorted(set(saved.get(section, {})) | set(now.get(section, {}))):
                before, after = saved.get(section, {}).get(key), now.get(section, {}).get(key)
                if before != after:
                    raise ConfigError(f"experiment {experiment.name}: run {run.key} was started with {section}.{key} "
                                      f"= {before!r} ({saved_path}); the experiment file now gives {after!r}. Undo "
                                      "the change, or pass --force to continue the run with the new value")


def write_state(experiment, current):
    """experiment.json: every run's state, start and end, wall time, host and commit (atomically)."""
    runs = {key: {**record, "state": state} for key, (state, record) in current.items()}
    content = {"name": experiment.name, "file": str(experiment.file), "updated": _now(), "runs": runs,
               "counts": {s: sum(v["state"] == s for v in runs.values()) for s in
                          (job.PENDING, job.RUNNING, job.INTERRUPTED, job.FAILED, job.FINISHED)}}
    with atomic_path(experiment.folder / STATE_FILE, ".json") as tmp, open(tmp, "w") as f:
        json.dump(content, f, indent=1)
        f.write("\n")


def _now():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def format_grid(experiment, current):
    """One line per run: its key, state, folder and, for a failed run, its error."""
    width = max(len(run.key) for run in experiment.runs)
    lines = [f"experiment {experiment.name} ({experiment.file}): {len(experiment.runs)} runs in {experiment.folder}"]
    for run in experiment.runs:
        state, record = current[run.key]
        note = record.get("error") if state == job.FAILED else (
            f"{record.get('wall_s', 0) / 60:.1f} min" if state == job.FINISHED else "")
        lines.append(f"  {run.key:<{width}}  {state:<11}  {run.path}" + (f"  {note}" if note else ""))
    return "\n".join(lines)


def to_run(current, retry_failed):
    """The keys of the runs this invocation starts or continues."""
    wanted = {job.PENDING, job.INTERRUPTED} | ({job.FAILED} if retry_failed else set())
    return [key for key, (state, _) in current.items() if state in wanted]


def prepare(experiment):
    """The experiment folder with a copy of the file it was run from and, for folds, its splits."""
    experiment.folder.mkdir(parents=True, exist_ok=True)
    pool = experiment.config(experiment.runs[0], fold_split=False)
    data.ensure_for(pool["data"])
    copy = experiment.folder / "experiment.yaml"
    if experiment.file.resolve() != copy.resolve():
        shutil.copyfile(experiment.file, copy)
    if experiment.folds:
        write_folds(experiment, pool)


class Progress:
    """A line per run start and end, and a bar of the runs done with the time left estimated from them."""

    def __init__(self, total):
        self.bar = tqdm(total=total, desc="experiment", unit="run", dynamic_ncols=True, file=sys.stderr)

    def started(self, run):
        self.bar.write(f"start  {run.key}  ({run.path})", file=sys.stderr)

    def ended(self, run, record):
        state = record.get("state")
        note = f": {record['error']}" if state == job.FAILED else f" in {record.get('wall_s', 0) / 60:.1f} min"
        self.bar.write(f"{state:<6} {run.key}{note}", file=sys.stderr)
        self.bar.update(1)

    def close(self):
        self.bar.close()


def run_experiment(experiment, launcher, retry_failed=False, force=False, dry_run=False, status=False):
    """Show (dry_run, status) or run the runs still to run with `launcher` (experiments.local or .slurm);
    returns {run key: state} after it."""
    current = states(experiment)
    if status or dry_run:
        print(format_grid(experiment, current))
        if dry_run:
            print(f"{len(to_run(current, retry_failed))} run(s) to start or continue; nothing run (--dry-run)")
        return {key: state for key, (state, _) in current.items()}
    check_configs(experiment, force)
    prepare(experiment)
    todo = [run for run in experiment.runs if run.key in set(to_run(current, retry_failed))]
    failed = [key for key, (state, _) in current.items() if state == job.FAILED and not retry_failed]
    if failed:
        print(f"{len(failed)} failed run(s) left as they are (--retry-failed retries them): {', '.join(failed)}",
              file=sys.stderr)
    write_state(experiment, current)
    if not todo:
        finished = sum(state == job.FINISHED for state, _ in current.values())
        print(f"experiment {experiment.name}: nothing to run ({finished} of {len(current)} runs finished)",
              file=sys.stderr)
    progress = Progress(len(todo))
    try:
        launcher.run(experiment, todo, progress)
    finally:
        progress.close()
        current = states(experiment)
        write_state(experiment, current)
    print(format_grid(experiment, current))
    return {key: state for key, (state, _) in current.items()}
