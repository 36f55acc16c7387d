"""Checkpoints: atomic saving, loading with clear errors, strict weight loading, RNG capture.

A training checkpoint is a dict with RESUME_KEYS; a checkpoint of the reference implementation
({"state_dict", "epoch", "best_acc"}) loads too, for evaluation. Files are read with
torch.load(weights_only=True): a checkpoint holds tensors and plain Python values only.
"""
import os
import random

import numpy as np
import torch

from fileio import atomic_path

RESUME_KEYS = ("state_dict", "optimizer", "scheduler", "scaler", "epoch", "iteration", "best_metric",
               "rng", "config", "history")
_SHOWN = 5  # keys listed per kind in a mismatch error
# numpy scalars: the reference implementation stores best_acc as a numpy float (np.core before numpy 2)
_NP_CORE = getattr(np, "_core", None) or np.core
_NUMPY_SCALARS = [_NP_CORE.multiarray.scalar, np.dtype, np.dtypes.Float64DType, np.dtypes.Float32DType]


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, unreadable or does not fit the model."""

    exit_code = 2  # a user error: one line at the CLI


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


def load_checkpoint(path, map_location="cpu", required_keys=("state_dict",)):
    """Read a checkpoint dict; raise CheckpointError naming the path and what was found instead."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        where = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
        raise CheckpointError(f"checkpoint {path} {where}")
    try:
        with torch.serialization.safe_globals(_NUMPY_SCALARS):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for foreign or truncated files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint: {first}") from err
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


def restore_rng(state):
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]][:torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
