"""The fingerprint of a decathlon folder: what `plan` needs to know of its labelled cases (the training and
validation lists; test cases are never looked at), measured once and written as fingerprint.json.

Per case, in the RAS axis order training uses (data.orientation RAS): the spacing, the shape, the shape
after cropping to the body (the box of voxels above each channel's minimum, transforms.above_minimum, the
crop the `ct` and `zscore` normalizations apply), and the voxels of each class. Per channel over the data
set: mean, standard deviation and the 0.5, 50 and 99.5 percentiles of the foreground (label > 0) voxels,
from a sample of at most SAMPLE_PER_CASE voxels per case seeded by the case's path, so memory stays bounded
and each case weighs the same; the modality comes from dataset.json ("modality" or "channel_names").
`plan DIR` caches each case's measurement per file (path, size, modification time), as the pre-flight does.
"""
import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from core.errors import DataConfigError
from core.fileio import atomic_path

from .datalist import load_json, parse_labels
from .preflight import FileCache, read_array
from .provenance import file_identity, sha256_of
from .transforms import above_minimum

NAME = "fingerprint.json"
CACHE_NAME = ".fingerprint_cache.json"
VERSION = 1
SAMPLE_PER_CASE = 10_000
SAMPLE_SEED = 0
PERCENTILES = (0.5, 50.0, 99.5)
LABELLED_SPLITS = ("training", "validation")


def _ras(values, affine):
    """Per-voxel-axis `values` of a file in the order of the RAS axes its affine maps them to."""
    out = [None] * 3
    for value, axis in zip(values, nib.orientations.io_orientation(affine)[:, 0].astype(int)):
        out[axis] = value
    return out


def _box_shape(mask):
    """Shape of the bounding box of a 3D boolean mask (which has at least one voxel set)."""
    sizes = []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        sizes.append(int(hits[-1] - hits[0] + 1))
    return sizes


def measure_case(image, affine, label, key, sample_size=SAMPLE_PER_CASE):
    """Facts of one case: `image` (X, Y, Z) or (X, Y, Z, C) as read, `label` (X, Y, Z) non-negative integer
    classes; `key` (the image's path in the folder) seeds the foreground sample. JSON-ready."""
    voxels = image.reshape(image.shape[:3] + (-1,))
    body = above_minimum(torch.from_numpy(np.moveaxis(voxels, -1, 0).astype(np.float32))).any(0).numpy()
    spacing = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(0))
    # Voxels are numbered in Fortran order whatever the array's layout, so that the sample does not depend on
    # it; NIfTI arrays as read are Fortran-ordered, and flattening them so is a view, not a strided copy.
    classes = label.ravel(order="F")
    foreground = np.flatnonzero(classes)
    rng = np.random.default_rng([SAMPLE_SEED, zlib.crc32(key.encode())])
    chosen = np.sort(rng.choice(foreground.size, size=min(foreground.size, sample_size), replace=False))
    sample = voxels[np.unravel_index(foreground[chosen], label.shape, order="F")].astype(np.float64)  # (k, C)
    return {
        "spacing": _ras([round(float(s), 6) for s in spacing], affine),
        "shape": _ras([int(n) for n in image.shape[:3]], affine),
        "shape_after_crop": _ras(_box_shape(body), affine),
        "channels": int(voxels.shape[3]),
        "class_voxels": np.bincount(classes).tolist(),
        "sample": sample.T.tolist(),
    }


def labelled_cases(folder, dataset_json):
    """(dataset.json content, [(split, image, label)]) of `folder`: its training and validation cases, paths
    relative to the folder (absolute when outside it); a missing file or key is a one-line error."""
    json_path = folder / dataset_json
    content = load_json(json_path, "dataset list")
    parse_labels(content, json_path)
    if not isinstance(content.get("training"), list) or not content["training"]:
        raise DataConfigError(f"{json_path}: key 'training' must be a non-empty list")
    cases = []
    for split in LABELLED_SPLITS:
        items = content.get(split, [])
        if not isinstance(items, list):
            raise DataConfigError(f"{json_path}: key {split!r} must be a list")
        for index, item in enumerate(items):
            where = f"{json_path}: {split}[{index}]"
            if not isinstance(item, dict) or "image" not in item or "label" not in item:
                raise DataConfigError(f"{where} must be an object with 'image' and 'label'")
            paths = [Path(os.path.normpath(folder / item[key])) for key in ("image", "label")]
            for key, path in zip(("image", "label"), paths):
                if not path.is_file():
                    raise DataConfigError(f"{where}: {key} file not found: {path}")
            cases.append((split, *(p.relative_to(folder).as_posix() if p.is_relative_to(folder) else str(p)
                                   for p in paths)))
    return content, cases


def _read_case(folder, image_rel, label_rel, sample_size):
    """measure_case of one case's files, read to their end (gzip CRC checked); faults name the file."""
    (image, voxels), (_, label) = (read_array(folder / rel) for rel in (image_rel, label_rel))
    if label.ndim == 4 and label.shape[3] == 1:
        label = label[..., 0]
    if voxels.ndim not in (3, 4) or label.shape != voxels.shape[:3]:
        raise DataConfigError(f"{folder / label_rel}: shape {label.shape} differs from its image's {voxels.shape}")
    if label.min() < 0 or (np.issubdtype(label.dtype, np.floating) and not np.array_equal(np.rint(label), label)):
        raise DataConfigError(f"{folder / label_rel}: label values must be non-negative integers")
    if not np.issubdtype(label.dtype, np.integer):
        label = label.astype(np.intp)
    return measure_case(voxels, image.affine, label, image_rel, sample_size)


