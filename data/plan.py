"""The plan: plan.yaml beside the data, a dataset config derived from fingerprint.json by fixed rules, each
value with a comment saying why. `--data_config <folder>/plan.yaml` trains on it as it is.

    spacing         the median spacing; an axis whose median spacing is over ANISOTROPY times the others'
                    and whose median (cropped) size is over ANISOTROPY times smaller takes the
                    FINE_PERCENTILE-th percentile of its spacings instead (nnU-Net's rule for thick slices)
    normalization   ct (one CT channel): clip to the foreground's 0.5 and 99.5 percentiles, then subtract
                    its mean and divide by its std; zscore otherwise: per image and channel
    roi_size        the median cropped shape at that spacing, each side rounded up to the model's multiple,
                    at most MAX_SIDE (smaller volumes are padded)
    classes         dataset.json's labels; the split is dataset.json's, else data.val_fraction VAL_FRACTION

Too few cases and mixed channels are errors; a class in no case and spacings far apart are warnings,
written at the top of the plan and printed.
"""
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import DataConfigError
from core.fileio import atomic_path

from . import fingerprint as fingerprints

NAME = "plan.yaml"
ANISOTROPY = 3.0
FINE_PERCENTILE = 10
MAX_SIDE = 128
SPACING_SPREAD = 10.0  # a larger ratio between two cases' spacings on one axis is worth a warning
VAL_FRACTION = 0.2
AXES = ("x (left-right)", "y (posterior-anterior)", "z (inferior-superior)")


@dataclass(frozen=True)
class WindowRule:
    """The windows a model accepts (models.window_rule): each side a multiple of `multiples`, and at least
    `coarsest_voxels` voxels on the coarsest feature map. `model` and `config` name it in the plan."""
    model: str
    config: str
    multiples: tuple
    coarsest_voxels: int = 1


def target_spacing(spacings, shapes):
    """(spacing, why) from the cases' spacings and cropped shapes (N, 3) at their own spacing."""
    spacings, shapes = np.asarray(spacings, dtype=np.float64), np.asarray(shapes, dtype=np.float64)
    target, sizes = np.median(spacings, axis=0), np.median(shapes, axis=0)
    coarse = int(np.argmax(target))
    others = [a for a in range(3) if a != coarse]
    finest, fewest = target[others].max(), sizes[others].min()
    why = f"the median spacing of the {len(spacings)} cases"
    if target[coarse] > ANISOTROPY * finest and ANISOTROPY * sizes[coarse] < fewest:
        fine = max(float(np.percentile(spacings[:, coarse], FINE_PERCENTILE)), float(finest))
        why += (f"; {AXES[coarse]} is anisotropic (median {target[coarse]:g} mm > {ANISOTROPY:g} x {finest:g} mm, "
                f"{sizes[coarse]:g} voxels < {fewest:g} / {ANISOTROPY:g}), so it takes the {FINE_PERCENTILE}th "
                f"percentile of its spacings, {fine:g} mm")
        target[coarse] = fine
    return [round(float(v), 5) for v in target], why


