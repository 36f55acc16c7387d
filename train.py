"""Training: one loop over iterations with four hooks (train_step, validate, save, log_epoch).

run(cfg, run_dir, resume=None) trains cfg["model"] on cfg["data"] as cfg["trainer"] says and writes the
run folder: config.yaml, train.log, TensorBoard events, progress.png, checkpoint_latest.pt and
checkpoint_best.pt. Training is counted in iterations (trainer.iters_per_epoch per epoch, cycling the
loader) and the learning rate follows a linear warmup then a cosine decay, stepped every iteration.
Under torchrun every process runs this loop on its shard of the data; rank 0 alone logs and writes files.

Faults: SIGINT/SIGTERM stop after the current step and save it; a crash saves the last finished step;
non-finite steps are skipped (trainer.max_nonfinite_steps in a row stop the run, saving nothing). A resume
continues bit-identically: the data stream is a function of the step count (data/loaders.py) and the
checkpoint holds every rank's random streams.
"""
import gc
import logging
import math
import signal
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.utils import set_determinism
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import distributed
import metrics
from checkpoint import (RESUME_KEYS, capture_rng, load_checkpoint, load_model_weights, restore_rng,
                        save_checkpoint, unwrap_model)
from config import RUN_FILES, ConfigError, model_kwargs, save_config
from data import DataConfigError, class_names, make_eval_loader, make_train_loader
from data.loaders import TrainSampler
from data.preflight import check_datalist
from fileio import check_writable
from inference import infer_volume
from models import build_model
from models.selective_scan import set_scan_backend
from reports import plot_progress

log = logging.getLogger("train")

LATEST = "checkpoint_latest.pt"
BEST = "checkpoint_best.pt"


@dataclass
class TrainState:
    """Counters of a run; `epoch` counts completed epochs, `iteration` completed optimizer steps (skipped
    ones included: each consumed its batch and its learning rate step)."""
    epoch: int = 0
    iteration: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    history: dict = field(default_factory=lambda: {"epoch": [], "loss": [], "lr": [], "val_epoch": [],
                                                   "val_dice": [], "val_class_dice": {}})
    epoch_loss_sum: float = 0.0  # over the finite steps of the current epoch so far
    epoch_loss_steps: int = 0
    skipped: dict = field(default_factory=lambda: {"nonfinite": 0, "amp_overflow": 0, "nonfinite_in_a_row": 0})
    last_saved: tuple | None = None  # (epoch, iteration) of the newest checkpoint_latest.pt


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after checkpoint_latest.pt was saved; exit status 128 + signal."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.exit_code = 128 + signum


class NonFiniteTraining(RuntimeError):
    """Too many non-finite steps in a row, or weights that are no longer finite; nothing was saved."""

    exit_code = 1


