"""`main.py prepare`: from a downloaded archive to the decathlon folder the dataset configs expect.

    synapse  the BTCV abdomen archive (RawData/Training/img/img00XX.nii.gz, .../label/label00XX.nii.gz):
             18 training (4 of them validation) and the 12 test cases of TransUNet's split, 8 organs
    btcv     the same archive, all 13 organs, Swin UNETR's split (validation img0035-img0040) and the
             20 unlabelled RawData/Testing scans as the test list
    msd      a Medical Segmentation Decathlon task folder (Task09_Spleen, ...), with a validation list added

Images are hard-linked (copied where links are impossible) unchanged; labels are rewritten as uint8 with the
protocol's remap and the label file's own header. Every case is checked first (readable, 3D, same shape and
affine as its image, label values in range, finite intensities); the first bad case stops with one line.
The labelled training and validation cases are measured on the way for fingerprint.json (fingerprint.py),
and plan.yaml (plan.py) is written from it for the model main.py names. The folder is built in a temporary
sibling and renamed into place when complete. Never imported by training.
"""
import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from core.errors import DataConfigError

from . import fingerprint as fingerprints
from . import plan as plans
from .datalist import hold_out_validation, parse_labels
from .preflight import read_array

# The 13 organs of the BTCV abdomen challenge, by label value in its label files.
BTCV_ORGANS = {
    1: "spleen", 2: "right_kidney", 3: "left_kidney", 4: "gallbladder", 5: "esophagus", 6: "liver",
    7: "stomach", 8: "aorta", 9: "inferior_vena_cava", 10: "portal_and_splenic_vein", 11: "pancreas",
    12: "right_adrenal_gland", 13: "left_adrenal_gland",
}
BTCV_LABELLED = tuple(range(1, 11)) + tuple(range(21, 41))  # the 30 labelled scans of RawData/Training
SYNAPSE_TEST = (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38)  # TransUNet's 12 test cases
# Validation for the `synapse` protocol: 4 of the 18 training cases, spread over the scan numbers.
SYNAPSE_VALIDATION = (6, 24, 31, 39)
BTCV_VALIDATION = tuple(range(35, 41))  # Swin UNETR's dataset_0.json

# Synapse label protocols: output class -> BTCV label value.
SYNAPSE_LABELS = {
    # TransUNet/nnFormer/UNETR++ and the EM-Net paper's per-organ table: pancreas, not the esophagus.
    "standard": {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 7, 7: 8, 8: 11},
    # The EM-Net reference's dataset.json taken literally: BTCV labels 1-8 (esophagus, no pancreas).
    "btcv8": {k: k for k in range(1, 9)},
}
LABEL_PROTOCOLS = tuple(SYNAPSE_LABELS)
DATASETS = ("synapse", "btcv", "msd")
DEFAULT_VAL_FRACTION = 0.2
BTCV_JSON = "dataset_0.json"  # Swin UNETR's name for the BTCV list, which configs/datasets/btcv.yaml reads
PARTIAL, OLD = "partial", "old"  # hidden siblings of the output: .<name>.partial-<pid>-*, .<name>.old-<pid>-*
AFFINE_TOLERANCE = 1e-3  # mm (translation) and matrix entries: label and image affines must agree this well


@dataclass
class Case:
    image: Path
    label: Path | None  # None: an unlabelled test image
    split: str
    image_out: str  # relative to the output folder
    label_out: str | None


@dataclass
class Preparation:
    title: str
    cases: list
    class_names: list  # index = class value
    remap: np.ndarray | None  # lookup table raw value -> class; None keeps values (then in 0..len(class_names)-1)
    raw_label_max: int
    json_name: str
    json_extra: dict


# ---- layouts ----------------------------------------------------------------------------------------------


def _btcv_training_dir(raw):
    """RawData/Training under `raw`, which may be the archive root, RawData or RawData/Training itself."""
    raw = Path(raw).expanduser()
    if not raw.is_dir():
        raise DataConfigError(f"--raw {raw}: folder not found")
    for candidate in (raw / "RawData" / "Training", raw / "Training", raw):
        if (candidate / "img").is_dir() and (candidate / "label").is_dir():
            return candidate.resolve()
    raise DataConfigError(f"--raw {raw}: no RawData/Training/img and RawData/Training/label under it "
                          "(unpack RawData.zip of the BTCV abdomen challenge and point --raw at it)")