def choose_window(median_shape, rule):
    """roi_size for a median volume of `median_shape` voxels: each side rounded up to its multiple, at most
    the largest multiple not over MAX_SIDE; grown where the model's coarsest map needs more voxels."""
    sides = []
    for size, multiple in zip(median_shape, rule.multiples):
        largest = max(multiple, MAX_SIDE // multiple * multiple)
        sides.append(min(largest, multiple * max(1, math.ceil(size / multiple - 1e-6))))
    while math.prod(s // m for s, m in zip(sides, rule.multiples)) < rule.coarsest_voxels:
        axis = max(range(3), key=lambda a: median_shape[a] / sides[a])
        sides[axis] += rule.multiples[axis]
    return sides


def _normalization(fp):
    """([(key, value, why)], warnings) of the intensity keys."""
    modality = fp["modality"].get("0", "")
    stats = fp["intensity"][0]
    if fp["channels"] == 1 and modality.upper() == "CT":
        if stats["sampled_voxels"] and stats["std"] > 0 and stats["percentiles"]["99.5"] > stats["percentiles"]["0.5"]:
            low, high = stats["percentiles"]["0.5"], stats["percentiles"]["99.5"]
            where = f"of {stats['sampled_voxels']} foreground (label > 0) voxels sampled from the cases"
            return [("normalization", "ct", "modality CT: clip to the foreground's range, then z-score with its "
                     "mean and std (fingerprint.json)"),
                    ("intensity_range", [round(low, 3), round(high, 3)], f"the 0.5 and 99.5 percentiles {where}"),
                    ("intensity_mean", round(stats["mean"], 4), f"the mean {where}, before clipping"),
                    ("intensity_std", round(stats["std"], 4), f"the standard deviation {where}, before clipping")], []
        warning = "the labelled CT voxels have a single intensity (or none): z-score per image instead of ct"
        return [("normalization", "zscore", warning)], [warning]
    names = ", ".join(fp["modality"].values()) or "not given in dataset.json"
    why = (f"modality {names}: each image's channels z-scored on their own (for CT, "
           "dataset.json's \"modality\": {\"0\": \"CT\"} gives ct)")
    return [("normalization", "zscore", why)], []


def _warnings(fp):
    """Warnings about the data set: classes in no case, spacings far apart."""
    found = []
    totals = np.sum([c["class_voxels"] for c in fp["cases"]], axis=0)
    for value, count in enumerate(totals[1:], start=1):
        if count == 0:
            found.append(f"class {value} ({fp['labels'][str(value)]}) is in no case: the network cannot learn it")
    spacings = np.array([c["spacing"] for c in fp["cases"]])
    for axis in range(3):
        low, high = int(spacings[:, axis].argmin()), int(spacings[:, axis].argmax())
        if spacings[high, axis] > SPACING_SPREAD * spacings[low, axis]:
            found.append(f"spacings along {AXES[axis]} differ over {SPACING_SPREAD:g}x: {spacings[low, axis]:g} mm "
                         f"({fp['cases'][low]['image']}) and {spacings[high, axis]:g} mm "
                         f"({fp['cases'][high]['image']}); check the headers")
    return found


def _window(fp, spacing, rule):
    """(roi_size, why) from the cases' cropped shapes resampled to `spacing`."""
    resampled = [[n * s / t for n, s, t in zip(c["shape_after_crop"], c["spacing"], spacing)] for c in fp["cases"]]
    median = [float(v) for v in np.median(resampled, axis=0)]
    window = choose_window(median, rule)
    multiples = "/".join(str(m) for m in rule.multiples) if len(set(rule.multiples)) > 1 else rule.multiples[0]
    return window, (f"the median cropped shape at that spacing, {' x '.join(f'{v:.0f}' for v in median)} voxels, "
                    f"each side rounded up to a multiple of {multiples} ({rule.model}, model config {rule.config}), "
                    f"at most {MAX_SIDE}; smaller volumes are padded")


def plan_values(fp, sha256, data_dir, rule):
    """({"data": [(key, value, why)], "model": [...]}, warnings) of the plan of fingerprint `fp`."""
    cases = fp["cases"]
    if len(cases) < 2:
        raise DataConfigError(f"{data_dir}: {len(cases)} labelled case; a plan needs at least 2 (one to train on, "
                              "one to validate on)")
    spacing, spacing_why = target_spacing([c["spacing"] for c in cases], [c["shape_after_crop"] for c in cases])
    intensity, warnings = _normalization(fp)
    window, window_why = _window(fp, spacing, rule)
    splits = Counter(c["split"] for c in cases)
    data = [("name", Path(data_dir).name, "the folder's name; runs go to runs/<model>_<name>/"),
            ("data_dir", str(data_dir), "this folder, absolute, so that the plan works from any directory"),
            ("dataset_json", fp["dataset_json"], "the case lists and classes"),
            ("fingerprint", fingerprints.NAME, "what this plan was computed from; the pre-flight warns when "
             "the data changed since"),
            ("fingerprint_sha256", sha256, "the content of that fingerprint.json"),
            ("orientation", "RAS", "the axis order of the spacing and window below, as the fingerprint's"),
            ("spacing", spacing, spacing_why), *intensity,
            ("crop_foreground", True, "to the body: the box the fingerprint's shape_after_crop measured")]
    if splits["validation"]:
        split = f"the split of {fp['dataset_json']}: {splits['training']} training, {splits['validation']} validation"
    else:
        data.append(("val_fraction", VAL_FRACTION, f"{fp['dataset_json']} has no validation list: the last "
                     f"{VAL_FRACTION:.0%} of its {splits['training']} training cases validate"))
        split = None
    names = ", ".join(fp["labels"][str(k)] for k in range(len(fp["labels"])))
    model = [("in_channels", fp["channels"], "channels of every image"),
             ("out_channels", len(fp["labels"]), f"the classes of {fp['dataset_json']}: {names}"),
             ("roi_size", window, window_why)]
    return {"data": data, "model": model, "split": split, "model_config": rule.config}, warnings + _warnings(fp)


def _yaml(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a quoted YAML string, whatever the path holds
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return repr(value)


def plan_text(values, warnings, data_dir):
    lines = [f"# Plan for {data_dir}, made by `python main.py plan` (or prepare) from its fingerprint.json by",
             "# fixed rules (README, \"Your own data\"). A dataset config as it is:",
             f"#   python main.py train --data_config {Path(data_dir) / NAME} --model_config {values['model_config']}",
             "# `plan` rewrites this file: edit a copy, or override a value with --set."]
    lines += [f"# WARNING: {w}" for w in warnings]
    if values["split"]:
        lines.append(f"# Split: {values['split']}.")
    for section in ("data", "model"):
        lines.append(f"{section}:")
        for key, value, why in values[section]:
            lines += [f"  # {why}", f"  {key}: {_yaml(value)}"]
    return "\n".join(lines) + "\n"


def write_plan(folder, data_dir, fp, sha256, rule):
    """plan.yaml of fingerprint `fp` (SHA-256 `sha256`) written atomically into `folder`, naming `data_dir` as
    the data's folder (they differ while prepare builds it). Returns (path, warnings)."""
    values, warnings = plan_values(fp, sha256, data_dir, rule)
    path = Path(folder) / NAME
    with atomic_path(path) as tmp:
        Path(tmp).write_text(plan_text(values, warnings, data_dir))
    return path, warnings


def report(fp, plan_path, warnings):
    """Lines printed after planning: the fingerprint's cases, the plan and its warnings."""
    lines = [f"fingerprint: {len(fp['cases'])} labelled cases, {fp['channels']} channel(s), "
             f"modality {', '.join(fp['modality'].values()) or 'not given'}",
             f"plan written: {plan_path}"]
    return "\n".join(lines + [f"warning: {w}" for w in warnings])


def plan_folder(folder, rule, dataset_json="dataset.json"):
    """fingerprint.json and plan.yaml for the existing decathlon folder `folder` (nothing else is written
    there but the fingerprint's cache). Returns the plan's path."""
    fp, _, sha256 = fingerprints.fingerprint_folder(folder, dataset_json)
    folder = Path(folder).expanduser().resolve()
    path, warnings = write_plan(folder, folder, fp, sha256, rule)
    print(report(fp, path, warnings))
    return path
