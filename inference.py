"""Sliding-window inference: the one function that turns a preprocessed volume into class probabilities,
used by validation during training (train.py) and by test and predict (test.py)."""
import numpy as np
import torch
from monai.inferers import SlidingWindowInferer

from config import ConfigError

BLEND_MODES = ("gaussian", "constant")
SPATIAL_AXES = (2, 3, 4)


def check_inference_config(cfg, overlap):
    inf = cfg["inference"]
    if inf["blend_mode"] not in BLEND_MODES:
        raise ConfigError(f"inference.blend_mode = {inf['blend_mode']!r}, expected one of {', '.join(BLEND_MODES)}")
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"sliding-window overlap {overlap} must lie in [0, 1) (inference.overlap / val_overlap)")
    if inf["sw_batch_size"] < 1:
        raise ConfigError(f"inference.sw_batch_size = {inf['sw_batch_size']}, expected at least 1")


def infer_volume(model, image, cfg, overlap=None, mirror=None):
    """Softmax probabilities (B, C, H, W, D) of `image` (B, C_in, H, W, D) by sliding-window inference.

    `model` is a module or any callable returning logits for a batch of windows; off the GPU it gets one
    window at a time (see _one_window_at_a_time). The window is the model's training window
    cfg["model"]["roi_size"]; `overlap` defaults to inference.overlap (validation passes inference.val_overlap)
    and `mirror` to inference.mirror: when true the softmax is averaged over all 8 combinations of flips of
    the three spatial axes.
    """
    inf = cfg["inference"]
    overlap = inf["overlap"] if overlap is None else overlap
    mirror = inf["mirror"] if mirror is None else mirror
    check_inference_config(cfg, overlap)
    inferer = SlidingWindowInferer(
        roi_size=list(cfg["model"]["roi_size"]),
        sw_batch_size=inf["sw_batch_size"],
        overlap=overlap,
        mode=inf["blend_mode"],
    )
    flips = [()]
    if mirror:
        flips = [tuple(a for a, bit in zip(SPATIAL_AXES, bits) if bit) for bits in np.ndindex(2, 2, 2)]
    use_amp = image.device.type == "cuda" and cfg["trainer"]["amp"]
    network = model if image.device.type == "cuda" else _one_window_at_a_time(model)
    probs = None
    with torch.no_grad(), torch.autocast(device_type=image.device.type, enabled=use_amp):
        for axes in flips:
            x = torch.flip(image, axes) if axes else image
            p = torch.softmax(inferer(x, network).float(), dim=1)
            p = torch.flip(p, axes) if axes else p
            probs = p if probs is None else probs + p
    return probs / len(flips)


def _one_window_at_a_time(model):
    """The network applied to each window of a sliding-window batch in turn. Off the GPU, batching windows
    saves little (EM-Net at roi 128 on 2 cores: 9% less CPU time with 4 windows) and holds sw_batch_size
    times the activations (peak 9.6 GB instead of 3.5 GB; docs/benchmarks.md). Each window's output is the
    one it gets alone, so the result does not depend on sw_batch_size."""
    return lambda windows: torch.cat([model(window) for window in windows.split(1)])