def _btcv_case(training, number, split, folder):
    image = training / "img" / f"img{number:04d}.nii.gz"
    label = training / "label" / f"label{number:04d}.nii.gz"
    for path in (image, label):
        if not path.is_file():
            raise DataConfigError(f"{path} not found: RawData/Training of the BTCV archive holds img0001-img0010 "
                                  "and img0021-img0040 with their labels")
    return Case(image, label, split, f"images{folder}/{image.name}", f"labels{folder}/{label.name}")


def _remap_table(mapping):
    table = np.zeros(max(BTCV_ORGANS) + 1, dtype=np.uint8)
    for out_class, btcv_value in mapping.items():
        table[btcv_value] = out_class
    return table


def synapse_preparation(raw, labels="standard"):
    if labels not in SYNAPSE_LABELS:
        raise DataConfigError(f"--labels {labels!r}: choose one of {', '.join(LABEL_PROTOCOLS)}")
    training = _btcv_training_dir(raw)
    cases = []
    for number in BTCV_LABELLED:
        if number in SYNAPSE_TEST:
            cases.append(_btcv_case(training, number, "test", "Ts"))
        else:
            split = "validation" if number in SYNAPSE_VALIDATION else "training"
            cases.append(_btcv_case(training, number, split, "Tr"))
    mapping = SYNAPSE_LABELS[labels]
    names = ["background"] + [BTCV_ORGANS[mapping[c]] for c in sorted(mapping)]
    validation = ", ".join(f"img{n:04d}" for n in SYNAPSE_VALIDATION)
    extra = {"name": "Synapse", "modality": {"0": "CT"},
             "description": f"BTCV abdomen (Synapse multi-organ), {labels} labels: {', '.join(names[1:])}; "
                            f"18 training (validation {validation}) and the 12 TransUNet test cases"}
    return Preparation(f"synapse ({labels} labels)", cases, names, _remap_table(mapping), max(BTCV_ORGANS),
                "dataset.json", extra)


def btcv_preparation(raw, json_name=BTCV_JSON):
    training = _btcv_training_dir(raw)
    testing = training.parent / "Testing" / "img"
    if not testing.is_dir():
        raise DataConfigError(f"{testing} not found: the btcv protocol lists the unlabelled RawData/Testing scans")
    cases = [_btcv_case(training, n, "validation" if n in BTCV_VALIDATION else "training", "Tr")
             for n in BTCV_LABELLED]
    scans = sorted(p for p in testing.iterdir() if p.name.startswith("img") and p.name.endswith(".nii.gz"))
    cases += [Case(p, None, "test", f"imagesTs/{p.name}", None) for p in scans]
    names = ["background"] + [BTCV_ORGANS[v] for v in sorted(BTCV_ORGANS)]
    extra = {"name": "BTCV", "modality": {"0": "CT"},
             "description": "BTCV abdomen, 13 organs; Swin UNETR's split (validation img0035-img0040); the test "
                            "list holds the challenge's unlabelled scans"}
    return Preparation("btcv (13 organs)", cases, names, None, len(names) - 1, json_name, extra)


def _relative(value, where):
    path = Path(str(value))
    if path.is_absolute() or ".." in path.parts:
        raise DataConfigError(f"{where}: path {value!r} must be relative and inside the task folder")
    return path.as_posix().removeprefix("./")


def msd_preparation(raw, val_fraction=DEFAULT_VAL_FRACTION):
    if not Path(raw).expanduser().is_dir():
        raise DataConfigError(f"--raw {raw}: folder not found")
    task = Path(raw).expanduser().resolve()
    json_path = task / "dataset.json"
    if not json_path.is_file():
        raise DataConfigError(f"--raw {raw}: no dataset.json (point --raw at an MSD task folder, e.g. Task09_Spleen)")
    try:
        content = json.loads(json_path.read_text())
    except json.JSONDecodeError as err:
        raise DataConfigError(f"{json_path} is not valid JSON: {err}") from None
    if not isinstance(content, dict):
        raise DataConfigError(f"{json_path} must hold a JSON object")
    names = [name for _, name in sorted(parse_labels(content, json_path).items())]
    lists = hold_out_validation(content, val_fraction)
    cases = []
    for split in ("training", "validation", "test"):
        items = lists.get(split, [])
        if not isinstance(items, list) or (split == "training" and not items):
            raise DataConfigError(f"{json_path}: key {split!r} must be a non-empty list" if split == "training"
                                  else f"{json_path}: key {split!r} must be a list")
        for index, item in enumerate(items):
            where = f"{json_path}: {split}[{index}]"
            if isinstance(item, str):
                item = {"image": item}
            needed = ("image",) if split == "test" else ("image", "label")
            if not isinstance(item, dict) or any(key not in item for key in needed):
                raise DataConfigError(f"{where} must be an object with {' and '.join(repr(k) for k in needed)}")
            image = _relative(item["image"], where)
            label = _relative(item["label"], where) if "label" in item else None
            for rel in filter(None, (image, label)):
                if not (task / rel).is_file():
                    raise DataConfigError(f"{where}: file not found: {task / rel}")
            cases.append(Case(task / image, task / label if label else None, split, image, label))
    extra = {k: v for k, v in content.items() if k not in ("training", "validation", "test")}
    return Preparation(f"msd {task.name}", cases, names, None, len(names) - 1, "dataset.json", extra)