class _StopSignals:
    """SIGINT and SIGTERM ask the loop to stop after the current step, save and exit; the same signal a
    second time stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.received = 0
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received == signum:
            raise KeyboardInterrupt
        self.received = max(self.received, signum)

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


def run(cfg, run_dir, resume=None):
    """Train; returns {"best_checkpoint", "latest_checkpoint", "best_metric", "best_epoch", "epochs",
    "iterations", "run_dir"}. `resume` is a run folder whose checkpoint_latest.pt is continued up to
    trainer.max_epochs. A new run that fails before its first checkpoint leaves no run folder behind."""
    run_dir = Path(run_dir)
    try:
        ctx = distributed.init(cfg["trainer"]["device"])
    except BaseException:
        if resume is None and distributed.rank() == 0:
            _discard_unstarted_run(run_dir)
        raise
    handlers = _setup_logging(run_dir, ctx.is_main)
    finished = False
    try:
        with _StopSignals() as stop:
            result = _train(cfg, run_dir, resume, ctx, stop)
        finished = True
        return result
    except BaseException as err:
        if ctx.world_size > 1:
            traceback.clear_frames(err.__traceback__)  # they hold the DDP model: see _release_process_group
        raise
    finally:
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()
        _release_process_group(ctx)
        if not finished and resume is None and ctx.is_main:
            _discard_unstarted_run(run_dir)


def _release_process_group(ctx):
    """Free the DDP model before the process group. DDP's reducer holds the group too, and if the reducer
    dropped the last reference, gloo's destructor would join its worker threads with the GIL held while a
    worker waits for the GIL to free a finished collective's tensors: a hang at exit (seen when one rank was
    stopped by SIGTERM). Freed through its Python handle instead, the group is destroyed without the GIL."""
    if ctx.world_size > 1:
        gc.collect()  # DDP keeps reference cycles
    distributed.cleanup()


def _train(cfg, run_dir, resume, ctx, stop):
    t = cfg["trainer"]
    _check_trainer_config(cfg)
    try:
        set_scan_backend(t["scan_backend"])
    except ValueError as err:
        raise ConfigError(f"trainer.scan_backend: {err}") from None
    set_determinism(seed=t["seed"] + ctx.rank)  # torch, numpy, random; DDP copies rank 0's initial weights
    names = class_names(cfg)  # checks that the data set has model.out_channels classes
    if ctx.is_main:
        check_writable(run_dir, what="run folder")
    _preflight(cfg, ctx)
    if ctx.is_main:
        save_config(cfg, run_dir / "config.yaml")

    model = _build_model(cfg, ctx)
    if ctx.is_main:  # the latest and best checkpoints plus one being written
        check_writable(run_dir, need_bytes=3 * _checkpoint_bytes(model), what="run folder")
    optimizer = make_optimizer(model, t)
    scheduler = make_scheduler(optimizer, t)
    use_amp = bool(t["amp"]) and ctx.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    train_loader = make_train_loader(cfg, ctx.rank, ctx.world_size)
    val_loader = make_eval_loader(cfg, "validation")
    state = TrainState()
    if resume is not None:  # last: it restores the random streams the steps below continue
        state = _resume(Path(resume), cfg, model, optimizer, scheduler, scaler, ctx)
    if ctx.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    log.info("model %s: %.2f M parameters on %s (world size %d, AMP %s)", cfg["model"]["name"],
             sum(p.numel() for p in model.parameters()) / 1e6, ctx.device, ctx.world_size, use_amp)

    # No numerator smoothing, as in the reference: a class absent from a crop then adds a constant to
    # the Dice loss instead of pushing its prediction to zero everywhere (which stalls small organs).
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
    loss_fn = DeepSupervisionLoss(dice_ce, t["deep_supervision_weights"])
    signum = _stop_requested(stop, ctx)
    if signum:  # during the set-up: nothing trained, nothing to save
        raise TrainingInterrupted(f"stopped by {signal.Signals(signum).name} before training started", signum)
    writer = SummaryWriter(log_dir=str(run_dir)) if ctx.is_main else None
    batches = _batches(train_loader, state.iteration)
    total = t["max_epochs"] * t["iters_per_epoch"]
    bar = tqdm(total=total, initial=state.iteration, disable=not ctx.is_main, desc="train", dynamic_ncols=True)
    # The random streams at the last step boundary, of every rank: what a checkpoint taken between steps holds.
    boundary_rng = [capture_rng()]
    epoch_losses = None  # every rank's partial epoch loss [sum, steps], gathered for a mid-epoch save
    lr = optimizer.param_groups[0]["lr"]

    def snapshot():
        weights = unwrap_model(model).state_dict()
        bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise NonFiniteTraining(f"weights are not finite at iteration {state.iteration} ({bad[0]}, ...); "
                                    f"not saved. {_last_good(run_dir, state)}")
        return {"state_dict": weights, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": state.epoch,
                "iteration": state.iteration, "best_metric": state.best_metric, "best_epoch": state.best_epoch,
                "rng": boundary_rng[0], "rng_by_rank": boundary_rng, "config": cfg, "history": state.history,
                "epoch_loss_by_rank": epoch_losses or [[state.epoch_loss_sum, state.epoch_loss_steps]],
                "skipped": dict(state.skipped)}

    def save_latest():
        save_checkpoint(run_dir / LATEST, snapshot())
        state.last_saved = (state.epoch, state.iteration)

    try:
        with logging_redirect_tqdm(loggers=[log]):
            while state.epoch < t["max_epochs"]:
                started, stepped = time.time(), 0
                model.train()
                steps = (state.epoch + 1) * t["iters_per_epoch"] - state.iteration  # fewer after a mid-epoch stop
                for _ in range(steps):
                    batch = next(batches)
                    lr = optimizer.param_groups[0]["lr"]  # the epoch logs the lr of its last step
                    loss, outcome = train_step(model, batch, loss_fn, optimizer, scaler, t, ctx.device, use_amp)
                    with warnings.catch_warnings():
                        # A skipped step still uses up its learning rate (resume counts steps); torch warns
                        # when that happens before any optimizer step, which is intended here.
                        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                        scheduler.step()
                    state.iteration += 1
                    stepped += 1
                    _count_step(state, loss.item(), outcome, t, ctx, run_dir)
                    boundary_rng = [capture_rng()]
                    bar.update(1)
                    bar.set_postfix(epoch=state.epoch + 1, loss=f"{loss.item():.4f}")
                    signum = _stop_requested(stop, ctx)
                    if signum:
                        gathered = distributed.all_gather_object(
                            (boundary_rng[0], [state.epoch_loss_sum, state.epoch_loss_steps]))
                        boundary_rng, epoch_losses = [g[0] for g in gathered], [g[1] for g in gathered]
                        if ctx.is_main:
                            save_latest()
                        raise TrainingInterrupted(_stopped_message(signum, state, run_dir), signum)
                speed = stepped / max(time.time() - started, 1e-9)
                state.epoch += 1
                sums = distributed.all_reduce_sum(torch.tensor([state.epoch_loss_sum, state.epoch_loss_steps],
                                                                dtype=torch.float64, device=ctx.device))
                epoch_loss = (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")
                state.epoch_loss_sum, state.epoch_loss_steps = 0.0, 0
                state.history["epoch"].append(state.epoch)
                state.history["loss"].append(epoch_loss)
                state.history["lr"].append(lr)
                result = None
                if state.epoch % t["val_every"] == 0 or state.epoch == t["max_epochs"]:
                    result = validate(model, val_loader, cfg, ctx)
                    _record_validation(state, result, names)
                    if ctx.is_main and result["improved"]:
                        save_checkpoint(run_dir / BEST, snapshot())
                # After validation, whose loader iterator draws from the torch stream too.
                boundary_rng = distributed.all_gather_object(capture_rng())
                if ctx.is_main:
                    save_latest()
                    log_epoch(writer, run_dir, state, epoch_loss, lr, result, names, speed, ctx.device)
                distributed.barrier()
                signum = _stop_requested(stop, ctx)  # a signal during validation: the epoch is saved already
                if signum:
                    raise TrainingInterrupted(_stopped_message(signum, state, run_dir), signum)
    except (TrainingInterrupted, NonFiniteTraining) as err:
        if ctx.is_main:
            log.error("%s", err)
        raise
    except BaseException as err:
        # A crash or a second Ctrl-C: keep what was trained, as of the last step boundary (the file is
        # replaced atomically, never half-written).
        if ctx.is_main:
            try:
                save_latest()
                log.error("training stopped at epoch %d, iteration %d by %s; saved %s (resume with: "
                          "python main.py train --resume %s)", state.epoch, state.iteration,
                          type(err).__name__, run_dir / LATEST, run_dir)
            except Exception as save_err:  # report the original error, not this one
                log.error("training stopped at epoch %d, iteration %d by %s; %s was not saved: %s",
                          state.epoch, state.iteration, type(err).__name__, run_dir / LATEST, save_err)
        raise
    finally:
        bar.close()
        if writer is not None:
            writer.close()

    best = run_dir / BEST
    skipped = state.skipped
    log.info("done: %d epochs, %d iterations (%d non-finite and %d AMP-overflow steps skipped); best mean Dice %s "
             "at epoch %s", state.epoch, state.iteration, skipped["nonfinite"], skipped["amp_overflow"],
             "n/a" if state.best_metric is None else f"{state.best_metric:.4f}", state.best_epoch)
    return {"best_checkpoint": str(best) if best.is_file() else None, "latest_checkpoint": str(run_dir / LATEST),
            "best_metric": state.best_metric, "best_epoch": state.best_epoch, "epochs": state.epoch,
            "iterations": state.iteration, "run_dir": str(run_dir)}


def _stop_requested(stop, ctx):
    """The signal number any rank received (0: none); every rank gets the same answer, so all stop together."""
    if ctx.world_size == 1:
        return stop.received
    return int(distributed.all_reduce_max(torch.tensor(stop.received, device=ctx.device)).item())


def _stopped_message(signum, state, run_dir):
    return (f"stopped by {signal.Signals(signum).name} at epoch {state.epoch}, iteration {state.iteration}; "
            f"saved {run_dir / LATEST}; resume with: python main.py train --resume {run_dir}")


def _last_good(run_dir, state):
    if state.last_saved is None:
        return "No checkpoint was saved yet."
    epoch, iteration = state.last_saved
    return f"The last good checkpoint, {run_dir / LATEST} (epoch {epoch}, iteration {iteration}), is left as it was."


def _count_step(state, loss, outcome, t, ctx, run_dir):
    """Epoch loss over finite steps; skipped steps counted, and too many non-finite ones in a row stop the run."""
    skipped = state.skipped
    if outcome == STEP_OK:
        state.epoch_loss_sum += loss
        state.epoch_loss_steps += 1
        skipped["nonfinite_in_a_row"] = 0
        return
    if outcome == STEP_AMP_OVERFLOW:
        skipped["amp_overflow"] += 1
        return
    skipped["nonfinite"] += 1
    skipped["nonfinite_in_a_row"] += 1
    limit = t["max_nonfinite_steps"]
    if skipped["nonfinite_in_a_row"] >= limit:
        raise NonFiniteTraining(
            f"training stopped at iteration {state.iteration}: {limit} non-finite steps in a row (loss {loss}; "
            f"trainer.max_nonfinite_steps = {limit}). {_last_good(run_dir, state)} Lower trainer.lr, set "
            "trainer.grad_clip, or check the data")
    if ctx.is_main:
        log.warning("iteration %d: non-finite loss or gradients (loss %s); step skipped (%d in a row, limit %d)",
                    state.iteration, loss, skipped["nonfinite_in_a_row"], limit)


# --- building blocks ----------------------------------------------------------------------------------


def make_optimizer(model, t):
    if t["optimizer"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t["lr"], momentum=t["momentum"], nesterov=t["nesterov"],
                               weight_decay=t["weight_decay"])
    return torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])


def lr_factor(iteration, warmup, total):
    """Multiplier of the base learning rate for optimizer step `iteration` (0-based): linear warmup over
    `warmup` steps reaching 1 at the last one, then half a cosine period down to 0 at `total`."""
    if iteration < warmup:
        return (iteration + 1) / warmup
    progress = min((iteration - warmup) / max(total - warmup, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer, t):
    # A closure rather than monai's WarmupCosineSchedule: that one stores t_total in its state_dict,
    # so a resume with a raised max_epochs would keep following the old, shorter schedule.
    warmup = t["warmup_epochs"] * t["iters_per_epoch"]
    total = t["max_epochs"] * t["iters_per_epoch"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, warmup, total))


class DeepSupervisionLoss(torch.nn.Module):
    """Weighted sum of `loss` over the model's outputs [main, aux1, aux2, ...], weights normalised to 1.

    Auxiliary logits are upsampled trilinearly to the label size, as the reference does (monai's
    DeepSupervisionLoss instead downsamples the labels). A single tensor output gets `loss` alone.
    """

    def __init__(self, loss, weights):
        super().__init__()
        self.loss = loss
        self.weights = [float(w) for w in weights]

    def forward(self, outputs, label):
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, label)
        if len(outputs) > len(self.weights):
            raise ConfigError(f"the model returned {len(outputs)} outputs but trainer.deep_supervision_weights "
                              f"has only {len(self.weights)} weights")
        weights = self.weights[:len(outputs)]
        total = 0.0
        for w, out in zip(weights, outputs):
            if out.shape[2:] != label.shape[2:]:
                out = F.interpolate(out, size=label.shape[2:], mode="trilinear", align_corners=False)
            total = total + w * self.loss(out, label)
        return total / sum(weights)


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


def _main_output(out):
    return out[0] if isinstance(out, (list, tuple)) else out


# --- hooks --------------------------------------------------------------------------------------------

STEP_OK, STEP_NONFINITE, STEP_AMP_OVERFLOW = "ok", "nonfinite", "amp_overflow"


def train_step(model, batch, loss_fn, optimizer, scaler, t, device, use_amp):
    """One optimizer step; returns (detached loss, outcome). The outcome is STEP_OK; STEP_NONFINITE when the
    loss or the gradients are not finite on any rank (nothing changes: no update, BatchNorm statistics put
    back); or STEP_AMP_OVERFLOW when AMP's scaler skipped a float16 overflow and lowered its scale."""
    image = batch["image"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    buffers = [b.detach().clone() for b in model.buffers()]  # a NaN forward would poison running statistics
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
        outputs = model(image)
    # The loss in float32: DiceCE sums over all voxels of the crops, which can overflow float16.
    if isinstance(outputs, (list, tuple)):
        outputs = [o.float() for o in outputs]
    else:
        outputs = outputs.float()
    loss = loss_fn(outputs, label)
    # Backward even for a bad loss: under DDP every rank must join the gradient all-reduce.
    scaler.scale(loss).backward()
    loss_finite = distributed.all_reduce_max((~torch.isfinite(loss.detach())).int()).item() == 0
    scaler.unscale_(optimizer)  # a no-op without AMP
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    grads_finite = bool(torch.isfinite(norm))
    if loss_finite and grads_finite and t["grad_clip"] is not None:
        torch.nn.utils.clip_grads_with_norm_(params, t["grad_clip"], norm)
    if loss_finite and (grads_finite or use_amp):
        scale = scaler.get_scale() if use_amp else 1.0
        scaler.step(optimizer)  # the scaler skips the update when it found inf/NaN gradients
        scaler.update()
        if grads_finite:
            return loss.detach(), STEP_OK
        if scale >= 1.0:  # below a scale of 1, float16 overflow no longer explains it
            return loss.detach(), STEP_AMP_OVERFLOW
    elif use_amp:
        scaler.update()  # closes this step's unscale_; the scale is lowered, as for an overflow
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), buffers):
            buffer.copy_(saved)
    return loss.detach(), STEP_NONFINITE


