"""What a training run reports: validation scores (scored as `test` scores them), the log (train.log and
the console), TensorBoard scalars and progress.png."""
import logging
import math

import numpy as np
import torch

import metrics
from core import distributed
from core.checkpoint import unwrap_model
from engine.inference import infer_volume
from reports import plot_progress

log = logging.getLogger("train")


@torch.no_grad()
def validate(model, loader, num_classes, spacing, window, ctx):
    """Dice and HD95 per foreground class over the validation cases, scored as `test` scores them
    (inference.infer_volume, then metrics.per_class_metrics with its empty-mask rule), but in the
    preprocessed space at data.spacing (`spacing`), without resampling back to each file's grid: cheaper,
    and close to the test numbers. Cases are split across ranks; the sums are reduced.

    Returns {"mean_dice" (over foreground classes: the best-checkpoint metric), "class_dice",
    "mean_hd95", "class_hd95" (mm)}, per class the mean over the validation cases.
    """
    net = unwrap_model(model)  # no DDP forward: ranks see different numbers of cases
    net.eval()
    sums = torch.zeros(2, num_classes - 1, dtype=torch.float64)  # rows: Dice, HD95
    cases = torch.zeros((), dtype=torch.float64)
    for index, batch in enumerate(loader):
        if index % ctx.world_size != ctx.rank:
            continue
        probs = infer_volume(lambda x: _main_output(net(x)), batch["image"].to(ctx.device), window)
        pred = probs.argmax(dim=1)[0].cpu().numpy()
        gt = np.asarray(batch["label"][0, 0].detach().cpu())
        scores = metrics.per_class_metrics(pred, gt, num_classes, spacing)
        sums += torch.tensor([[scores[c][key] for c in range(1, num_classes)] for key in ("dice", "hd95")],
                             dtype=torch.float64)
        cases += 1
    sums = distributed.all_reduce_sum(sums.to(ctx.device)).cpu()
    cases = distributed.all_reduce_sum(cases.to(ctx.device)).cpu()
    class_dice, class_hd95 = sums / cases  # nan only without any validation case
    return {"mean_dice": class_dice.mean().item(), "class_dice": class_dice.tolist(),
            "mean_hd95": class_hd95.mean().item(), "class_hd95": class_hd95.tolist()}


def _main_output(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def record_validation(state, result, names):
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
    plot_progress(state.history, run_dir.progress)


def file_logged(err):
    """`err`, written to train.log on rank 0 as it is raised; main.py prints it to the console once."""
    log.error("%s", err, extra={"file_only": True})
    return err


class RunLog:
    """train.log in the run folder plus the console, rank 0 only (other ranks print warnings); records
    marked file_only (messages main.py prints itself) skip the console. The file is opened at the first
    record, so a run refused during its checks leaves an existing train.log as it was."""

    def __init__(self, run_dir, is_main):
        self.run_dir, self.is_main, self.handlers = run_dir, is_main, []

    def __enter__(self):
        log.setLevel(logging.INFO if self.is_main else logging.WARNING)
        log.propagate = False
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
        console = logging.StreamHandler()
        console.addFilter(lambda record: not getattr(record, "file_only", False))
        self.handlers = [console] + ([logging.FileHandler(self.run_dir.log, delay=True)] if self.is_main else [])
        for handler in self.handlers:
            handler.setFormatter(fmt)
            log.addHandler(handler)
        return self

    def __exit__(self, *exc):
        for handler in self.handlers:
            log.removeHandler(handler)
            handler.close()
        return False
