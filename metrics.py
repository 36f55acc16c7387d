"""Segmentation metrics: the one place that defines Dice, HD95 and the empty-mask rule.

Pure functions: boolean or label arrays and a voxel spacing in, plain floats out.

Empty-mask rule (one rule for every caller):
  - prediction and ground truth both empty: Dice 1, HD95 0 (nothing to find, nothing found: perfect);
  - exactly one empty (a missed or a hallucinated structure): Dice 0 and HD95 = the image diagonal in mm,
    sqrt(sum((shape * spacing)^2)), the largest distance possible inside the image, never 0 or NaN,
    so a missed organ is penalised rather than dropped from the mean.
"""
import math
import warnings

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance


def _check_pair(pred_mask, gt_mask):
    pred = np.asarray(pred_mask)
    gt = np.asarray(gt_mask)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    if pred.ndim != 3:
        raise ValueError(f"expected 3D masks, got shape {pred.shape}")
    return pred.astype(bool, copy=False), gt.astype(bool, copy=False)


def _check_spacing(spacing_mm, ndim=3):
    spacing = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)
    if spacing.size != ndim or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing must be {ndim} positive numbers in mm, got {spacing_mm!r}")
    return spacing


def image_diagonal_mm(shape, spacing_mm):
    """Length of the image's diagonal in mm: the HD95 given to a missed or hallucinated structure."""
    spacing = _check_spacing(spacing_mm, len(shape))
    return float(math.sqrt(float(np.sum((np.asarray(shape, dtype=np.float64) * spacing) ** 2))))


def dice(pred_mask, gt_mask):
    """Dice coefficient 2|P & G| / (|P| + |G|) of two boolean 3D masks; 1.0 when both are empty."""
    pred, gt = _check_pair(pred_mask, gt_mask)
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(gt))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & gt)) / total


def hd95(pred_mask, gt_mask, spacing_mm):
    """Symmetric 95th-percentile Hausdorff distance in mm between two boolean 3D masks.

    As MONAI defines it (compute_hausdorff_distance with percentile=95, which computes it here): the
    larger of the two directed 95th percentiles of the distances between the masks' surface voxels,
    with `spacing_mm` the voxel size along each array axis. Empty masks follow the module's rule.
    """
    pred, gt = _check_pair(pred_mask, gt_mask)
    spacing = _check_spacing(spacing_mm)
    pred_any, gt_any = bool(pred.any()), bool(gt.any())
    if not pred_any and not gt_any:
        return 0.0
    if pred_any != gt_any:
        return image_diagonal_mm(pred.shape, spacing)
    with warnings.catch_warnings():
        # MONAI 1.6 trips over its own deprecated get_mask_edges argument; not the caller's concern
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        value = compute_hausdorff_distance(
            torch.from_numpy(pred)[None, None],
            torch.from_numpy(gt)[None, None],
            include_background=True,
            percentile=95,
            spacing=spacing.tolist(),
        )
    return float(value.item())


def per_class_metrics(pred_labels, gt_labels, num_classes, spacing):
    """Dice and HD95 of every foreground class 1..num_classes-1 of two integer label volumes.

    Returns {class_index: {"dice": float, "hd95": float}}.
    """
    pred = np.asarray(pred_labels)
    gt = np.asarray(gt_labels)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from label shape {gt.shape}")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must count the background and at least one class, got {num_classes}")
    spacing = _check_spacing(spacing, pred.ndim)
    return {
        c: {"dice": dice(pred == c, gt == c), "hd95": hd95(pred == c, gt == c, spacing)}
        for c in range(1, int(num_classes))
    }
