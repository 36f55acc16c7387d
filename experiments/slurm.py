"""The SLURM launcher: one job per run, submitted as one job array through submitit.

A run's job trains and tests it with the same code as a single run. SLURM warns a job before its time limit
with SIGUSR2 (`--signal=USR2@signal_delay_s`); the training loop takes it as a stop: it saves its
checkpoint_latest.pt at the current step, and only then is submitit's handler called, which requeues the job
(RunJob.checkpoint); the requeued job resumes. A preempted job gets SIGTERM: it saves the same way and ends
without a result, and SLURM requeues it (PreemptMode=REQUEUE). A run on several GPUs (slurm.gpus_per_node,
slurm.nodes) is torchrun inside the job, one torchrun per node.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from core.errors import ConfigError, TrainingInterrupted, first_line

from . import job

DEFAULTS = {"nodes": 1, "gpus_per_node": 0, "cpus_per_task": None, "mem_gb": None, "time_min": 60,
            "signal_delay_s": 120, "array_parallelism": None, "partition": None, "account": None, "additional": {},
            "processes_per_node": None, "max_requeues": 50}
POLL_S = 5


def _submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError("--launcher slurm needs submitit: pip install submitit") from None
    return submitit


def executor_for(folder, settings, cluster="slurm"):
    """A submitit executor with the experiment's slurm settings; cluster "local" is submitit's LocalExecutor,
    the same submission, signal and requeue interface on this machine (tests)."""
    submitit = _submitit()
    s = {**DEFAULTS, **settings}
    if cluster == "local":
        executor = submitit.LocalExecutor(folder=str(folder), max_num_timeout=int(s["max_requeues"]))
        executor.update_parameters(timeout_min=s["time_min"], signal_delay_s=int(s["signal_delay_s"]))
        return executor
    executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=int(s["max_requeues"]))
    parameters = {"time": int(s["time_min"]), "nodes": s["nodes"], "ntasks_per_node": 1,
                  "signal_delay_s": int(s["signal_delay_s"]),
                  "additional_parameters": {"requeue": True, **(s["additional"] or {})}}
    for ours, theirs in (("partition", "partition"), ("account", "account"), ("cpus_per_task", "cpus_per_task"),
                         ("array_parallelism", "array_parallelism")):
        if s[ours] is not None:
            parameters[theirs] = s[ours]
    if s["gpus_per_node"]:
        parameters["gpus_per_node"] = s["gpus_per_node"]
    if s["mem_gb"] is not None:
        parameters["mem"] = f"{s['mem_gb']}GB"
    executor.update_parameters(**parameters)
    if not _sacct_works():  # without accounting submitit would wait forever for a job that left no result
        from submitit.slurm.slurm import SlurmJob

        SlurmJob.watcher = squeue_watcher(POLL_S)
    return executor


class RunJob:
    """The callable a run's job executes (submitit's Checkpointable protocol: `checkpoint` gives the
    submission that continues it)."""

    def __init__(self, cfg, run_dir, key, commit, processes=1, nodes=1):
        self.cfg, self.run_dir, self.key, self.commit = cfg, str(run_dir), key, commit
        self.processes, self.nodes = processes, nodes

    def __call__(self):
        submitit_handler = signal.getsignal(signal.SIGUSR2)  # submitit's: checkpoint() and requeue
        try:
            if self.processes * self.nodes > 1:
                return self._with_torchrun()
            return job.execute(self.cfg, self.run_dir, self.key, self.commit)
        except TrainingInterrupted as err:
            if err.exit_code - 128 == signal.SIGUSR2 and callable(submitit_handler):
                submitit_handler(signal.SIGUSR2, None)  # saved already: requeue (never returns)
            raise SystemExit(err.exit_code) from None  # no result: SLURM requeues a preempted job itself

    def checkpoint(self, *args, **kwargs):
        submitit = _submitit()
        return submitit.helpers.DelayedSubmission(RunJob(self.cfg, self.run_dir, self.key, self.commit,
                                                         self.processes, self.nodes))

    def _with_torchrun(self):
        """Training under torchrun on every node; the test then on the first node, in this process."""
        environment = _submitit().JobEnvironment()
        if environment.node != 0:
            self._torchrun(self.cfg, None, environment)
            return None
        return job.execute(self.cfg, self.run_dir, self.key, self.commit,
                           train_fn=lambda cfg, run: self._torchrun(cfg, run, environment))

    def _torchrun(self, cfg, run, environment):
        config_path = Path(self.run_dir) / "experiment_config.json"
        if run is not None:  # the first node writes it; the others find it on the shared file system
            config_path.write_text(json.dumps(cfg))
        command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={self.nodes}",
                   f"--node_rank={environment.node}", f"--nproc_per_node={self.processes}",
                   f"--master_addr={environment.hostnames[0]}", f"--master_port={_port(environment)}",
                   "-m", "experiments.torchrun_entry", str(config_path), self.run_dir]
        status, stopped_by = _run_forwarding_stops(command)
        if stopped_by:
            raise TrainingInterrupted(f"{self.key} stopped by {signal.Signals(stopped_by).name} under torchrun "
                                      f"(status {status}); saved its checkpoint_latest.pt", stopped_by)
        if status:
            raise RuntimeError(f"torchrun ended with status {status}; its ranks' messages are in the job's output "
                               f"and {Path(self.run_dir) / 'train.log'}")


def _port(environment):
    """A port for the job's rendezvous, the same on every node: from the job id."""
    return 20000 + int(str(environment.job_id).split("_")[0]) % 20000