@torch.no_grad()
def validate(model, loader, cfg, ctx):
    """Dice and HD95 per foreground class over the validation cases, scored as `test` scores them
    (inference.infer_volume, then metrics.per_class_metrics with its empty-mask rule), but in the
    preprocessed space at data.spacing, without resampling back to each file's grid: cheaper, and
    close to the test numbers. No mirroring (8x the cost). Cases are split across ranks; the sums are reduced.

    Returns {"mean_dice" (over foreground classes: the best-checkpoint metric), "class_dice",
    "mean_hd95", "class_hd95" (mm)}, per class the mean over the validation cases.
    """
    net = unwrap_model(model)  # no DDP forward: ranks see different numbers of cases
    net.eval()
    n_classes = cfg["model"]["out_channels"]
    sums = torch.zeros(2, n_classes - 1, dtype=torch.float64)  # rows: Dice, HD95
    cases = torch.zeros((), dtype=torch.float64)
    for index, batch in enumerate(loader):
        if index % ctx.world_size != ctx.rank:
            continue
        probs = infer_volume(lambda x: _main_output(net(x)), batch["image"].to(ctx.device), cfg,
                             overlap=cfg["inference"]["val_overlap"], mirror=False)
        pred = probs.argmax(dim=1)[0].cpu().numpy()
        gt = np.asarray(batch["label"][0, 0].detach().cpu())
        scores = metrics.per_class_metrics(pred, gt, n_classes, cfg["data"]["spacing"])
        sums += torch.tensor([[scores[c][key] for c in range(1, n_classes)] for key in ("dice", "hd95")],
                             dtype=torch.float64)
        cases += 1
    sums = distributed.all_reduce_sum(sums.to(ctx.device)).cpu()
    cases = distributed.all_reduce_sum(cases.to(ctx.device)).cpu()
    class_dice, class_hd95 = sums / cases  # nan only without any validation case
    return {"mean_dice": class_dice.mean().item(), "class_dice": class_dice.tolist(),
            "mean_hd95": class_hd95.mean().item(), "class_hd95": class_hd95.tolist()}


