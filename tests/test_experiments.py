"""Experiments: configs/experiments/synthetic_smoke.yaml end to end (experiment, compare, report, and a
second run with nothing left to do), the states of a grid's runs (failed, interrupted, changed config),
cross-validation folds, N runs at a time, and the SLURM launcher through submitit's local executor (a
requeue after a timeout ends identical to an uninterrupted run) and, where .ci/slurm.sh started one, on a
real single-node SLURM."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import main
from core.checkpoint import load_checkpoint
from data import generate_synthetic_dataset
from experiments import job, runner, spec
from experiments.local import LocalLauncher
from experiments.splits import assign_folds

REPO = Path(__file__).resolve().parents[1]
TINY_UNET = "model.channels=[4, 8, 16]"  # two downsamplings: windows of 16 voxels


def cli(*argv):
    """main.cli in this process: (exit status, stderr text)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main.cli(list(argv))
            code = 0
        except SystemExit as stop:
            code = stop.code
    return code, err.getvalue()


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "phantoms"
    generate_synthetic_dataset(folder, n_train=4, n_val=2, n_test=2, seed=11)
    return folder


def write_experiment(folder, phantoms, name, models=("unet",), extra=None, **more):
    """A small experiment on `phantoms`: unet at 16^3, 2 steps, tested on 2 cases."""
    content = {"name": name, "data_config": "synthetic", "trainer_config": "synthetic",
               "set": [f"data.data_dir={phantoms}", "data.spacing=[6.0, 6.0, 6.0]", "data.num_samples=1",
                       "model.roi_size=[16, 16, 16]", "trainer.max_epochs=1", "trainer.iters_per_epoch=2",
                       "trainer.warmup_epochs=0", "trainer.val_every=1", "trainer.device=cpu",
                       "inference.save_predictions=false", "inference.save_overlays=false", *(extra or [])],
               "models": [{"config": m, "set": [TINY_UNET]} if m == "unet" else m for m in models],
               "seeds": [0], **more}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def records(folder):
    return json.loads((folder / "experiment.json").read_text())["runs"]


@pytest.mark.slow
def test_synthetic_smoke_end_to_end_then_nothing_left_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = cli("experiment", "synthetic_smoke")
    assert code == 0, err
    folder = tmp_path / "runs" / "experiments" / "synthetic_smoke"
    runs = records(folder)
    assert sorted(runs) == ["em_net_tiny/seed_0", "em_net_tiny/seed_1", "unet_small/seed_0", "unet_small/seed_1"]
    for key, record in runs.items():
        assert record["state"] == job.FINISHED and record["attempts"] == 1, key
        assert record["host"] and record["commit"] and record["wall_s"] > 0 and record["ended"] >= record["started"]
        assert (folder / key / "eval" / "checkpoint_best" / "metrics.csv").is_file()
    assert "start  em_net_tiny/seed_0" in err and "finished unet_small/seed_1" in err

    capsys.readouterr()
    code, err = cli("compare", str(folder))
    assert code == 0, err
    out = folder / "comparison"
    for name in ("table.md", "table.csv", "table.tex", "stats.csv", "report.html", "dice_boxplot.png"):
        assert (out / name).is_file(), name
    stats_rows = (out / "stats.csv").read_text().splitlines()
    assert len(stats_rows) == 1 + 2 * 9 and "unet_small,em_net_tiny,mean,dice,8," in (out / "stats.csv").read_text()
    assert "em_net_tiny" in (out / "table.md").read_text()

    before = {key: (folder / key / "run_record.json").read_text() for key in runs}
    code, err = cli("experiment", "synthetic_smoke")  # the second time: nothing to run
    assert code == 0 and "start " not in err
    assert {key: (folder / key / "run_record.json").read_text() for key in runs} == before
    assert "experiment synthetic_smoke: nothing to run (4 of 4 runs finished)" in err


