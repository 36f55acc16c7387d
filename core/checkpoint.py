"""Checkpoints: what one holds for resume (`snapshot`) and how a run is restored from it (`restore`),
atomic saving, loading with clear errors, strict weight loading, random-stream capture.

A training checkpoint is a dict with RESUME_KEYS; a checkpoint of the reference implementation
({"state_dict", "epoch", "best_acc"}) loads too, for evaluation. Files are read with
torch.load(weights_only=True): a checkpoint holds tensors and plain Python values only.
"""
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from core.errors import CheckpointError, ConfigError, first_line
from core.fileio import atomic_path

RESUME_KEYS = ("state_dict", "optimizer", "scheduler", "scaler", "epoch", "iteration", "best_metric",
               "rng", "config", "history")
_SHOWN = 5  # keys listed per kind in a mismatch error
# numpy scalars: the reference implementation stores best_acc as a numpy float (np.core before numpy 2)
_NP_CORE = getattr(np, "_core", None) or np.core
_NUMPY_SCALARS = [_NP_CORE.multiarray.scalar, np.dtype, np.dtypes.Float64DType, np.dtypes.Float32DType]


def _new_history():
    return {"epoch": [], "loss": [], "lr": [], "val_epoch": [], "val_dice": [], "val_class_dice": {}}


@dataclass
class TrainState:
    """Counters of a run; `epoch` counts completed epochs, `iteration` completed optimizer steps (skipped
    ones included: each consumed its batch and its learning rate step)."""
    epoch: int = 0
    iteration: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    history: dict = field(default_factory=_new_history)
    epoch_loss_sum: float = 0.0  # over the finite steps of the current epoch so far, on this rank
    epoch_loss_steps: int = 0
    skipped: dict = field(default_factory=lambda: {"nonfinite": 0, "amp_overflow": 0, "nonfinite_in_a_row": 0})
    last_saved: tuple | None = None  # (epoch, iteration) of the newest checkpoint_latest.pt


def snapshot(model, optimizer, scheduler, scaler, state, cfg, rng_by_rank, loss_by_rank):
    """Everything a resume needs, as a checkpoint dict. `rng_by_rank` holds every rank's random streams and
    `loss_by_rank` every rank's partial epoch loss [sum, steps], both as of the same step boundary."""
    return {"state_dict": unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": state.epoch,
            "iteration": state.iteration, "best_metric": state.best_metric, "best_epoch": state.best_epoch,
            "rng": rng_by_rank[0], "rng_by_rank": rng_by_rank, "config": cfg, "history": state.history,
            "epoch_loss_by_rank": loss_by_rank, "skipped": dict(state.skipped)}


def check_resumable(ckpt, cfg, path):
    """A ConfigError when `cfg` cannot continue the run saved in `ckpt` (read from `path`)."""
    saved = ckpt["config"]["trainer"]["iters_per_epoch"]
    if saved != cfg["trainer"]["iters_per_epoch"]:  # epochs are counted in iterations: the counters would disagree
        raise ConfigError(f"--resume {os.path.dirname(os.fspath(path))}: trainer.iters_per_epoch was {saved}; it "
                          f"cannot change on resume (got {cfg['trainer']['iters_per_epoch']})")


def restore(ckpt, path, model, optimizer, scheduler, scaler, rank, world_size, seed):
    """Load a `snapshot` into the model, optimizer, scheduler and scaler, restore this rank's random streams,
    and return its TrainState. A checkpoint saved with another world size restores rank 0's streams on rank 0
    and seeds the others afresh (replaying rank 0's streams would repeat its dropout masks)."""
    load_model_weights(model, ckpt, path)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler.is_enabled() and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    rngs, losses = ckpt.get("rng_by_rank") or [], ckpt.get("epoch_loss_by_rank") or []
    if len(rngs) == world_size:
        restore_rng(rngs[rank])
    elif rank == 0:
        restore_rng(ckpt["rng"])
    else:
        seed_everything(seed + rank + ckpt["iteration"])
    loss_sum, loss_steps = losses[rank] if len(losses) == world_size else (
        losses[0] if losses and rank == 0 else (0.0, 0))
    state = TrainState(epoch=ckpt["epoch"], iteration=ckpt["iteration"], best_metric=ckpt["best_metric"],
                       best_epoch=ckpt.get("best_epoch"), history=ckpt["history"], epoch_loss_sum=loss_sum,
                       epoch_loss_steps=loss_steps, last_saved=(ckpt["epoch"], ckpt["iteration"]))
    state.skipped.update(ckpt.get("skipped", {}))
    return state


