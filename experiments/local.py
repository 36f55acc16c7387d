"""The local launcher: an experiment's runs on this machine, one after another in this process, or N at a
time in worker processes, each on its own GPU (CUDA_VISIBLE_DEVICES) or with its share of the CPU cores."""
import contextlib
import multiprocessing
import os
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from core.errors import ConfigError, TrainingInterrupted
from core.rundir import RunDir

from . import job


class LocalLauncher:
    def __init__(self, jobs=1, devices=None):
        if jobs < 1:
            raise ConfigError(f"--jobs {jobs}: give at least 1")
        self.jobs, self.devices = jobs, worker_devices(jobs, devices)

    def run(self, experiment, runs, progress):
        commit = job.project_commit()
        if self.jobs == 1:
            for run in runs:
                progress.started(run)
                progress.ended(run, job.execute(experiment.config(run), run.path, run.key, commit))
            return
        self._run_in_workers(experiment, runs, progress, commit)

    def _run_in_workers(self, experiment, runs, progress, commit):
        context = multiprocessing.get_context("spawn")  # CUDA_VISIBLE_DEVICES before anything touches CUDA
        devices = context.Queue()
        for device in self.devices:
            devices.put(device)
        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        pending, running = list(runs), {}
        with ProcessPoolExecutor(self.jobs, mp_context=context, initializer=_init_worker,
                                 initargs=(devices, threads)) as pool:
            try:
                while pending or running:
                    while pending and len(running) < self.jobs:
                        run = pending.pop(0)
                        progress.started(run)
                        running[pool.submit(_execute_quietly, experiment.config(run), run.path, run.key,
                                            commit)] = run
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        progress.ended(running.pop(future), future.result())
            except (KeyboardInterrupt, TrainingInterrupted):
                pool.shutdown(wait=True, cancel_futures=True)  # the workers got the signal too: they save
                raise


def worker_devices(jobs, devices):
    """One device per worker: the --devices given, else on a CUDA machine GPUs 0..jobs-1, else none (CPU)."""
    if devices is not None:
        devices = [d.strip() for d in str(devices).split(",") if d.strip()]
        if len(devices) < jobs:
            raise ConfigError(f"--devices {','.join(devices)}: {jobs} jobs need {jobs} devices, one each")
        return devices[:jobs]
    import torch

    if not torch.cuda.is_available():
        return [None] * jobs
    if torch.cuda.device_count() < jobs:
        raise ConfigError(f"--jobs {jobs}: this machine has {torch.cuda.device_count()} GPU(s); give fewer jobs or "
                          "--devices")
    return [str(i) for i in range(jobs)]


def _init_worker(devices, threads):
    device = devices.get()
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[name] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _execute_quietly(cfg, run_dir, key, commit):
    """job.execute with the run's console output in <run>/console.log: runs side by side would interleave it."""
    console = RunDir(run_dir).console
    console.parent.mkdir(parents=True, exist_ok=True)
    with open(console, "a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        os.dup2(out.fileno(), sys.stderr.fileno())  # tqdm and the log handlers write to the stream itself
        return job.execute(cfg, run_dir, key, commit)
