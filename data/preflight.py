"""Pre-flight of a data set before any model is built: every case is opened once, and all problems are
reported together, one line each, naming the list, index, file and reason.

Checked: the image is a readable NIfTI, 3D (or 4D with data.in_channels volumes); its label has the same
shape and the same affine (within AFFINE_TOLERANCE_MM), and integer values in 0..out_channels-1; the image
intensities are finite (with data.check_intensities, which reads the voxels). Headers are read for every
file; voxel data only where a check needs it, and what was learnt from it is cached per file (path, size,
modification time) in <data_dir>/.preflight_cache.json, so a repeated run reads only new or changed files.
"""
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from fileio import atomic_path

from .datalist import SHOWN, DataConfigError, read_datalist

AFFINE_TOLERANCE_MM = 1e-3  # image and label affines may differ by float rounding, not by a voxel shift
CACHE_NAME = ".preflight_cache.json"
CACHE_VERSION = 1


def _file_key(path):
    st = os.stat(path)
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


def _voxel_facts(path, kind):
    """Reads the voxels: for a label its distinct values (and whether all are integers), for an image
    whether every value is finite."""
    array = np.asanyarray(nib.load(path).dataobj)
    if kind == "label":
        values = np.unique(array)
        return {"integer": bool(np.all(np.mod(values, 1) == 0)) if np.issubdtype(values.dtype, np.floating)
                else True, "values": [float(v) for v in values[:1000]], "count": int(values.size)}
    finite = np.isfinite(array) if np.issubdtype(array.dtype, np.floating) else np.ones((), bool)
    return {"finite": bool(finite.all()), "nonfinite": int(finite.size - finite.sum()) if finite.ndim else 0}


class _Cache:
    def __init__(self, folder):
        self.path = Path(folder) / CACHE_NAME if folder is not None else None
        self.entries, self.changed = {}, False
        if self.path is not None and self.path.is_file():
            try:
                content = json.loads(self.path.read_text())
                if content.get("version") == CACHE_VERSION:
                    self.entries = content["entries"]
            except (OSError, ValueError, KeyError, AttributeError):
                self.entries = {}  # an unreadable cache is rebuilt

    def facts(self, path, kind):
        key = f"{kind}|{_file_key(path)}"
        if key not in self.entries:
            self.entries[key] = _voxel_facts(path, kind)
            self.changed = True
        return self.entries[key]

    def save(self):
        if self.path is None or not self.changed:
            return
        try:
            with atomic_path(self.path) as tmp:
                Path(tmp).write_text(json.dumps({"version": CACHE_VERSION, "entries": self.entries}))
        except OSError:
            pass  # a read-only data folder: the checks still ran, the next run repeats them


def _header(path):
    """(shape, affine) of a NIfTI file, or raises ValueError with a short reason."""
    try:
        img = nib.load(path)
    except Exception as err:  # nibabel raises several types for truncated or foreign files
        raise ValueError(f"not a readable NIfTI file ({_first_line(err)})") from None
    return tuple(int(n) for n in img.shape), np.asarray(img.affine, dtype=np.float64)


def _first_line(err):
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_case(image, label, in_channels, out_channels, check_intensities, cache):
    """Problems of one case (a list of reasons; empty when the case is usable)."""
    problems = []
    try:
        shape, affine = _header(image)
    except ValueError as err:
        return [f"image {image}: {err}"]
    spatial = shape[:3]
    if len(shape) == 3 and in_channels != 1:
        problems.append(f"image {image}: 3D with one channel, but model.in_channels is {in_channels}")
    elif len(shape) == 4 and shape[3] != in_channels:
        problems.append(f"image {image}: 4D with {shape[3]} volumes, but model.in_channels is {in_channels}")
    elif len(shape) not in (3, 4):
        problems.append(f"image {image}: {len(shape)}D of shape {shape}; expected a 3D volume "
                        "(or 4D with model.in_channels volumes)")
        return problems
    if min(shape) < 1:
        problems.append(f"image {image}: empty, shape {shape}")
    if check_intensities:
        try:
            facts = cache.facts(image, "image")
            if not facts["finite"]:
                problems.append(f"image {image}: {facts['nonfinite']} voxels are NaN or infinite")
        except Exception as err:
            problems.append(f"image {image}: voxel data unreadable (truncated?): {_first_line(err)}")
    if label is None:
        return problems
    try:
        label_shape, label_affine = _header(label)
    except ValueError as err:
        return problems + [f"label {label}: {err}"]
    label_spatial = label_shape[:3] if len(label_shape) == 3 or label_shape[3:] == (1,) else label_shape
    if label_spatial != spatial:
        problems.append(f"label {label}: shape {label_shape} differs from its image's {shape}")
    elif not np.allclose(label_affine, affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
        worst = float(np.abs(label_affine - affine).max())
        problems.append(f"label {label}: affine differs from its image's by up to {worst:.3g} mm "
                        f"(tolerance {AFFINE_TOLERANCE_MM} mm); the label would lie off the anatomy")
    try:
        facts = cache.facts(label, "label")
    except Exception as err:
        return problems + [f"label {label}: voxel data unreadable (truncated?): {_first_line(err)}"]
    values = facts["values"]
    if not facts["integer"]:
        fractional = [v for v in values if v % 1][:3]
        problems.append(f"label {label}: non-integer values (e.g. {', '.join(f'{v:g}' for v in fractional)})")
    outside = [v for v in values if v < 0 or v > out_channels - 1]
    if outside:
        problems.append(f"label {label}: values {', '.join(f'{v:g}' for v in outside[:5])} outside the classes "
                        f"0..{out_channels - 1} (model.out_channels {out_channels})")
    return problems


def _report(failures, what):
    lines = [f"  {where}: {reason}" for where, reason in failures[:SHOWN]]
    if len(failures) > SHOWN:
        lines.append(f"  ... and {len(failures) - SHOWN} more")
    return DataConfigError(f"{what} found {len(failures)} problem(s):\n" + "\n".join(lines))


def _run(cases, cfg, cache_dir):
    """cases: [(where, image, label or None)] -> [(where, reason)] in the order of `cases`."""
    model, d = cfg["model"], cfg["data"]
    cache = _Cache(cache_dir)
    workers = max(1, min(8, os.cpu_count() or 1))  # zlib and file reads release the GIL

    def one(case):
        where, image, label = case
        return [(where, reason) for reason in check_case(image, label, model["in_channels"], model["out_channels"],
                                                         d["check_intensities"], cache)]

    with ThreadPoolExecutor(workers) as pool:
        failures = [f for found in pool.map(one, cases) for f in found]
    cache.save()
    return failures


def check_datalist(cfg, splits=("training", "validation")):
    """Check every case of `splits`; raises DataConfigError listing all problems (up to SHOWN)."""
    lists = read_datalist(cfg)
    cases = [(f"{split}[{i}]", e["image"], e.get("label")) for split in splits for i, e in enumerate(lists[split])]
    failures = _run(cases, cfg, cfg["data"]["data_dir"])
    if failures:
        raise _report(failures, f"data pre-flight of {cfg['data']['data_dir']} ({', '.join(splits)})")
    return len(cases)


def check_images(cfg, paths):
    """The image checks (readable, dimensions, finite intensities) on unlabelled inputs, e.g. for predict."""
    cases = [(f"input[{i}]", str(p), None) for i, p in enumerate(paths)]
    failures = _run(cases, {**cfg, "data": {**cfg["data"], "check_intensities": True}}, None)
    if failures:
        raise _report(failures, "input check")
    return len(cases)