def save_checkpoint(path, state):
    """Write `state` to `path` atomically: a temporary file in the same folder, then os.replace.

    A crash or a failing save leaves the previous file at `path` untouched and no temporary file behind.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
    return os.fspath(path)


def _describe(obj):
    if isinstance(obj, dict):
        keys = list(obj)
        more = f", ... ({len(keys)} keys)" if len(keys) > _SHOWN else ""
        return f"a dict with keys {', '.join(map(str, keys[:_SHOWN]))}{more}"
    return f"a {type(obj).__name__}"


def load_checkpoint(path, map_location="cpu", required_keys=("state_dict",), mmap=False):
    """Read a checkpoint dict; raise CheckpointError naming the path and what was found instead. With `mmap`
    the tensors are mapped, not read: cheap when only the counters are wanted."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        where = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
        raise CheckpointError(f"checkpoint {path} {where}")
    try:
        with torch.serialization.safe_globals(_NUMPY_SCALARS):
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises several types for foreign or truncated files
        raise CheckpointError(f"{path} is not a readable checkpoint: {first_line(err)}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        hint = ""
        if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            hint = " (it looks like a bare state_dict; wrap it as {'state_dict': ...})"
        raise CheckpointError(f"{path} is not a checkpoint: expected a dict with 'state_dict', "
                              f"found {_describe(ckpt)}{hint}")
    missing = [k for k in required_keys if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)} "
                              f"(found keys: {', '.join(map(str, ckpt))}); it cannot be resumed")
    return ckpt


def unwrap_model(model):
    """The network inside a DistributedDataParallel / DataParallel wrapper."""
    return model.module if isinstance(model, (torch.nn.parallel.DistributedDataParallel,
                                              torch.nn.DataParallel)) else model


def _strip_module_prefix(state_dict):
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _listing(keys):
    keys = sorted(keys)
    more = f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return f"{len(keys)}: {', '.join(keys[:_SHOWN])}{more}"


def load_model_weights(model, state_dict_or_checkpoint, source_path):
    """Load weights strictly; on any mismatch raise CheckpointError listing missing, unexpected and
    wrongly shaped keys (first few, with counts) and the source path. Handles DDP "module." prefixes
    on either side."""
    sd = state_dict_or_checkpoint
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    sd = _strip_module_prefix(sd)
    net = unwrap_model(model)
    own = net.state_dict()
    missing = set(own) - set(sd)
    unexpected = set(sd) - set(own)
    shapes = {k for k in set(own) & set(sd)
              if not isinstance(sd[k], torch.Tensor) or tuple(sd[k].shape) != tuple(own[k].shape)}
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_listing(unexpected)}")
        if shapes:
            shown = sorted(shapes)[:_SHOWN]
            detail = ", ".join(f"{k} {tuple(getattr(sd[k], 'shape', ()))} vs model {tuple(own[k].shape)}"
                               for k in shown)
            more = f", ... ({len(shapes) - _SHOWN} more)" if len(shapes) > _SHOWN else ""
            parts.append(f"shape mismatches {len(shapes)}: {detail}{more}")
        raise CheckpointError(f"weights in {source_path} do not fit {type(net).__name__}: " + "; ".join(parts))
    net.load_state_dict(sd, strict=True)
    return model


def capture_rng():
    """RNG states of torch, CUDA (if any), numpy and Python, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }


def seed_everything(seed):
    """Seed Python's, numpy's and torch's (CPU and CUDA) random streams."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def restore_rng(state):
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]][:torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
