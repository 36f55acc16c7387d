"""Training: `run(cfg, run_dir, resume=None)` trains cfg's model on cfg's data as its trainer section says.

The run folder (RunDir) gets config.yaml, train.log, TensorBoard events, progress.png, checkpoint_latest.pt
and checkpoint_best.pt. Training is counted in iterations (trainer.iters_per_epoch per epoch, cycling the
loader); the learning rate follows a linear warmup then a cosine decay, stepped every iteration. Under
torchrun every process runs the loop on its shard of the data; rank 0 alone logs and writes files.

Trainer.fit is the loop: train_epoch (train_step per batch), finish_epoch (the loss reduced over ranks, the
history), validate, save, log_epoch. StopGuard turns SIGINT, SIGTERM and SIGUSR2 into a stop after the
current step and keeps what was trained when the loop crashes. A resume continues bit-identically: the data
stream is a function of the step count (data/loaders.py) and the checkpoint holds every rank's random
streams (checkpoint.snapshot / restore).
"""
import gc
import logging
import math
import os
import signal
import time
import traceback
import warnings
from pathlib import Path

import torch
from monai.utils import set_determinism
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from config import save_config
from core import distributed
from core.checkpoint import (
    RESUME_KEYS,
    TrainState,
    capture_rng,
    check_resumable,
    load_checkpoint,
    restore,
    save_checkpoint,
    snapshot,
    unwrap_model,
)
from core.errors import DataConfigError, NonFiniteTraining, TrainingInterrupted
from core.fileio import check_writable
from core.rundir import RunDir
from data import class_names, make_eval_loader, make_train_loader
from data.loaders import TrainSampler
from data.preflight import check_datalist
from engine.guard import StopGuard
from engine.inference import SlidingWindow
from engine.monitor import RunLog, file_logged, log_epoch, record_validation, validate
from engine.network import build_network, use_scan_backend
from engine.step import (
    STEP_AMP_OVERFLOW,
    STEP_OK,
    make_loss,
    make_optimizer,
    make_scheduler,
    rebase_schedule,
    train_step,
)

log = logging.getLogger("train")


def run(cfg, run_dir, resume=None):
    """Train; returns {"best_checkpoint", "latest_checkpoint", "best_metric", "best_epoch", "epochs",
    "iterations", "run_dir"}. `resume` is a run folder whose checkpoint_latest.pt is continued up to
    trainer.max_epochs. A refused resume writes nothing; a new run that fails before its first checkpoint
    takes back what it wrote (RunDir.abandon)."""
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    ckpt = _resume_checkpoint(Path(resume), cfg) if resume is not None else None
    new_run = resume is None and os.environ.get("RANK", "0") == "0"
    if new_run:
        run_dir.begin()
    try:
        ctx = distributed.init(cfg["trainer"]["device"])
        try:
            with RunLog(run_dir, ctx.is_main), StopGuard() as guard:
                return Trainer(cfg, run_dir, ctx, ckpt, guard).fit(guard)
        except BaseException as err:
            if ctx.world_size > 1:
                traceback.clear_frames(err.__traceback__)  # they hold the DDP model: see _release_process_group
            raise
        finally:
            _release_process_group(ctx)
    except BaseException:
        if new_run and not run_dir.kept:
            run_dir.abandon()
        raise


def _resume_checkpoint(folder, cfg):
    """The checkpoint a resume continues, checked against cfg before anything is written."""
    path = folder / RunDir.LATEST
    ckpt = load_checkpoint(path, map_location="cpu", required_keys=RESUME_KEYS)
    check_resumable(ckpt, cfg, path)
    return ckpt


def _release_process_group(ctx):
    """Free the DDP model before the process group. DDP's reducer holds the group too, and if the reducer
    dropped the last reference, gloo's destructor would join its worker threads with the GIL held while a
    worker waits for the GIL to free a finished collective's tensors: a hang at exit. Freed through its
    Python handle instead, the group is destroyed without the GIL."""
    if ctx.world_size > 1:
        gc.collect()  # DDP keeps reference cycles
    distributed.cleanup()


