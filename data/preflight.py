"""Pre-flight of a data set before any model is built: every case is opened once, and all problems are
reported together, one line each, naming the list, index, file and reason.

Checked: every listed file exists; the image is a readable NIfTI whose compressed stream is intact to its
end (gzip's CRC and length: nibabel reads only the bytes it needs, so bytes changed in the middle would
otherwise decode to wrong voxels without a word); 3D (or 4D with model.in_channels volumes); finite
intensities (with data.check_intensities); its label has the same shape and affine (within
AFFINE_TOLERANCE_MM), an intact stream and integer values in 0..out_channels-1. What was learnt from a
file's voxels is cached per file (path, size, modification time) in <data_dir>/.preflight_cache.json, so a
repeated run reads only new or changed files. A config made by `main.py plan` is also checked against the
data its fingerprint describes (provenance.py): a changed data set is a warning, not an error.
"""
import gzip
import json
import os
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from core.errors import DataConfigError, first_line
from core.fileio import atomic_path

from .datalist import collect_datalist, problem_report
from .provenance import stale_plan

AFFINE_TOLERANCE_MM = 1e-3  # image and label affines may differ by float rounding, not by a voxel shift
CACHE_NAME = ".preflight_cache.json"
CACHE_VERSION = 2  # 2: facts come from streams read to their end