# ---- checks and writing -----------------------------------------------------------------------------------


def _read(path):
    """(image, 3D array) of a NIfTI file read to its end (gzip CRC checked), or a one-line error naming it."""
    img, array = read_array(path)
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise DataConfigError(f"{path}: shape {array.shape} is not a 3D volume")
    return img, array


def _check_image(path):
    img, array = _read(path)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = np.count_nonzero(~np.isfinite(array))
        raise DataConfigError(f"{path}: holds {bad} non-finite intensities (NaN or inf)")
    return img, array


def _check_label(path, image_path, image, shape, raw_max):
    label, values = _read(path)
    if values.shape != shape:
        raise DataConfigError(f"{path}: shape {values.shape} differs from its image {image_path} {shape}")
    gap = float(np.max(np.abs(label.affine - image.affine)))
    if not gap <= AFFINE_TOLERANCE:
        raise DataConfigError(f"{path}: affine differs from that of its image {image_path} by {gap:.3g} "
                              f"(tolerance {AFFINE_TOLERANCE})")
    rounded = np.rint(values)
    if not np.array_equal(rounded, values):
        raise DataConfigError(f"{path}: holds non-integer label values")
    low, high = int(rounded.min()), int(rounded.max())
    if low < 0 or high > raw_max:
        bad = low if low < 0 else high
        raise DataConfigError(f"{path}: label value {bad} outside the protocol's range 0..{raw_max}")
    return label, rounded.astype(np.int64)


def _place_image(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # no second copy of gigabytes of CT
    except OSError:
        shutil.copyfile(src, dst)


def _write_label(values, label, dst):
    out = nib.Nifti1Image(values.astype(np.uint8), None, header=label.header)  # affine, qform, sform kept
    out.set_data_dtype(np.uint8)
    dst.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, str(dst))


def _prepare_into(prep, folder):
    """Check and write every case into `folder`, measuring the labelled training and validation cases for the
    fingerprint (read once for both); returns the statistics for the summary and the fingerprint's inputs."""
    n_classes = len(prep.class_names)
    stats = {"shapes": [], "spacings": [], "voxels": np.zeros(n_classes, dtype=np.int64), "measured": []}
    lists = {"training": [], "validation": [], "test": []}
    for case in tqdm(prep.cases, desc=f"prepare {prep.title}", unit="case"):
        image, array = _check_image(case.image)
        stats["shapes"].append(array.shape)
        stats["spacings"].append(tuple(float(z) for z in image.header.get_zooms()[:3]))
        entry = {"image": f"./{case.image_out}"}
        if case.label is not None:
            label, values = _check_label(case.label, case.image, image, array.shape, prep.raw_label_max)
            if prep.remap is not None:
                values = prep.remap[values]
            stats["voxels"] += np.bincount(values.ravel(), minlength=n_classes)[:n_classes]
            if case.split in fingerprints.LABELLED_SPLITS:
                stats["measured"].append(((case.split, case.image_out, case.label_out),
                                          fingerprints.measure_case(array, image.affine, values, case.image_out)))
            _write_label(values, label, folder / case.label_out)
            entry["label"] = f"./{case.label_out}"
        _place_image(case.image, folder / case.image_out)
        lists[case.split].append(entry)
    content = {**prep.json_extra, "labels": {str(i): n for i, n in enumerate(prep.class_names)},
               "numTraining": len(lists["training"]) + len(lists["validation"]), "numTest": len(lists["test"]),
               **lists}
    (folder / prep.json_name).write_text(json.dumps(content, indent=2) + "\n")
    stats["lists"], stats["content"] = lists, content
    return stats