class Trainer:
    """One training run: __init__ checks and builds everything (nothing is written before its checks pass),
    fit() runs the loop."""

    def __init__(self, cfg, run_dir, ctx, ckpt, guard):
        t, model_cfg = cfg["trainer"], cfg["model"]
        self.cfg, self.t, self.run_dir, self.ctx = cfg, t, run_dir, ctx
        use_scan_backend(t["scan_backend"])
        set_determinism(seed=t["seed"] + ctx.rank)  # torch, numpy, random; DDP copies rank 0's initial weights
        self.names = class_names(cfg["data"], model_cfg["out_channels"])
        if ctx.is_main:
            check_writable(run_dir.path, what="run folder")
        self.preflight_note = _preflight(cfg, ctx)
        self.model, self.placement_note = _place(build_network(cfg), cfg, ctx)
        if ctx.is_main:  # the latest and best checkpoints plus one being written
            check_writable(run_dir.path, need_bytes=3 * _checkpoint_bytes(self.model), what="run folder")
        self.optimizer = make_optimizer(self.model, t)
        self.scheduler = make_scheduler(self.optimizer, t)
        self.use_amp = bool(t["amp"]) and ctx.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.train_loader = make_train_loader(cfg["data"], model_cfg["out_channels"], model_cfg["roi_size"],
                                              t["batch_size"], t["seed"], ctx.rank, ctx.world_size)
        self.val_loader = make_eval_loader(cfg["data"], model_cfg["out_channels"], "validation")
        self.window = SlidingWindow.from_config(cfg["inference"], model_cfg["roi_size"], t["amp"], validation=True)
        self.state, self.resumed_from = TrainState(), ckpt
        if ckpt is not None:  # last: it restores the random streams the steps below continue
            self.state = restore(ckpt, run_dir.latest, self.model, self.optimizer, self.scheduler, self.scaler,
                                 ctx.rank, ctx.world_size, t["seed"])
            rebase_schedule(self.scheduler, self.optimizer, t["lr"])
        if ctx.world_size > 1:
            self.model = DistributedDataParallel(self.model, device_ids=[ctx.device.index]
                                                 if ctx.device.type == "cuda" else None)
        self.loss_fn = make_loss(t["deep_supervision_weights"])
        self.rng_by_rank = [capture_rng()]  # every rank's streams at the last step boundary
        self.loss_by_rank = None  # every rank's partial epoch loss, gathered for a mid-epoch save
        signum = guard.requested(ctx)
        if signum:  # during the set-up: nothing trained, nothing to save
            raise TrainingInterrupted(f"stopped by {signal.Signals(signum).name} before training started", signum)
        guard.on_crash = self.save_after_crash

    def fit(self, guard):
        if self.ctx.is_main:
            self._log_start()
            save_config(self.cfg, self.run_dir.config)
        writer = SummaryWriter(log_dir=str(self.run_dir.path)) if self.ctx.is_main else None
        batches = _batches(self.train_loader, self.state.iteration)
        bar = tqdm(total=self.t["max_epochs"] * self.t["iters_per_epoch"], initial=self.state.iteration,
                   disable=not self.ctx.is_main, desc="train", dynamic_ncols=True)
        try:
            with logging_redirect_tqdm(loggers=[log]):
                while self.state.epoch < self.t["max_epochs"]:
                    speed, lr = self.train_epoch(batches, bar, guard)
                    epoch_loss = finish_epoch(self.state, self.ctx, lr)
                    result = self.validate_if_due()
                    self.save_epoch_end(result)
                    if self.ctx.is_main:
                        log_epoch(writer, self.run_dir, self.state, epoch_loss, lr, result, self.names, speed,
                                  self.ctx.device)
                    distributed.barrier()
                    signum = guard.requested(self.ctx)  # a signal during validation: the epoch is saved already
                    if signum:
                        raise self._stopped(signum)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        return self._summary()

    def train_epoch(self, batches, bar, guard):
        """The steps left in this epoch (fewer after a mid-epoch stop); returns (steps per second, last lr)."""
        started, stepped = time.time(), 0
        self.model.train()
        lr = self.optimizer.param_groups[0]["lr"]
        for _ in range((self.state.epoch + 1) * self.t["iters_per_epoch"] - self.state.iteration):
            lr = self.optimizer.param_groups[0]["lr"]  # the epoch logs the lr of its last step
            loss, outcome = train_step(self.model, next(batches), self.loss_fn, self.optimizer, self.scaler,
                                       self.t, self.ctx.device, self.use_amp)
            with warnings.catch_warnings():
                # A skipped step still uses up its learning rate (resume counts steps); torch warns when that
                # happens before any optimizer step, which is intended here.
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                self.scheduler.step()
            self.state.iteration += 1
            stepped += 1
            self._count_step(loss.item(), outcome)
            self.rng_by_rank = [capture_rng()]
            bar.update(1)
            bar.set_postfix(epoch=self.state.epoch + 1, loss=f"{loss.item():.4f}")
            signum = guard.requested(self.ctx)
            if signum:
                gathered = distributed.all_gather_object(
                    (self.rng_by_rank[0], [self.state.epoch_loss_sum, self.state.epoch_loss_steps]))
                self.rng_by_rank, self.loss_by_rank = [g[0] for g in gathered], [g[1] for g in gathered]
                if self.ctx.is_main:
                    self.save(self.run_dir.latest)
                raise self._stopped(signum)
        return stepped / max(time.time() - started, 1e-9), lr

    def validate_if_due(self):
        if self.state.epoch % self.t["val_every"] and self.state.epoch != self.t["max_epochs"]:
            return None
        result = validate(self.model, self.val_loader, self.cfg["model"]["out_channels"], self.cfg["data"]["spacing"],
                          self.window, self.ctx)
        record_validation(self.state, result, self.names)
        return result

    def save_epoch_end(self, result):
        self.loss_by_rank = None
        if self.ctx.is_main and result is not None and result["improved"]:
            self.save(self.run_dir.best)
        # After validation, whose loader iterator draws from the torch stream too.
        self.rng_by_rank = distributed.all_gather_object(capture_rng())
        if self.ctx.is_main:
            self.save(self.run_dir.latest)

    def save(self, path):
        """Rank 0: a snapshot of the run at the last step boundary; non-finite weights are never saved."""
        weights = unwrap_model(self.model).state_dict()
        bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise NonFiniteTraining(f"weights are not finite at iteration {self.state.iteration} ({bad[0]}, ...); "
                                    f"not saved. {self._last_good()}")
        losses = self.loss_by_rank or [[self.state.epoch_loss_sum, self.state.epoch_loss_steps]]
        save_checkpoint(path, snapshot(self.model, self.optimizer, self.scheduler, self.scaler, self.state,
                                       self.cfg, self.rng_by_rank, losses))
        if path == self.run_dir.latest:
            self.state.last_saved = (self.state.epoch, self.state.iteration)
            self.run_dir.keep()

    def save_after_crash(self, err):
        """A crash or a second Ctrl-C: keep what was trained. One process saves its last finished step (the
        file is replaced atomically); under torchrun the ranks' states cannot be gathered once one may have
        died, so the last complete checkpoint stays, rather than one holding rank 0's state alone."""
        if not self.ctx.is_main:
            return
        state = self.state
        where = f"training stopped at epoch {state.epoch}, iteration {state.iteration} by {type(err).__name__}"
        if self.ctx.world_size > 1:
            log.error("%s; nothing saved, as a mid-epoch checkpoint needs every process's state and another "
                      "process may have died. %s", where, self._last_good())
            return
        try:
            self.save(self.run_dir.latest)
            log.error("%s; saved %s (resume with: python main.py train --resume %s)", where, self.run_dir.latest,
                      self.run_dir)
        except Exception as save_err:  # report the original error, not this one
            log.error("%s; %s was not saved: %s", where, self.run_dir.latest, save_err)

    def _count_step(self, loss, outcome):
        """Epoch loss over finite steps; skipped steps counted, and too many non-finite ones in a row stop."""
        skipped = self.state.skipped
        if outcome == STEP_OK:
            self.state.epoch_loss_sum += loss
            self.state.epoch_loss_steps += 1
            skipped["nonfinite_in_a_row"] = 0
            return
        if outcome == STEP_AMP_OVERFLOW:
            skipped["amp_overflow"] += 1
            return
        skipped["nonfinite"] += 1
        skipped["nonfinite_in_a_row"] += 1
        limit = self.t["max_nonfinite_steps"]
        if skipped["nonfinite_in_a_row"] >= limit:
            raise file_logged(NonFiniteTraining(
                f"training stopped at iteration {self.state.iteration}: {limit} non-finite steps in a row (loss "
                f"{loss}; trainer.max_nonfinite_steps = {limit}). {self._last_good()} Lower trainer.lr, set "
                "trainer.grad_clip, or check the data"))
        if self.ctx.is_main:
            log.warning("iteration %d: non-finite loss or gradients (loss %s); step skipped (%d in a row, limit %d)",
                        self.state.iteration, loss, skipped["nonfinite_in_a_row"], limit)

    def _stopped(self, signum):
        return file_logged(TrainingInterrupted(
            f"stopped by {signal.Signals(signum).name} at epoch {self.state.epoch}, iteration {self.state.iteration}; "
            f"saved {self.run_dir.latest}; resume with: python main.py train --resume {self.run_dir}", signum))

    def _last_good(self):
        if self.state.last_saved is None:
            return "No checkpoint was saved yet."
        epoch, iteration = self.state.last_saved
        return (f"The last good checkpoint, {self.run_dir.latest} (epoch {epoch}, iteration {iteration}), is left "
                "as it was.")

    def _log_start(self):
        for note in filter(None, (self.preflight_note, self.placement_note)):
            log.info("%s", note)
        if self.resumed_from is not None:
            log.info("resumed %s at epoch %d, iteration %d%s", self.run_dir.latest, self.state.epoch,
                     self.state.iteration, _changed_settings(self.resumed_from["config"], self.cfg))
        log.info("model %s: %.2f M parameters on %s (world size %d, AMP %s)", self.cfg["model"]["name"],
                 sum(p.numel() for p in self.model.parameters()) / 1e6, self.ctx.device, self.ctx.world_size,
                 self.use_amp)

    def _summary(self):
        state, skipped = self.state, self.state.skipped
        log.info("done: %d epochs, %d iterations (%d non-finite and %d AMP-overflow steps skipped); best mean Dice "
                 "%s at epoch %s", state.epoch, state.iteration, skipped["nonfinite"], skipped["amp_overflow"],
                 "n/a" if state.best_metric is None else f"{state.best_metric:.4f}", state.best_epoch)
        best = self.run_dir.best
        return {"best_checkpoint": str(best) if best.is_file() else None,
                "latest_checkpoint": str(self.run_dir.latest), "best_metric": state.best_metric,
                "best_epoch": state.best_epoch, "epochs": state.epoch, "iterations": state.iteration,
                "run_dir": str(self.run_dir)}


