"""Back from preprocessed space to the original image geometry, and writing segmentations as NIfTI."""
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor, decollate_batch
from monai.transforms import Invertd
from monai.utils import TraceKeys

from core.fileio import atomic_path

from .transforms import eval_transforms


def _single(batch):
    """A loader batch (batch size 1) or an already decollated item -> one item dict."""
    image = batch["image"]
    if isinstance(image, torch.Tensor) and image.ndim == 5:
        items = decollate_batch(batch)
        if len(items) != 1:
            raise ValueError(f"invert_prediction expects a batch of one volume, got {len(items)}")
        return items[0]
    return dict(batch)


def invert_prediction(pred, batch, d):
    """Label map `pred` (1, H, W, D) in preprocessed space -> int numpy array (H0, W0, D0) in the original image
    geometry, undoing eval_transforms of the data section `d` (crop, spacing, orientation) recorded on
    batch["image"]."""
    item = _single(batch)
    if not isinstance(item["image"], MetaTensor) or not item["image"].applied_operations:
        raise ValueError("batch['image'] carries no applied transforms; it must come from eval_transforms")
    pred = torch.as_tensor(pred).detach().cpu().float()
    if pred.ndim == 3:
        pred = pred[None]
    if pred.ndim != 4 or pred.shape[0] != 1 or tuple(pred.shape[1:]) != tuple(item["image"].shape[1:]):
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} does not match the preprocessed image {tuple(item['image'].shape)}"
        )
    # The recorded transforms carry the ids of the loader's transform objects; a rebuilt eval_transforms has
    # other ids, so the id check is switched off (MONAI's TraceKeys.NONE) and the result's shape checked.
    image = item["image"]
    reference = MetaTensor(torch.empty(0), meta=image.meta, applied_operations=_without_ids(image.applied_operations))
    inverter = Invertd(
        keys="pred",
        transform=eval_transforms(d, with_label="label" in item),
        orig_keys="image",
        nearest_interp=True,
        to_tensor=True,
    )
    out = inverter({"image": reference, "pred": pred})["pred"]
    out = np.rint(np.asarray(out[0].detach().cpu())).astype(np.int16)
    original = tuple(int(n) for n in torch.as_tensor(image.meta["spatial_shape"]).reshape(-1).tolist())
    if out.shape != original:
        raise ValueError(f"inverted prediction has shape {out.shape}, the original image {original}: "
                         "was the batch preprocessed with another configuration?")
    return out


def _without_ids(ops):
    if isinstance(ops, dict):
        return {k: TraceKeys.NONE if k == TraceKeys.ID else _without_ids(v) for k, v in ops.items()}
    if isinstance(ops, (list, tuple)):
        return type(ops)(_without_ids(v) for v in ops)
    return ops


def _affine(batch_or_meta):
    """The original (file) affine from a batch, an item, a MetaTensor or a meta dict."""
    src = batch_or_meta
    if isinstance(src, dict) and "image" in src:
        src = src["image"]
    meta = src.meta if isinstance(src, MetaTensor) else src
    if not isinstance(meta, dict) or "original_affine" not in meta:
        raise ValueError("no 'original_affine' in the metadata; pass a batch or image loaded by LoadImaged")
    affine = np.asarray(torch.as_tensor(meta["original_affine"]).cpu(), dtype=np.float64)
    if affine.ndim == 3:
        affine = affine[0]
    if affine.shape != (4, 4):
        raise ValueError(f"original_affine must be 4x4, got shape {affine.shape}")
    return affine


def save_segmentation(array, batch_or_meta, path):
    """Write an integer label map (original geometry) as NIfTI with the original affine; returns the path."""
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"segmentation must be 3D, got shape {array.shape}")
    dtype = np.uint8 if array.min() >= 0 and array.max() <= 255 else np.int16
    img = nib.Nifti1Image(array.astype(dtype), _affine(batch_or_meta))
    img.set_data_dtype(dtype)
    path = Path(path)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix  # nibabel picks the format from it
    with atomic_path(path, suffix) as tmp:
        nib.save(img, tmp)
    return path
