"""Training: one loop over iterations with four hooks (train_step, validate, save, log_epoch).

run(cfg, run_dir, resume=None) trains cfg["model"] on cfg["data"] as cfg["trainer"] says and writes the
run folder: config.yaml, train.log, TensorBoard events, progress.png, checkpoint_latest.pt and
checkpoint_best.pt. Training is counted in iterations (trainer.iters_per_epoch per epoch, cycling the
loader) and the learning rate follows a linear warmup then a cosine decay, stepped every iteration.
Under torchrun every process runs this loop on its shard of the data; rank 0 alone logs and writes files.
"""
import logging
import math
import time
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
from config import ConfigError, model_kwargs, save_config
from data import class_names, make_eval_loader, make_train_loader
from inference import infer_volume
from models import build_model
from models.selective_scan import set_scan_backend
from reports import plot_progress

log = logging.getLogger("train")

LATEST = "checkpoint_latest.pt"
BEST = "checkpoint_best.pt"


@dataclass
class TrainState:
    """Counters of a run; `epoch` counts completed epochs, `iteration` completed optimizer steps."""
    epoch: int = 0
    iteration: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    history: dict = field(default_factory=lambda: {"epoch": [], "loss": [], "lr": [], "val_epoch": [],
                                                   "val_dice": [], "val_class_dice": {}})


def run(cfg, run_dir, resume=None):
    """Train; returns {"best_checkpoint", "latest_checkpoint", "best_metric", "best_epoch", "epochs",
    "iterations", "run_dir"}. `resume` is a run folder whose checkpoint_latest.pt is continued up to
    trainer.max_epochs."""
    run_dir = Path(run_dir)
    ctx = distributed.init(cfg["trainer"]["device"])
    handlers = _setup_logging(run_dir, ctx.is_main)
    try:
        return _train(cfg, run_dir, resume, ctx)
    finally:
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()
        distributed.cleanup()