def _fingerprint_and_plan(prep, stats, folder, out, window_rule):
    """fingerprint.json (and plan.yaml when a model's window rule is given) of the folder being built."""
    cases, measured = zip(*stats["measured"])
    fp = fingerprints.build_fingerprint(folder, prep.json_name, stats["content"], list(cases), list(measured))
    _, sha256 = fingerprints.write_fingerprint(folder, fp)
    if window_rule is None:
        return None
    path, warnings = plans.write_plan(folder, out, fp, sha256, window_rule)
    return plans.report(fp, out / path.name, warnings)


def summary_table(prep, stats, out):
    lines = [f"prepared {prep.title} in {out}"]
    for split, items in stats["lists"].items():
        lines.append(f"  {split:<12}{len(items):>5} cases")
    shapes, spacings = np.array(stats["shapes"]), np.array(stats["spacings"])
    shape = " x ".join(f"{lo}-{hi}" for lo, hi in zip(shapes.min(0), shapes.max(0)))
    spacing = " x ".join(f"{lo:.2f}-{hi:.2f}" for lo, hi in zip(spacings.min(0), spacings.max(0)))
    lines += [f"  shape        {shape} voxels", f"  spacing      {spacing} mm"]
    width = max(len(n) for n in prep.class_names)
    lines.append(f"  {'class':<{width}}  {'voxels (labelled cases)':>24}")
    for index, (name, count) in enumerate(zip(prep.class_names, stats["voxels"])):
        lines.append(f"  {index:>2} {name:<{width}}  {int(count):>21,}")
    return "\n".join(lines)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _clean_stale(out):
    """Remove what a killed `prepare` of `out` left beside it: partial folders, and an old output it had
    moved aside (put back where the new one never arrived). Folders of a live process are left alone."""
    for path in out.parent.glob(f".{out.name}.*-*"):
        kind, _, rest = path.name.removeprefix(f".{out.name}.").partition("-")
        pid = rest.split("-")[0]
        if kind not in (PARTIAL, OLD) or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == OLD and not out.exists() and (path / out.name).is_dir():
            os.rename(path / out.name, out)
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_cleans_up():
    """SIGTERM ends `prepare` as SystemExit(143), so that its cleanup runs (a handler lives in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _build(dataset, raw, labels, val_fraction, json_name):
    if dataset == "synapse":
        return synapse_preparation(raw, labels)
    if dataset == "btcv":
        return btcv_preparation(raw, json_name)
    if not 0.0 < val_fraction < 1.0:
        raise DataConfigError(f"--val_fraction {val_fraction}: it must lie in (0, 1)")
    return msd_preparation(raw, val_fraction)


def prepare(dataset, raw, out, labels="standard", force=False, val_fraction=DEFAULT_VAL_FRACTION,
            json_name=BTCV_JSON, window_rule=None):
    """Build the decathlon folder `out` of `dataset` from `raw`, with its fingerprint.json, and its plan.yaml
    for the model whose plan.WindowRule `window_rule` is; returns the output folder. `json_name` is the
    list's file name for btcv; `val_fraction` the validation share for msd tasks without a list."""
    if dataset not in DATASETS:
        raise DataConfigError(f"dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    if labels != "standard" and dataset != "synapse":
        raise DataConfigError(f"--labels applies to synapse only, not {dataset}")
    out = Path(out).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    if out.exists() and not force:
        raise DataConfigError(f"{out} exists; pass --force to replace it")
    prep = _build(dataset, raw, labels, val_fraction, json_name)
    pid = os.getpid()
    with _sigterm_cleans_up():
        building = Path(tempfile.mkdtemp(prefix=f".{out.name}.{PARTIAL}-{pid}-", dir=out.parent))
        try:
            stats = _prepare_into(prep, building)
            planned = _fingerprint_and_plan(prep, stats, building, out, window_rule)
            building.chmod(0o755)  # mkdtemp makes it private
            if out.exists():
                replaced = Path(tempfile.mkdtemp(prefix=f".{out.name}.{OLD}-{pid}-", dir=out.parent))
                os.rename(out, replaced / out.name)
                os.rename(building, out)
                shutil.rmtree(replaced)
            else:
                os.rename(building, out)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    print(summary_table(prep, stats, out))
    if planned:
        print(planned)
    return out