def _record_validation(state, result, names):
    h = state.history
    h["val_epoch"].append(state.epoch)
    h["val_dice"].append(result["mean_dice"])
    for name, value in zip(names[1:], result["class_dice"]):
        h["val_class_dice"].setdefault(name, []).append(value)
    result["improved"] = not math.isnan(result["mean_dice"]) and (
        state.best_metric is None or result["mean_dice"] > state.best_metric)
    if result["improved"]:
        state.best_metric, state.best_epoch = result["mean_dice"], state.epoch


def log_epoch(writer, run_dir, state, loss, lr, result, names, speed, device):
    """Rank 0: the log line, TensorBoard scalars and progress.png."""
    memory = ""
    if device.type == "cuda":
        memory = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    log.info("epoch %d: loss %.4f, lr %.3g, %.2f it/s%s", state.epoch, loss, lr, speed, memory)
    writer.add_scalar("train/loss", loss, state.epoch)
    writer.add_scalar("train/lr", lr, state.epoch)
    if result is not None:
        per_class = ", ".join(f"{n} {d:.4f}" for n, d in zip(names[1:], result["class_dice"]))
        log.info("epoch %d: validation mean Dice %.4f%s (best %.4f at epoch %s), mean HD95 %.2f mm | %s",
                 state.epoch, result["mean_dice"], ", new best" if result["improved"] else "",
                 state.best_metric if state.best_metric is not None else float("nan"), state.best_epoch,
                 result["mean_hd95"], per_class)
        writer.add_scalar("val/mean_dice", result["mean_dice"], state.epoch)
        writer.add_scalar("val/mean_hd95", result["mean_hd95"], state.epoch)
        for name, dice, hd95 in zip(names[1:], result["class_dice"], result["class_hd95"]):
            writer.add_scalar(f"val/dice_{name}", dice, state.epoch)
            writer.add_scalar(f"val/hd95_{name}", hd95, state.epoch)
    writer.flush()
    plot_progress(state.history, run_dir / "progress.png")