def finish_epoch(state, ctx, lr):
    """Close the epoch: its mean loss over every rank's finite steps, recorded in the history; returns it."""
    state.epoch += 1
    sums = distributed.all_reduce_sum(torch.tensor([state.epoch_loss_sum, state.epoch_loss_steps],
                                                   dtype=torch.float64, device=ctx.device))
    epoch_loss = (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")
    state.epoch_loss_sum, state.epoch_loss_steps = 0.0, 0
    state.history["epoch"].append(state.epoch)
    state.history["loss"].append(epoch_loss)
    state.history["lr"].append(lr)
    return epoch_loss


def _batches(loader, iteration):
    """Endless batches from optimizer step `iteration` on. With a TrainSampler the step count alone fixes
    the data pass and the position in it; any other loader is taken to repeat one fixed order."""
    sampler = loader.sampler
    if isinstance(sampler, TrainSampler):
        data_pass, done = divmod(iteration, math.ceil(len(sampler) / loader.batch_size))
        sampler.start(data_pass, done * loader.batch_size)
        while True:
            yield from loader  # each new iterator is the next pass
    skip = iteration % len(loader)
    while True:
        for batch in loader:
            if skip:
                skip -= 1
                continue
            yield batch


# --- setup --------------------------------------------------------------------------------------------


def _preflight(cfg, ctx):
    """Rank 0 checks every training and validation case before the model is built; all ranks raise its
    verdict (so none waits forever at a collective). Returns the line to log."""
    problem, note = None, None
    if ctx.is_main:
        started = time.time()
        try:
            count = check_datalist(cfg["data"], cfg["model"]["in_channels"], cfg["model"]["out_channels"])
            note = f"data pre-flight: {count} cases checked in {time.time() - started:.1f} s"
        except DataConfigError as err:
            problem = str(err)
    problem = distributed.broadcast_object(problem)
    if problem is not None:
        raise DataConfigError(problem)
    return note


def _place(model, cfg, ctx):
    """(the network on the run's device, with synchronised BatchNorm under torchrun on CUDA; a note to log)."""
    note = None
    if ctx.world_size > 1 and cfg["trainer"]["sync_batchnorm"]:
        if ctx.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            note = (f"trainer.sync_batchnorm: SyncBatchNorm runs on CUDA only; on {ctx.device.type} each process "
                    "keeps its own BatchNorm statistics")
    return model.to(ctx.device), note


def _checkpoint_bytes(model):
    """About the size of one checkpoint: the weights plus up to two optimizer moments per parameter."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return 3 * weights + 2**20


def _changed_settings(saved, cfg):
    changed = [f"{s}.{k}: {saved.get(s, {}).get(k)!r} -> {v!r}" for s in ("data", "model", "trainer")
               for k, v in cfg[s].items() if saved.get(s, {}).get(k) != v]
    return f"; changed settings: {'; '.join(changed)}" if changed else ""


if __name__ == "__main__":  # python train.py ... is python main.py train ...
    import runpy
    import sys

    sys.argv = [str(Path(__file__).with_name("main.py")), "train", *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
