"""Segmentation metrics: the one place that defines Dice, HD95 and the empty-mask rule (segmentation.py)."""
from .segmentation import dice, hd95, image_diagonal_mm, per_class_metrics

__all__ = ["dice", "hd95", "image_diagonal_mm", "per_class_metrics"]