def _run_forwarding_stops(command):
    """Run torchrun, with SIGUSR2 ignored in its agent (which would die of it); a stop signal to this process
    (SLURM also signals the workers themselves) is passed on to torchrun as SIGTERM, which stops the
    workers at their next step. Returns (torchrun's exit status, the first stop signal or None)."""
    received = []

    def forward(signum, frame):
        received.append(signum)
        child.send_signal(signal.SIGTERM)

    child = subprocess.Popen(command, preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN))
    previous = {s: signal.signal(s, forward) for s in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        status = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return status, (received[0] if received else None)


def squeue_watcher(delay_s):
    """A submitit job watcher that reads the states from squeue (defined here: submitit is imported lazily)."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    class Watcher(SlurmInfoWatcher):
        """Job states from `squeue --states=all` where `sacct` does not work (no accounting database): submitit
        asks sacct, and without an answer would wait forever for a job that ended without a result (cancelled,
        killed). slurmctld keeps finished jobs for MinJobAge seconds."""

        TRANSITIONAL = {"CONFIGURING": "RUNNING", "SIGNALING": "RUNNING", "STAGE_OUT": "RUNNING",
                        "RESIZING": "RUNNING", "SUSPENDED": "RUNNING", "STOPPED": "RUNNING",
                        "REQUEUE_HOLD": "PENDING", "REQUEUE_FED": "PENDING", "RESV_DEL_HOLD": "PENDING"}

        def _make_command(self):
            if not self._registered - self._finished:
                return None
            return ["sh", "-c", "echo 'JobID|State|NodeList'; squeue -h --states=all -o '%i|%T|%N'"]

        def read_info(self, string):
            info = super().read_info(string)
            for stats in info.values():
                stats["State"] = self.TRANSITIONAL.get(stats.get("State", ""), stats.get("State", ""))
            return info

    return Watcher(delay_s=delay_s)


def _sacct_works():
    try:
        return subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


class SlurmLauncher:
    def __init__(self, settings, cluster="slurm"):
        if cluster == "slurm" and shutil.which("sbatch") is None:
            raise ConfigError("--launcher slurm: sbatch is not on PATH (no SLURM client here)")
        self.settings, self.cluster = {**DEFAULTS, **settings}, cluster

    def run(self, experiment, runs, progress):
        """Submit `runs` as one job array and wait for them; a job that ends without finishing its run
        (cancelled, failed for good) is reported with its run's state."""
        if not runs:
            return
        # The jobs unpickle RunJob: they must import this project from wherever they start.
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(job.PROJECT), os.environ.get("PYTHONPATH"))))
        executor = executor_for(experiment.folder / "slurm" / "%j", self.settings, self.cluster)
        processes = self.settings["processes_per_node"] or max(1, self.settings["gpus_per_node"] or 1)
        commit = job.project_commit()
        with executor.batch():
            jobs = [executor.submit(RunJob(experiment.config(run), run.path, run.key, commit, processes,
                                           self.settings["nodes"])) for run in runs]
        for run, submitted in zip(runs, jobs):
            progress.started(run)
            _note_job(run.path, submitted.job_id)
        waiting = dict(zip(jobs, runs))
        while waiting:
            for submitted in [j for j in waiting if j.done()]:
                run = waiting.pop(submitted)
                progress.ended(run, job.read_record(run.path) or {"state": job.FAILED, "error": _why(submitted)})
            time.sleep(POLL_S if waiting else 0)


def _note_job(run_dir, job_id):
    record = job.read_record(run_dir)
    if record.get("state") not in (job.RUNNING, job.FINISHED):
        job.write_record(run_dir, {**record, "state": job.RUNNING, "slurm_job": str(job_id),
                                   "host": socket.gethostname()})


def _why(submitted):
    try:
        submitted.result()
    except Exception as err:  # noqa: BLE001  (submitit's own error of a job that left no result)
        return first_line(err)
    return "ended without a record"
