"""MONAI dictionary transforms of the reference protocol; every value comes from the config."""
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
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
PREPROCESSING_KEYS = ("spacing", "orientation", "intensity_range", "crop_foreground")


def _preprocess(d, keys):
    """Deterministic part shared by training and evaluation (cached by CacheDataset); `d` is the data section."""
    lo, hi = d["intensity_range"]
    modes = ["bilinear", "nearest"][: len(keys)]
    steps = [
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        # Explicit RAS labels: NIfTI affines read by nibabel are RAS whatever the file's layout.
        Orientationd(keys=keys, axcodes=d["orientation"], labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=keys, pixdim=tuple(d["spacing"]), mode=modes),
        ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
    ]
    if d["crop_foreground"]:
        # allow_smaller keeps the crop inside the image, so inverting it is an exact pad.
        steps.append(CropForegroundd(keys=keys, source_key="image", allow_smaller=True))
    return steps


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
    if d["crop_sampling"] == "posneg":
        return RandCropByPosNegLabeld(
            keys=keys, label_key="label", spatial_size=roi, pos=d["pos"], neg=d["neg"],
            num_samples=d["num_samples"], image_key="image", image_threshold=0,
        )
    # "classes" (config/rules.py allows no other value): crop centres drawn class by class, so small organs are
    # seen as often as the liver.
    return RandCropByLabelClassesd(
        keys=keys, label_key="label", spatial_size=roi, num_classes=num_classes,
        num_samples=d["num_samples"], image_key="image", image_threshold=0,
    )


def eval_transforms(d, with_label=True):
    """Whole-volume preprocessing for validation, test and prediction; invertible (see geometry.py)."""
    keys = ["image", "label"] if with_label else ["image"]
    return Compose(_preprocess(d, keys))