def _train(cfg, run_dir, resume, ctx):
    t = cfg["trainer"]
    _check_trainer_config(cfg)
    set_scan_backend(t["scan_backend"])
    set_determinism(seed=t["seed"] + ctx.rank)  # torch, numpy, random; ranks differ in augmentation; DDP copies rank 0's initial weights
    if ctx.is_main:
        save_config(cfg, run_dir / "config.yaml")
    names = class_names(cfg)  # checks that the data set has model.out_channels classes

    model = build_model(cfg["model"]["name"], **model_kwargs(cfg)).to(ctx.device)
    optimizer = make_optimizer(model, t)
    scheduler = make_scheduler(optimizer, t)
    use_amp = bool(t["amp"]) and ctx.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    state = TrainState()
    if resume is not None:
        state = _resume(Path(resume), cfg, model, optimizer, scheduler, scaler, ctx)
    if ctx.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    log.info("model %s: %.2f M parameters on %s (world size %d, AMP %s)", cfg["model"]["name"],
             sum(p.numel() for p in model.parameters()) / 1e6, ctx.device, ctx.world_size, use_amp)

    train_loader = make_train_loader(cfg, ctx.rank, ctx.world_size)
    val_loader = make_eval_loader(cfg, "validation")
    # No numerator smoothing, as in the reference: a class absent from a crop then adds a constant to
    # the Dice loss instead of pushing its prediction to zero everywhere (which stalls small organs).
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
    loss_fn = DeepSupervisionLoss(dice_ce, t["deep_supervision_weights"])
    writer = SummaryWriter(log_dir=str(run_dir)) if ctx.is_main else None
    batches = _cycle(train_loader, first_pass=state.iteration // max(len(train_loader), 1))
    total = t["max_epochs"] * t["iters_per_epoch"]
    bar = tqdm(total=total, initial=state.iteration, disable=not ctx.is_main, desc="train", dynamic_ncols=True)

    def snapshot():
        return {"state_dict": unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": state.epoch,
                "iteration": state.iteration, "best_metric": state.best_metric, "best_epoch": state.best_epoch,
                "rng": capture_rng(), "config": cfg, "history": state.history}

    try:
        with logging_redirect_tqdm(loggers=[log]):
            while state.epoch < t["max_epochs"]:
                started = time.time()
                model.train()
                loss_sum = torch.zeros((), device=ctx.device)
                steps = (state.epoch + 1) * t["iters_per_epoch"] - state.iteration  # fewer after a mid-epoch crash
                for _ in range(steps):
                    batch = next(batches)
                    lr = optimizer.param_groups[0]["lr"]  # the epoch logs the lr of its last step
                    loss = train_step(model, batch, loss_fn, optimizer, scaler, t, ctx.device, use_amp)
                    scheduler.step()
                    state.iteration += 1
                    loss_sum += loss
                    bar.update(1)
                    bar.set_postfix(epoch=state.epoch + 1, loss=f"{loss.item():.4f}")
                speed = steps / (time.time() - started)
                state.epoch += 1
                epoch_loss = distributed.all_reduce_mean(loss_sum / steps).item()
                state.history["epoch"].append(state.epoch)
                state.history["loss"].append(epoch_loss)
                state.history["lr"].append(lr)
                result = None
                if state.epoch % t["val_every"] == 0 or state.epoch == t["max_epochs"]:
                    result = validate(model, val_loader, cfg, ctx)
                    _record_validation(state, result, names)
                    if ctx.is_main and result["improved"]:
                        save_checkpoint(run_dir / BEST, snapshot())
                if ctx.is_main:
                    save_checkpoint(run_dir / LATEST, snapshot())
                    log_epoch(writer, run_dir, state, epoch_loss, lr, result, names, speed, ctx.device)
                distributed.barrier()
    except BaseException:
        # Ctrl-C or a crash: keep what was trained (the file is replaced atomically, never half-written).
        if ctx.is_main:
            try:
                save_checkpoint(run_dir / LATEST, snapshot())
                log.error("training stopped at epoch %d, iteration %d; saved %s (resume with --resume %s)",
                          state.epoch, state.iteration, run_dir / LATEST, run_dir)
            except Exception as err:  # report the original error, not this one
                log.error("training stopped at epoch %d, iteration %d; saving %s failed too: %s",
                          state.epoch, state.iteration, run_dir / LATEST, err)
        raise
    finally:
        bar.close()
        if writer is not None:
            writer.close()

    best = run_dir / BEST
    log.info("done: %d epochs, %d iterations; best mean Dice %s at epoch %s", state.epoch, state.iteration,
             "n/a" if state.best_metric is None else f"{state.best_metric:.4f}", state.best_epoch)
    return {"best_checkpoint": str(best) if best.is_file() else None, "latest_checkpoint": str(run_dir / LATEST),
            "best_metric": state.best_metric, "best_epoch": state.best_epoch, "epochs": state.epoch,
            "iterations": state.iteration, "run_dir": str(run_dir)}


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


def _cycle(loader, first_pass=0):
    """Endless batches: iteration-counted epochs do not depend on the loader's length."""
    n = first_pass
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(n)  # DistributedSampler: a new shuffle each pass
        yield from loader
        n += 1


def _main_output(out):
    return out[0] if isinstance(out, (list, tuple)) else out


# --- hooks --------------------------------------------------------------------------------------------


def train_step(model, batch, loss_fn, optimizer, scaler, t, device, use_amp):
    """One optimizer step; returns the (detached) loss."""
    image = batch["image"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
        outputs = model(image)
    # The loss in float32: DiceCE sums over all voxels of the crops, which can overflow float16.
    if isinstance(outputs, (list, tuple)):
        outputs = [o.float() for o in outputs]
    else:
        outputs = outputs.float()
    loss = loss_fn(outputs, label)
    if not use_amp and not torch.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss.item()}; lower trainer.lr or check the data")
    scaler.scale(loss).backward()
    if t["grad_clip"] is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


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
        log.info("epoch %d: validation mean Dice %.4f%s (best %.4f at epoch %s) | %s", state.epoch,
                 result["mean_dice"], ", new best" if result["improved"] else "",
                 state.best_metric if state.best_metric is not None else float("nan"), state.best_epoch, per_class)
        writer.add_scalar("val/mean_dice", result["mean_dice"], state.epoch)
        for name, value in zip(names[1:], result["class_dice"]):
            writer.add_scalar(f"val/dice_{name}", value, state.epoch)
    writer.flush()
    plot_progress(state.history, run_dir / "progress.png")


# --- setup --------------------------------------------------------------------------------------------


def _check_trainer_config(cfg):
    """Value checks beyond the types config.py enforces."""
    t = cfg["trainer"]
    if t["optimizer"] not in ("adamw", "sgd"):
        raise ConfigError(f"trainer.optimizer = {t['optimizer']!r}; choose adamw or sgd")
    for key in ("max_epochs", "iters_per_epoch", "val_every", "batch_size"):
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
    if ctx.is_main:
        restore_rng(ckpt["rng"])
    else:
        set_determinism(seed=t["seed"] + ctx.rank + ckpt["iteration"])  # only rank 0's streams are saved; do not replay ours
    changed = [f"{s}.{k}: {ckpt['config'].get(s, {}).get(k)!r} -> {v!r}" for s in ("data", "model", "trainer")
               for k, v in cfg[s].items() if ckpt["config"].get(s, {}).get(k) != v]
    log.info("resumed %s at epoch %d, iteration %d%s", path, ckpt["epoch"], ckpt["iteration"],
             f"; changed settings: {'; '.join(changed)}" if changed else "")
    return TrainState(epoch=ckpt["epoch"], iteration=ckpt["iteration"], best_metric=ckpt["best_metric"],
                      best_epoch=ckpt.get("best_epoch"), history=ckpt["history"])


if __name__ == "__main__":
    import sys

    import main

    main.cli(sys.argv[1:], default_command="train")
