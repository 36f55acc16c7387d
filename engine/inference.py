"""Sliding-window inference: the one function that turns a preprocessed volume into class probabilities,
used by validation during training (train.py) and by test and predict (test.py)."""
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer

SPATIAL_AXES = (2, 3, 4)


@dataclass(frozen=True)
class SlidingWindow:
    """How to slide the model's window over a volume: its size (the training window), the overlap, the
    number of windows per forward pass on a GPU, the blending of overlapping windows, whether to average
    over the 8 flips of the three axes (mirroring), and whether to run under float16 autocast on a GPU."""
    roi_size: tuple
    overlap: float
    sw_batch_size: int = 4
    blend_mode: str = "gaussian"
    mirror: bool = False
    amp: bool = False

    @classmethod
    def from_config(cls, inference, roi_size, amp, validation=False):
        """From the `inference` section; validation uses its own overlap and never mirrors (8x the cost)."""
        return cls(tuple(roi_size), inference["val_overlap"] if validation else inference["overlap"],
                   inference["sw_batch_size"], inference["blend_mode"],
                   False if validation else inference["mirror"], amp)


def infer_volume(model, image, window):
    """Softmax probabilities (B, C, H, W, D) of `image` (B, C_in, H, W, D) by sliding-window inference.

    `model` is a module or any callable returning logits for a batch of windows; off the GPU it gets one
    window at a time (see _one_window_at_a_time). `window` is a SlidingWindow.
    """
    inferer = SlidingWindowInferer(roi_size=list(window.roi_size), sw_batch_size=window.sw_batch_size,
                                   overlap=window.overlap, mode=window.blend_mode)
    flips = [()]
    if window.mirror:
        flips = [tuple(a for a, bit in zip(SPATIAL_AXES, bits) if bit) for bits in np.ndindex(2, 2, 2)]
    on_gpu = image.device.type == "cuda"
    network = model if on_gpu else _one_window_at_a_time(model)
    probs = None
    with torch.no_grad(), torch.autocast(device_type=image.device.type, enabled=on_gpu and window.amp):
        for axes in flips:
            x = torch.flip(image, axes) if axes else image
            p = torch.softmax(inferer(x, network).float(), dim=1)
            p = torch.flip(p, axes) if axes else p
            probs = p if probs is None else probs + p
    return probs / len(flips)


def ensemble_probabilities(members, image):
    """The mean of the softmax probabilities of several (model, SlidingWindow) members on `image`, each
    sliding its own window (an ensemble of runs averages probabilities, then takes the argmax)."""
    total = None
    for model, window in members:
        probs = infer_volume(model, image, window)
        total = probs if total is None else total + probs
    return total / len(members)


def _one_window_at_a_time(model):
    """The network applied to each window of a sliding-window batch in turn. Off the GPU, batching windows
    saves little CPU time and holds sw_batch_size times the activations (docs/benchmarks.md). Each window's
    output is the one it gets alone, so the result does not depend on sw_batch_size."""
    return lambda windows: torch.cat([model(window) for window in windows.split(1)])