# --- setup --------------------------------------------------------------------------------------------


def _check_trainer_config(cfg):
    """Value checks beyond the types config.py enforces."""
    t = cfg["trainer"]
    if t["optimizer"] not in ("adamw", "sgd"):
        raise ConfigError(f"trainer.optimizer = {t['optimizer']!r}; choose adamw or sgd")
    for key in ("max_epochs", "iters_per_epoch", "val_every", "batch_size", "max_nonfinite_steps"):
        if t[key] < 1:
            raise ConfigError(f"trainer.{key} = {t[key]}; it must be at least 1")
    if t["warmup_epochs"] < 0 or t["warmup_epochs"] > t["max_epochs"]:
        raise ConfigError(f"trainer.warmup_epochs = {t['warmup_epochs']}; it must be in 0..max_epochs "
                          f"({t['max_epochs']})")
    if t["lr"] <= 0:
        raise ConfigError(f"trainer.lr = {t['lr']}; it must be positive")
    w = t["deep_supervision_weights"]
    if not w or any(x < 0 for x in w) or sum(w) <= 0:
        raise ConfigError(f"trainer.deep_supervision_weights = {w}; give non-negative weights with a positive sum")
    clip = t["grad_clip"]
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip <= 0):
        raise ConfigError(f"trainer.grad_clip = {clip!r}; give a positive number or null")


