"""Data room: dataset lists, pre-flight checks, transforms, loaders, synthetic phantoms, geometry inversion,
and (never imported by training) `prepare`, `fingerprint` and `plan`. Knows nothing of models."""
from core.errors import DataConfigError

from .datalist import class_names, read_datalist
from .geometry import invert_prediction, save_segmentation
from .loaders import make_eval_loader, make_predict_loader, make_train_loader
from .synthetic import ensure_for, ensure_synthetic_dataset, generate_synthetic_dataset
from .transforms import eval_transforms, train_transforms

__all__ = [
    "DataConfigError",
    "class_names",
    "ensure_for",
    "ensure_synthetic_dataset",
    "eval_transforms",
    "generate_synthetic_dataset",
    "invert_prediction",
    "make_eval_loader",
    "make_predict_loader",
    "make_train_loader",
    "read_datalist",
    "save_segmentation",
    "train_transforms",
]
