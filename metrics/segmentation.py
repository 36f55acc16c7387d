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
from scipy import ndimage


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


def _union_box(*boxes):
    """Smallest box (tuple of slices) holding every given box; None entries (empty masks) are skipped."""
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    return tuple(slice(min(b[i].start for b in boxes), max(b[i].stop for b in boxes)) for i in range(3))


def _grow(box, shape, margin=1):
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape))


def _mask_box(mask):
    found = ndimage.find_objects(mask.view(np.uint8))
    return found[0] if found else None


def _hd95_in_box(pred, gt, spacing, full_shape):
    """hd95 of masks already cropped to (a box holding) their foreground; `full_shape` sets the diagonal."""
    pred_any, gt_any = bool(pred.any()), bool(gt.any())
    if not pred_any and not gt_any:
        return 0.0
    if pred_any != gt_any:
        return image_diagonal_mm(full_shape, spacing)
    with warnings.catch_warnings():
        # MONAI 1.6 trips over its own deprecated get_mask_edges argument; not the caller's concern
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        value = compute_hausdorff_distance(
            torch.from_numpy(np.ascontiguousarray(pred))[None, None],
            torch.from_numpy(np.ascontiguousarray(gt))[None, None],
            include_background=True,
            percentile=95,
            spacing=spacing.tolist(),
        )
    return float(value.item())


def hd95(pred_mask, gt_mask, spacing_mm):
    """Symmetric 95th-percentile Hausdorff distance in mm between two boolean 3D masks.

    As MONAI defines it (compute_hausdorff_distance with percentile=95, which computes it here): the
    larger of the two directed 95th percentiles of the distances between the masks' surface voxels,
    with `spacing_mm` the voxel size along each array axis. Empty masks follow the module's rule.
    """
    pred, gt = _check_pair(pred_mask, gt_mask)
    spacing = _check_spacing(spacing_mm)
    box = _union_box(_mask_box(pred), _mask_box(gt))
    if box is None:
        return 0.0
    # Surface distances are translation invariant: crop first (with the one-voxel margin that keeps
    # every surface voxel a surface voxel), as MONAI converts and scans the whole volume otherwise.
    box = _grow(box, pred.shape)
    return _hd95_in_box(pred[box], gt[box], spacing, pred.shape)


def _as_labels(array, what):
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.integer):
        return array
    rounded = np.rint(array)
    if not np.array_equal(rounded, array):
        raise ValueError(f"{what} must hold integer class labels, got non-integer values")
    return rounded.astype(np.int64)


def per_class_metrics(pred_labels, gt_labels, num_classes, spacing):
    """Dice and HD95 of every foreground class 1..num_classes-1 of two integer label volumes.

    Returns {class_index: {"dice": float, "hd95": float}}.
    """
    pred = _as_labels(pred_labels, "prediction")
    gt = _as_labels(gt_labels, "ground truth")
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"prediction shape {pred.shape} and label shape {gt.shape} must be one 3D shape")
    num_classes = int(num_classes)
    if num_classes < 2:
        raise ValueError(f"num_classes must count the background and at least one class, got {num_classes}")
    spacing = _check_spacing(spacing, pred.ndim)
    # One pass per volume finds every class's bounding box; each class is then measured in its box only.
    pred_boxes = ndimage.find_objects(np.clip(pred, 0, None), max_label=num_classes - 1)
    gt_boxes = ndimage.find_objects(np.clip(gt, 0, None), max_label=num_classes - 1)
    result = {}
    for c in range(1, num_classes):
        box = _union_box(pred_boxes[c - 1], gt_boxes[c - 1])
        if box is None:
            result[c] = {"dice": 1.0, "hd95": 0.0}
            continue
        box = _grow(box, pred.shape)
        p, g = pred[box] == c, gt[box] == c
        result[c] = {"dice": dice(p, g), "hd95": _hd95_in_box(p, g, spacing, pred.shape)}
    return result