def _preflight(cfg, ctx):
    """Rank 0 checks every training and validation case before the model is built; all ranks raise its
    verdict (so none waits forever at a collective)."""
    problem = None
    if ctx.is_main:
        started = time.time()
        try:
            count = check_datalist(cfg)
            log.info("data pre-flight: %d cases checked in %.1f s", count, time.time() - started)
        except DataConfigError as err:
            problem = str(err)
    problem = distributed.broadcast_object(problem)
    if problem is not None:
        raise DataConfigError(problem)


def _build_model(cfg, ctx):
    """The configured network on the device; a value the builder rejects is a ConfigError naming the model."""
    name = cfg["model"]["name"]
    try:
        model = build_model(name, **model_kwargs(cfg))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model {name!r} cannot be built from the model section: {err}") from None
    if ctx.world_size > 1 and cfg["trainer"]["sync_batchnorm"]:
        if ctx.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif ctx.is_main and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            log.info("trainer.sync_batchnorm: SyncBatchNorm runs on CUDA only; on %s each process keeps its own "
                     "BatchNorm statistics", ctx.device.type)
    return model.to(ctx.device)


def _checkpoint_bytes(model):
    """About the size of one checkpoint: the weights plus up to two optimizer moments per parameter."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return 3 * weights + 2**20


def _discard_unstarted_run(run_dir):
    """A new run that failed before its first checkpoint: remove the files it wrote, and its folder if
    that is then empty (a --logdir holding other files keeps them)."""
    if any((run_dir / name).exists() for name in (LATEST, BEST)):
        return
    for pattern in RUN_FILES:
        for path in run_dir.glob(pattern):
            path.unlink(missing_ok=True)
    try:
        run_dir.rmdir()
    except OSError:
        pass


def _setup_logging(run_dir, is_main):
    """train.log in the run folder plus the console, rank 0 only; other ranks print warnings."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers = [logging.StreamHandler()]
    if is_main:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for handler in handlers:
        handler.setFormatter(fmt)
        log.addHandler(handler)
    return handlers