def test_failed_runs_are_listed_and_retried_only_when_asked(tmp_path, phantoms, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_experiment(tmp_path, phantoms, "broken", models=("em_net_tiny",))  # em-net needs 32^3 windows
    code, err = cli("experiment", str(path))
    assert code == 0
    record = records(tmp_path / "runs" / "experiments" / "broken")["em_net_tiny/seed_0"]
    assert record["state"] == job.FAILED and record["attempts"] == 1
    assert record["error"].startswith("model 'em-net' cannot be built from the model section: EM-Net roi_size")
    code, err = cli("experiment", str(path))
    assert "1 failed run(s) left as they are (--retry-failed retries them): em_net_tiny/seed_0" in err
    assert records(tmp_path / "runs" / "experiments" / "broken")["em_net_tiny/seed_0"]["attempts"] == 1
    code, err = cli("experiment", str(path), "--retry-failed")
    assert records(tmp_path / "runs" / "experiments" / "broken")["em_net_tiny/seed_0"]["attempts"] == 2


def test_a_changed_experiment_file_is_an_error_naming_the_run_and_the_key(tmp_path, phantoms, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = write_experiment(tmp_path, phantoms, "changed")
    assert cli("experiment", str(path))[0] == 0
    write_experiment(tmp_path, phantoms, "changed", extra=["trainer.lr=0.001"])
    code, err = cli("experiment", str(path))
    saved = Path("runs") / "experiments" / "changed" / "unet" / "seed_0" / "config.yaml"
    assert code == 2 and err.splitlines()[-1] == (
        f"error: experiment changed: run unet/seed_0 was started with trainer.lr = 0.005 ({saved}); the "
        "experiment file now gives 0.001. Undo the change, or pass --force to continue the run with the new value")
    capsys.readouterr()
    assert cli("experiment", str(path), "--dry-run")[0] == 0
    printed = capsys.readouterr().out
    assert "unet/seed_0  finished" in printed and "0 run(s) to start or continue; nothing run (--dry-run)" in printed
    assert cli("experiment", str(path), "--force")[0] == 0  # finished: nothing to continue, but no error


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, phantoms):
    path = write_experiment(tmp_path, phantoms, "stopped", extra=["trainer.iters_per_epoch=200"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, str(REPO / "main.py"), "experiment", str(path)], cwd=tmp_path,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "runs" / "experiments" / "stopped" / "unet" / "seed_0" / "train.log"
    deadline = time.monotonic() + 180
    while not (log.is_file() and "model unet" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=180)
    assert process.returncode == 143, err[-2000:]
    folder = tmp_path / "runs" / "experiments" / "stopped"
    record = records(folder)["unet/seed_0"]
    assert record["state"] == job.INTERRUPTED and record["signal"] == signal.SIGTERM
    stopped_at = load_checkpoint(folder / "unet" / "seed_0" / "checkpoint_latest.pt")["iteration"]
    assert 0 < stopped_at < 200
    result = subprocess.run([sys.executable, str(REPO / "main.py"), "experiment", str(path), "--status"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "unet/seed_0  interrupted" in result.stdout
    result = subprocess.run([sys.executable, str(REPO / "main.py"), "experiment", str(path)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    record = records(folder)["unet/seed_0"]
    assert record["state"] == job.FINISHED and record["attempts"] == 2
    assert f"resumed runs/experiments/stopped/unet/seed_0/checkpoint_latest.pt at epoch 0, iteration {stopped_at}" in \
        (folder / "unet" / "seed_0" / "train.log").read_text()


def test_folds_cover_the_training_cases_once_and_never_the_test_cases(tmp_path, phantoms, monkeypatch):
    assert assign_folds(list(range(10)), 3, seed=4) == assign_folds(list(range(10)), 3, seed=4)
    assert sorted(assign_folds(list(range(10)), 3, seed=4).count(k) for k in range(3)) == [3, 3, 4]
    monkeypatch.chdir(tmp_path)
    path = write_experiment(tmp_path, phantoms, "folds", seeds=None, folds=3)
    content = yaml.safe_load(path.read_text())
    del content["seeds"]
    path.write_text(yaml.safe_dump(content))
    experiment = spec.load_experiment(path)
    assert [run.key for run in experiment.runs] == ["unet/fold_0", "unet/fold_1", "unet/fold_2"]
    runner.prepare(experiment)
    dataset = json.loads((phantoms / "dataset.json").read_text())
    pool = {e["image"].removeprefix("./") for e in dataset["training"] + dataset["validation"]}
    tests = {e["image"].removeprefix("./") for e in dataset["test"]}
    validation = []
    for k in range(3):
        split = json.loads(experiment.fold_split_file(k).read_text())
        val, train = {e["image"] for e in split["validation"]}, {e["image"] for e in split["training"]}
        assert val | train == pool and not val & train and {e["image"] for e in split["test"]} == tests
        validation += sorted(val)
    assert sorted(validation) == sorted(pool)  # each case validates in exactly one fold
    content["fold_seed"] = 1
    path.write_text(yaml.safe_dump(content))
    code, err = cli("experiment", str(path))
    assert code == 2 and "holds 3 folds from seed 0, the experiment file asks for 3 from seed 1" in err


def test_two_runs_at_a_time_each_with_its_share_of_the_cores(tmp_path, phantoms, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_experiment(tmp_path, phantoms, "parallel", seeds=[0, 1])
    experiment = spec.load_experiment(path)
    states = runner.run_experiment(experiment, LocalLauncher(jobs=2))
    assert states == {"unet/seed_0": job.FINISHED, "unet/seed_1": job.FINISHED}
    pids = {records(experiment.folder)[k]["pid"] for k in states}
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes, not this one
    for run in experiment.runs:
        assert "evaluate test" in (run.path / "console.log").read_text()


# ---- SLURM -------------------------------------------------------------------------------------------


def _uninterrupted(tmp_path, phantoms, name, steps):
    path = write_experiment(tmp_path, phantoms, name, extra=[f"trainer.iters_per_epoch={steps}"])
    experiment = spec.load_experiment(path)
    runner.run_experiment(experiment, LocalLauncher())
    return experiment.runs[0].path


@pytest.mark.slow
def test_slurm_launcher_requeues_after_a_timeout_and_ends_as_an_uninterrupted_run(tmp_path, phantoms,
                                                                                  monkeypatch):
    """submitit's local executor: the same submission, signal and requeue interface as SLURM. A time limit of
    40 s with the warning (SIGUSR2) 20 s before it stops the run mid-training (its steps are sized from this
    machine's speed to take about 30 s); it saves, submitit requeues it, and the requeued job resumes and
    finishes identical to an uninterrupted run."""
    pytest.importorskip("submitit")
    from experiments.slurm import SlurmLauncher

    monkeypatch.chdir(tmp_path)
    probe = (_uninterrupted(tmp_path, phantoms, "probe", 50) / "train.log").read_text()
    rate = float(re.search(r"epoch 1: loss [0-9.]+, lr \S+, ([0-9.]+) it/s", probe).group(1))
    steps = max(100, int(30 * rate))
    whole = load_checkpoint(_uninterrupted(tmp_path, phantoms, "whole", steps) / "checkpoint_latest.pt")
    path = write_experiment(tmp_path, phantoms, "requeued", extra=[f"trainer.iters_per_epoch={steps}"])
    experiment = spec.load_experiment(path)
    launcher = SlurmLauncher({"time_min": 40 / 60, "signal_delay_s": 20}, cluster="local")
    states = runner.run_experiment(experiment, launcher)
    assert states == {"unet/seed_0": job.FINISHED}
    log = (experiment.runs[0].path / "train.log").read_text()
    assert "stopped by SIGUSR2" in log and records(experiment.folder)["unet/seed_0"]["attempts"] >= 2, log
    resumed = load_checkpoint(experiment.runs[0].path / "checkpoint_latest.pt")
    for key, value in whole["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    assert resumed["history"]["loss"] == whole["history"]["loss"]


@pytest.mark.slow
def test_an_experiment_on_a_real_slurm(tmp_path, phantoms, monkeypatch):
    """Where .ci/slurm.sh started a single-node SLURM (it writes its status to $SLURM_STATUS_FILE)."""
    status_file = os.environ.get("SLURM_STATUS_FILE", "/tmp/slurm_status")
    status = Path(status_file).read_text().strip() if Path(status_file).is_file() else "no .ci/slurm.sh status"
    if not status.startswith("SLURM_READY") or shutil.which("sbatch") is None:
        pytest.skip(f"no SLURM here: {status}")
    from experiments.slurm import SlurmLauncher

    monkeypatch.chdir(tmp_path)
    path = write_experiment(tmp_path, phantoms, "on_slurm", seeds=[0, 1])
    experiment = spec.load_experiment(path)
    states = runner.run_experiment(experiment, SlurmLauncher({"partition": "ci", "time_min": 10}))
    assert states == {"unet/seed_0": job.FINISHED, "unet/seed_1": job.FINISHED}
    assert all(records(experiment.folder)[k]["slurm_job"] for k in states)


def test_the_folds_ensemble_is_tested_together_and_compared_as_a_row_of_its_own(tmp_path, phantoms, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_experiment(tmp_path, phantoms, "cv", models=("unet", "segresnet"))
    content = yaml.safe_load(path.read_text())
    del content["seeds"]
    content.update(folds=2, models=[{"config": "unet", "set": [TINY_UNET]},
                                    {"config": "segresnet", "set": ["model.init_filters=8"]}])
    path.write_text(yaml.safe_dump(content))
    assert cli("experiment", str(path))[0] == 0
    folder = tmp_path / "runs" / "experiments" / "cv"
    code, err = cli("test", "--checkpoint", str(folder), "--ensemble", "unet")
    assert code == 0, err
    members = json.loads((folder / "unet" / "ensemble_best" / "members.json").read_text())
    assert members == [str(folder / "unet" / f"fold_{k}" / "checkpoint_best.pt") for k in (0, 1)]
    code, err = cli("compare", str(folder))
    assert code == 0, err
    table = (folder / "comparison" / "table.md").read_text()
    assert "| unet (ensemble of 2) |" in table and "| segresnet |" in table
    code, err = cli("test", "--checkpoint", str(folder), "--ensemble", "vnet")
    assert code == 2 and "--ensemble vnet: the experiment's models are unet, segresnet" in err


def test_a_stop_signal_reaches_torchrun_as_sigterm_and_sigusr2_cannot_kill_it(tmp_path):
    """A SLURM job's SIGUSR2 (or SIGTERM) to the process that started torchrun is passed on as SIGTERM, which
    stops the ranks after their step; torchrun itself ignores SIGUSR2, of which its agent would die."""
    import threading

    from experiments.slurm import _run_forwarding_stops

    ready = tmp_path / "ready"
    child = ("import pathlib, signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))\n"
             f"pathlib.Path({str(ready)!r}).write_text(str(signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN))\n"
             "time.sleep(60)\n")

    def signal_when_ready():
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # the parent's handler is installed right after the child starts
        os.kill(os.getpid(), signal.SIGUSR2)

    sender = threading.Thread(target=signal_when_ready)
    before = signal.getsignal(signal.SIGUSR2)
    sender.start()
    started = time.monotonic()
    status, stopped_by = _run_forwarding_stops([sys.executable, "-c", child])
    sender.join()
    assert (status, stopped_by) == (128 + signal.SIGTERM, signal.SIGUSR2)
    assert ready.read_text() == "True" and time.monotonic() - started < 30
    assert signal.getsignal(signal.SIGUSR2) is before  # the handlers are put back