def measure_folder(folder, cases, sample_size=SAMPLE_PER_CASE):
    """measure_case of every (split, image, label) of `folder`, with a progress bar; cached in the folder."""
    cache = FileCache(folder, CACHE_NAME, f"{VERSION}-{sample_size}-{SAMPLE_SEED}")

    def one(case):
        _, image, label = case
        paths = [str(folder / image), str(folder / label)]
        return cache.get("case", paths, lambda: _read_case(folder, image, label, sample_size))

    workers = max(1, min(4, os.cpu_count() or 1))  # zlib and numpy release the GIL; each holds a volume
    with ThreadPoolExecutor(workers) as pool:
        measured = list(tqdm(pool.map(one, cases), total=len(cases), desc=f"fingerprint {folder.name}", unit="case"))
    cache.save(prune=True)  # every case was looked at: entries of changed or removed files go
    return measured


def _intensities(samples, modality):
    """Statistics per channel of the pooled foreground samples [(C, k) per case]."""
    stats = []
    for channel in range(len(samples[0])):
        pool = np.concatenate([np.asarray(s[channel], dtype=np.float64) for s in samples])
        entry = {"channel": channel, "modality": modality.get(str(channel)), "sampled_voxels": int(pool.size)}
        if pool.size:
            values = np.percentile(pool, PERCENTILES)
            entry.update(mean=float(pool.mean()), std=float(pool.std()), min=float(pool.min()),
                         max=float(pool.max()), percentiles={f"{p:g}": float(v) for p, v in zip(PERCENTILES, values)})
        stats.append(entry)
    return stats


def _check_channels_and_classes(folder, cases, measured, num_classes):
    first = measured[0]["channels"]
    for (_, image, _), m in zip(cases, measured):
        if m["channels"] != first:
            raise DataConfigError(f"{folder}: cases have different numbers of channels: {first} ({cases[0][1]}) "
                                  f"and {m['channels']} ({image}); every image needs the same channels")
    for (_, _, label), m in zip(cases, measured):
        if len(m["class_voxels"]) > num_classes and any(m["class_voxels"][num_classes:]):
            value = num_classes + next(i for i, n in enumerate(m["class_voxels"][num_classes:]) if n)
            raise DataConfigError(f"{folder / label}: label value {value} outside dataset.json's classes "
                                  f"0..{num_classes - 1}")


def build_fingerprint(folder, dataset_json, content, cases, measured, sample_size=SAMPLE_PER_CASE):
    """The fingerprint (JSON-ready) of `cases` [(split, image, label)] of `folder` and their measurements
    (sampled with at most `sample_size` foreground voxels per case)."""
    labels = parse_labels(content, folder / dataset_json)
    _check_channels_and_classes(folder, cases, measured, len(labels))
    modality = content.get("modality") or content.get("channel_names") or {}
    modality = {str(k): str(v) for k, v in modality.items()} if isinstance(modality, dict) else {}
    entries = []
    for (split, image, label), m in zip(cases, measured):
        counts = (m["class_voxels"] + [0] * len(labels))[: len(labels)]
        entries.append({"image": image, "label": label, "split": split,
                        "files": {name: file_identity(folder / name) for name in (image, label)},
                        **{k: m[k] for k in ("spacing", "shape", "shape_after_crop", "channels")},
                        "class_voxels": counts})
    return {
        "version": VERSION,
        "dataset_json": dataset_json,
        "labels": {str(k): v for k, v in labels.items()},
        "modality": modality,
        "axes": "spacing (mm) and shapes (voxels) in RAS order, the order of data.spacing and model.roi_size",
        "crop": "shape_after_crop: bounding box of the voxels above each channel's minimum",
        "sample": {"voxels": "foreground (label > 0)", "per_case": sample_size, "seed": SAMPLE_SEED},
        "channels": measured[0]["channels"],
        "intensity": _intensities([m["sample"] for m in measured], modality),
        "cases": entries,
    }


def write_fingerprint(folder, fingerprint):
    """fingerprint.json in `folder`, written atomically; returns (path, its SHA-256)."""
    path = Path(folder) / NAME
    head = json.dumps({k: v for k, v in fingerprint.items() if k != "cases"}, indent=1)
    cases = ",\n".join(f"  {json.dumps(case)}" for case in fingerprint["cases"])  # a line per case
    with atomic_path(path) as tmp:
        Path(tmp).write_text(f'{head[:-2]},\n "cases": [\n{cases}\n ]\n}}\n')
    return path, sha256_of(path)


def fingerprint_folder(folder, dataset_json="dataset.json", sample_size=SAMPLE_PER_CASE):
    """Measure the labelled cases of the decathlon folder `folder` (cached), write its fingerprint.json;
    returns (fingerprint, path, SHA-256). Nothing else in the folder is touched."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise DataConfigError(f"{folder}: folder not found")
    content, cases = labelled_cases(folder, dataset_json)
    measured = measure_folder(folder, cases, sample_size)
    fingerprint = build_fingerprint(folder, dataset_json, content, cases, measured, sample_size)
    return (fingerprint, *write_fingerprint(folder, fingerprint))