def _resume(resume_dir, cfg, model, optimizer, scheduler, scaler, ctx):
    """Restore everything from resume_dir/checkpoint_latest.pt; the schedule follows the current config."""
    path = resume_dir / LATEST
    ckpt = load_checkpoint(path, map_location="cpu", required_keys=RESUME_KEYS)
    t = cfg["trainer"]
    saved_ipe = ckpt["config"]["trainer"]["iters_per_epoch"]
    if saved_ipe != t["iters_per_epoch"]:  # epochs are counted in iterations: the counters would disagree
        raise ConfigError(f"--resume {resume_dir}: trainer.iters_per_epoch was {saved_ipe}; it cannot change "
                          f"on resume (got {t['iters_per_epoch']})")
    load_model_weights(model, ckpt, path)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)  # the lambda of this config, not the saved one
    scheduler.base_lrs = [t["lr"]] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"], group["lr"] = t["lr"], t["lr"] * factor
    if scaler.is_enabled() and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    rngs, losses = ckpt.get("rng_by_rank") or [], ckpt.get("epoch_loss_by_rank") or []
    if len(rngs) == ctx.world_size:
        restore_rng(rngs[ctx.rank])
    elif ctx.is_main:
        restore_rng(ckpt["rng"])
    else:  # saved with another world size (or by a crash handler, rank 0 alone): do not replay rank 0's streams
        set_determinism(seed=t["seed"] + ctx.rank + ckpt["iteration"])
    loss_sum, loss_steps = losses[ctx.rank] if len(losses) == ctx.world_size else (
        losses[0] if losses and ctx.is_main else (0.0, 0))
    changed = [f"{s}.{k}: {ckpt['config'].get(s, {}).get(k)!r} -> {v!r}" for s in ("data", "model", "trainer")
               for k, v in cfg[s].items() if ckpt["config"].get(s, {}).get(k) != v]
    log.info("resumed %s at epoch %d, iteration %d%s", path, ckpt["epoch"], ckpt["iteration"],
             f"; changed settings: {'; '.join(changed)}" if changed else "")
    state = TrainState(epoch=ckpt["epoch"], iteration=ckpt["iteration"], best_metric=ckpt["best_metric"],
                       best_epoch=ckpt.get("best_epoch"), history=ckpt["history"],
                       epoch_loss_sum=loss_sum, epoch_loss_steps=loss_steps,
                       last_saved=(ckpt["epoch"], ckpt["iteration"]))
    state.skipped.update(ckpt.get("skipped", {}))
    return state


if __name__ == "__main__":
    import sys

    import main

    main.cli(sys.argv[1:], default_command="train")
