"""MONAI dictionary transforms of the reference protocol; every value comes from the config. The one
preprocessing path of training, evaluation and prediction (geometry.py inverts its spatial steps)."""
import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

# The data keys eval_transforms reads: models evaluated together (an ensemble) must agree on them.
PREPROCESSING_KEYS = ("spacing", "orientation", "normalization", "intensity_range", "intensity_mean",
                      "intensity_std", "crop_foreground")


def above_minimum(image):
    """Mask (C, ...) of the voxels of a channel-first image above their channel's minimum: what a scan's
    padding (its lowest value: 0 in MR, -1024 or lower outside a CT's field of view) leaves; a constant image
    keeps every voxel. Its box over all channels is the body the `ct` and `zscore` crops and the fingerprint
    take (for CT it keeps the air around the body inside the field of view)."""
    image = torch.as_tensor(image)
    mask = image > image.amin(dim=tuple(range(1, image.ndim)), keepdim=True)
    return mask if mask.any() else torch.ones_like(mask)


def _normalize(d):
    """The intensity step of data.normalization (config/rules.py allows only window, ct and zscore)."""
    lo, hi = d["intensity_range"]
    if d["normalization"] == "window":
        return ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    if d["normalization"] == "ct":
        # Clip to [lo, hi], then (x - mean) / std: one linear map with its outputs clipped.
        mean, std = d["intensity_mean"], d["intensity_std"]
        return ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=(lo - mean) / std,
                                    b_max=(hi - mean) / std, clip=True)
    # Over every voxel of the cropped image, zeros included: with nonzero=True the background would stay 0,
    # the value of average tissue after normalising, and tissue at exactly 0 would be left out.
    return NormalizeIntensityd(keys="image", nonzero=False, channel_wise=True)


def _preprocess(d, keys):
    """Deterministic part shared by training and evaluation (cached by CacheDataset); `d` is the data section."""
    modes = ["bilinear", "nearest"][: len(keys)]
    steps = [
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        # Explicit RAS labels: NIfTI affines read by nibabel are RAS whatever the file's layout.
        Orientationd(keys=keys, axcodes=d["orientation"], labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=keys, pixdim=tuple(d["spacing"]), mode=modes),
    ]
    # allow_smaller keeps the crop inside the image, so inverting it is an exact pad.
    if d["normalization"] == "window":
        # The reference's order: the crop keeps what lies above the window's low end.
        steps.append(_normalize(d))
        if d["crop_foreground"]:
            steps.append(CropForegroundd(keys=keys, source_key="image", allow_smaller=True))
        return steps
    if d["crop_foreground"]:
        # Normalised values have no fixed floor: crop first, on the intensities as read.
        steps.append(CropForegroundd(keys=keys, source_key="image", select_fn=above_minimum, allow_smaller=True))
    return steps + [_normalize(d)]


def _background_floor(d):
    """The normalised intensity above which random crops may centre on background (None: anywhere): the
    window's or the clip's low end, as the reference's threshold 0 on the window. z-scores have no floor."""
    if d["normalization"] == "window":
        return 0.0
    if d["normalization"] == "ct":
        return (d["intensity_range"][0] - d["intensity_mean"]) / d["intensity_std"]
    return None


def train_transforms(d, roi_size, num_classes):
    """Preprocessing, then random crops of `roi_size` and augmentation, as the data section `d` says."""
    keys = ["image", "label"]
    roi = tuple(roi_size)
    return Compose(
        _preprocess(d, keys)
        + [
            EnsureTyped(keys=keys, track_meta=False),
            SpatialPadd(keys=keys, spatial_size=roi),
            _random_crop(d, keys, roi, num_classes),
            RandFlipd(keys=keys, prob=d["flip_prob"], spatial_axis=0),
            RandFlipd(keys=keys, prob=d["flip_prob"], spatial_axis=1),
            RandFlipd(keys=keys, prob=d["flip_prob"], spatial_axis=2),
            RandRotate90d(keys=keys, prob=d["rot90_prob"], max_k=d["rot90_max_k"]),
            RandScaleIntensityd(keys="image", factors=d["intensity_scale"], prob=d["intensity_prob"]),
            RandShiftIntensityd(keys="image", offsets=d["intensity_shift"], prob=d["intensity_prob"]),
        ]
    )


def _random_crop(d, keys, roi, num_classes):
    floor = _background_floor(d)
    region = dict(image_key="image", image_threshold=floor) if floor is not None else dict(image_key=None)
    if d["crop_sampling"] == "posneg":
        return RandCropByPosNegLabeld(
            keys=keys, label_key="label", spatial_size=roi, pos=d["pos"], neg=d["neg"],
            num_samples=d["num_samples"], **region,
        )
    # "classes" (config/rules.py allows no other value): crop centres drawn class by class, so small organs are
    # seen as often as the liver.
    return RandCropByLabelClassesd(
        keys=keys, label_key="label", spatial_size=roi, num_classes=num_classes,
        num_samples=d["num_samples"], **region,
    )


def eval_transforms(d, with_label=True):
    """Whole-volume preprocessing for validation, test and prediction; invertible (see geometry.py)."""
    keys = ["image", "label"] if with_label else ["image"]
    return Compose(_preprocess(d, keys))