def read_verified(path):
    """A NIfTI image read from its whole file: a .gz stream is decompressed to its end, so that gzip's CRC
    and length checks run. Raises ValueError with a short reason for a corrupt or unreadable file."""
    path = os.fspath(path)
    if not path.endswith(".gz"):
        return nib.load(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile (CRC, length) is an OSError
        raise ValueError(f"compressed data corrupt or truncated ({first_line(err)})") from None
    try:
        return nib.Nifti1Image.from_bytes(raw)
    except Exception:  # noqa: BLE001  (not NIfTI-1: try NIfTI-2, whose errors are reported)
        return nib.Nifti2Image.from_bytes(raw)


def read_array(path):
    """(image, voxel array) of a NIfTI file read to its end, or a DataConfigError naming it."""
    try:
        img = read_verified(path)
        return img, np.asanyarray(img.dataobj)
    except Exception as err:  # noqa: BLE001  (nibabel, gzip and zlib raise many kinds; all mean the same here)
        raise DataConfigError(f"{path}: not a readable NIfTI file ({first_line(err)})") from None


def _voxel_facts(path, kind):
    """Reads the whole file: for a label its distinct values (and whether all are integers), for an image
    whether every value is finite."""
    array = np.asanyarray(read_verified(path).dataobj)
    if kind == "label":
        values = np.unique(array)
        return {"integer": bool(np.all(np.mod(values, 1) == 0)) if np.issubdtype(values.dtype, np.floating)
                else True, "values": [float(v) for v in values[:1000]], "count": int(values.size)}
    finite = np.isfinite(array) if np.issubdtype(array.dtype, np.floating) else np.ones((), bool)
    return {"finite": bool(finite.all()), "nonfinite": int(finite.size - finite.sum()) if finite.ndim else 0}


class FileCache:
    """What was learnt from files' contents, as JSON in `folder`/`name` (nothing kept when `folder` is None),
    keyed by each file's path, size and modification time: a changed file is read again. Entries of another
    `version` are dropped."""

    def __init__(self, folder, name=CACHE_NAME, version=CACHE_VERSION):
        self.path = Path(folder) / name if folder is not None else None
        self.version = version
        self.entries, self.changed, self.used = {}, False, set()
        if self.path is not None and self.path.is_file():
            try:
                content = json.loads(self.path.read_text())
                if content.get("version") == version:
                    self.entries = content["entries"]
            except (OSError, ValueError, KeyError, AttributeError):
                self.entries = {}  # an unreadable cache is rebuilt

    def get(self, kind, paths, compute):
        """The cached facts of `kind` about the files `paths`, or compute() stored as them."""
        stats = [os.stat(path) for path in paths]
        key = "|".join([kind] + [f"{path}|{st.st_size}|{st.st_mtime_ns}" for path, st in zip(paths, stats)])
        if key not in self.entries:
            self.entries[key] = compute()
            self.changed = True
        self.used.add(key)
        return self.entries[key]

    def facts(self, path, kind):
        return self.get(kind, [path], lambda: _voxel_facts(path, kind))

    def save(self, prune=False):
        """Write the cache if anything was added; with `prune`, keep only the entries used since it was read
        (for callers that look at every file each time, so that changed files leave no stale entries)."""
        if prune and self.used != set(self.entries):
            self.entries = {k: v for k, v in self.entries.items() if k in self.used}
            self.changed = True
        if self.path is None or not self.changed:
            return
        try:
            with atomic_path(self.path) as tmp:
                Path(tmp).write_text(json.dumps({"version": self.version, "entries": self.entries}))
        except OSError:
            pass  # a read-only data folder: the work was done, the next run repeats it


def _header(path):
    """(shape, affine) of a NIfTI file, or raises ValueError with a short reason."""
    try:
        img = nib.load(path)
    except Exception as err:  # nibabel raises several types for truncated or foreign files
        raise ValueError(f"not a readable NIfTI file ({first_line(err)})") from None
    return tuple(int(n) for n in img.shape), np.asarray(img.affine, dtype=np.float64)


def _facts(cache, path, kind):
    """(facts, None) or (None, reason) when the voxel data cannot be read to the end."""
    try:
        return cache.facts(path, kind), None
    except Exception as err:  # noqa: BLE001  (zlib, gzip and nibabel raise many kinds; all mean the same here)
        return None, f"{kind} {path}: voxel data unreadable: {first_line(err)}"


def _image_problems(image, in_channels, check_intensities, cache):
    """(problems, (shape, affine) or None) of one image."""
    try:
        shape, affine = _header(image)
    except ValueError as err:
        return [f"image {image}: {err}"], None
    if len(shape) not in (3, 4):
        return [f"image {image}: {len(shape)}D of shape {shape}; expected a 3D volume (or 4D with "
                "model.in_channels volumes)"], None
    problems = []
    if len(shape) == 3 and in_channels != 1:
        problems.append(f"image {image}: 3D with one channel, but model.in_channels is {in_channels}")
    elif len(shape) == 4 and shape[3] != in_channels:
        problems.append(f"image {image}: 4D with {shape[3]} volumes, but model.in_channels is {in_channels}")
    if min(shape) < 1:
        problems.append(f"image {image}: empty, shape {shape}")
    facts, unreadable = _facts(cache, image, "image")
    if unreadable:
        problems.append(unreadable)
    elif check_intensities and not facts["finite"]:
        problems.append(f"image {image}: {facts['nonfinite']} voxels are NaN or infinite")
    return problems, (shape, affine)


def _label_problems(label, image_shape, image_affine, out_channels, cache):
    try:
        label_shape, label_affine = _header(label)
    except ValueError as err:
        return [f"label {label}: {err}"]
    problems = []
    label_spatial = label_shape[:3] if len(label_shape) == 3 or label_shape[3:] == (1,) else label_shape
    if label_spatial != image_shape[:3]:
        problems.append(f"label {label}: shape {label_shape} differs from its image's {image_shape}")
    elif not np.allclose(label_affine, image_affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
        worst = float(np.abs(label_affine - image_affine).max())
        problems.append(f"label {label}: affine differs from its image's by up to {worst:.3g} mm "
                        f"(tolerance {AFFINE_TOLERANCE_MM} mm); the label would lie off the anatomy")
    facts, unreadable = _facts(cache, label, "label")
    if unreadable:
        return problems + [unreadable]
    values = facts["values"]
    if not facts["integer"]:
        fractional = [v for v in values if v % 1][:3]
        problems.append(f"label {label}: non-integer values (e.g. {', '.join(f'{v:g}' for v in fractional)})")
    outside = [v for v in values if v < 0 or v > out_channels - 1]
    if outside:
        problems.append(f"label {label}: values {', '.join(f'{v:g}' for v in outside[:5])} outside the classes "
                        f"0..{out_channels - 1} (model.out_channels {out_channels})")
    return problems


def check_case(image, label, in_channels, out_channels, check_intensities, cache):
    """Problems of one case (a list of reasons; empty when the case is usable). `label` may be None."""
    problems, header = _image_problems(image, in_channels, check_intensities, cache)
    if label is None or header is None:
        return problems
    return problems + _label_problems(label, *header, out_channels, cache)


def _run(cases, in_channels, out_channels, check_intensities, cache_dir):
    """cases: [(where, image, label or None)] -> [(where, reason)] in the order of `cases`."""
    cache = FileCache(cache_dir)
    workers = max(1, min(8, os.cpu_count() or 1))  # zlib and file reads release the GIL

    def one(case):
        where, image, label = case
        reasons = check_case(image, label, in_channels, out_channels, check_intensities, cache)
        return [(where, reason) for reason in reasons]

    with ThreadPoolExecutor(workers) as pool:
        failures = [f for found in pool.map(one, cases) for f in found]
    cache.save()
    return failures


def check_datalist(d, in_channels, out_channels, splits=("training", "validation")):
    """Check every case of `splits` of the data section `d` (its files exist, read and fit together) and that
    the test list's files exist; raises DataConfigError listing all problems (up to SHOWN). Returns the number
    of cases checked. A plan whose data changed since its fingerprint (data.fingerprint) is a one-line
    warning on stderr."""
    lists, missing, _ = collect_datalist(d, out_channels)
    stale = stale_plan(d, lists)
    if stale:
        print(f"warning: {stale}", file=sys.stderr)
    cases = [(f"{split}[{i}]", e["image"], e.get("label") if os.path.isfile(e.get("label", "")) else None)
             for split in splits for i, e in enumerate(lists[split]) if os.path.isfile(e["image"])]
    # Missing files of the test list too: a run is tested after training, which should not be wasted on it.
    missing = [(where, reason) for where, reason in missing if where.split("[")[0] in (*splits, "test")]
    failures = missing + _run(cases, in_channels, out_channels, d["check_intensities"], d["data_dir"])
    if failures:
        raise problem_report(failures, f"data pre-flight of {d['data_dir']} ({', '.join(splits)})")
    return len(cases)


def check_images(paths, in_channels):
    """The image checks (readable, intact, dimensions, finite intensities) of unlabelled inputs (predict)."""
    cases = [(f"input[{i}]", str(p), None) for i, p in enumerate(paths)]
    failures = _run(cases, in_channels, 2, True, None)
    if failures:
        raise problem_report(failures, "input check")
    return len(cases)
