"""Inference and evaluation: one loop for every data set.

evaluate(cfg, checkpoint): sliding-window inference on the labelled test (or validation) cases, predictions
mapped back to each image's original geometry and compared there with the original label file:
  <out_dir>/predictions/<case>.nii.gz  metrics.csv  summary.json  overlays/<case>.png  (+ the printed table)
predict(cfg, checkpoint, inputs, out_dir): segmentations of unlabelled NIfTI files, in their own geometry.
evaluate_ensemble / predict_ensemble: the same with several checkpoints of one model (each with its own
config), whose softmax probabilities are averaged before the argmax.
"""
import json
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

import data
import metrics
import reports
from core import fileio
from core.checkpoint import load_checkpoint
from core.distributed import resolve_device
from core.errors import ConfigError, DataConfigError
from core.rundir import RunDir
from data.preflight import check_datalist, check_images
from data.transforms import PREPROCESSING_KEYS
from engine.inference import SlidingWindow, ensemble_probabilities
from engine.network import load_network

APPLEDOUBLE_PREFIX = "._"  # macOS metadata files beside the images on foreign file systems, not images


# ---- inference --------------------------------------------------------------------------------------------

def _case_name(path):
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _load_members(members, device):
    """[(network, its sliding window)] and [what each checkpoint was trained to] of [(cfg, checkpoint)]."""
    loaded, trained = [], []
    for cfg, checkpoint in members:
        model, info = load_network(cfg, checkpoint, device)
        loaded.append((model, SlidingWindow.from_config(cfg["inference"], cfg["model"]["roi_size"],
                                                        cfg["trainer"]["amp"])))
        trained.append({"path": str(checkpoint), **info})
    return loaded, trained


def check_ensemble(members):
    """Checkpoints evaluated together must predict the same classes from the same preprocessing."""
    (first_cfg, first), *others = members
    for cfg, checkpoint in others:
        for section, keys in (("model", ("in_channels", "out_channels")), ("data", PREPROCESSING_KEYS)):
            for key in keys:
                if cfg[section][key] != first_cfg[section][key]:
                    raise ConfigError(f"ensemble: {checkpoint} has {section}.{key} = {cfg[section][key]!r}, {first} "
                                      f"{first_cfg[section][key]!r}; an ensemble's members must agree on it")
        ours = data.class_names(cfg["data"], cfg["model"]["out_channels"])
        theirs = data.class_names(first_cfg["data"], first_cfg["model"]["out_channels"])
        if ours != theirs:
            raise ConfigError(f"ensemble: {checkpoint} has the classes {ours}, {first} {theirs}")


def _segment(members, batch, cfg, device):
    """Label map of one loader batch in the original image geometry (int numpy array)."""
    probs = ensemble_probabilities(members, batch["image"].to(device))
    pred = probs.argmax(dim=1).cpu()
    return data.invert_prediction(pred, batch, cfg["data"])


def _load_label(path, num_classes, shape):
    label = nib.load(str(path))
    gt = np.rint(np.asanyarray(label.dataobj)).astype(np.int64)
    if gt.ndim == 4 and gt.shape[3] == 1:
        gt = gt[..., 0]
    if gt.shape != tuple(shape):
        raise DataConfigError(f"label {path} has shape {gt.shape}, but its image (and the prediction) "
                              f"{tuple(shape)}")
    if gt.min() < 0 or gt.max() >= num_classes:
        raise DataConfigError(f"label {path} holds values {gt.min()}..{gt.max()}, outside 0..{num_classes - 1}")
    return gt, tuple(float(z) for z in label.header.get_zooms()[:3])


# ---- evaluation -------------------------------------------------------------------------------------------

def evaluate(cfg, checkpoint, out_dir=None, split=None):
    """Evaluate `checkpoint` on the labelled cases of `split` (default inference.split); returns the summary.

    Metrics are computed in each image's ORIGINAL geometry: the prediction is inverted to it and compared
    with the label file as stored, with that file's voxel spacing for HD95.
    """
    out_dir = Path(out_dir) if out_dir is not None else RunDir.of_checkpoint(checkpoint).eval_dir(checkpoint)
    summary = _evaluate([(cfg, checkpoint)], out_dir, split)
    print(f"{cfg['model']['name']} on {cfg['data']['name']} ({summary['split']}), checkpoint {checkpoint}")
    return _report(summary, out_dir)


def evaluate_ensemble(members, out_dir, split=None):
    """Evaluate several checkpoints [(cfg, checkpoint)] of one model together (their softmax averaged) like
    `evaluate`, with the first one's data and evaluation settings; writes members.json beside the results."""
    check_ensemble(members)
    summary = _evaluate(members, Path(out_dir), split)
    _write_members(members, Path(out_dir))
    cfg = members[0][0]
    print(f"{cfg['model']['name']} on {cfg['data']['name']} ({summary['split']}), an ensemble of {len(members)}")
    return _report(summary, Path(out_dir))


def _report(summary, out_dir):
    print(reports.format_table(summary))
    print(f"results in {out_dir}")
    return summary


def _write_members(members, out_dir):
    with fileio.atomic_path(out_dir / "members.json", ".json") as tmp:
        Path(tmp).write_text(json.dumps([str(checkpoint) for _, checkpoint in members], indent=1) + "\n")


def _labelled_cases(cfg, split):
    cases = data.read_datalist(cfg["data"], cfg["model"]["out_channels"])[split]
    unlabelled = [e["image"] for e in cases if "label" not in e]
    if unlabelled:
        raise ConfigError(f"evaluation needs labels; {unlabelled[0]} in the {split!r} list has none "
                          "(use predict for unlabelled images)")
    case_names = [_case_name(e["image"]) for e in cases]
    twice = sorted({n for n in case_names if case_names.count(n) > 1})
    if twice:
        raise ConfigError(f"two {split!r} images are named {twice[0]}; case names must be unique")
    return case_names, cases


def _evaluate(members, out_dir, split):
    """The evaluation loop of `members` [(cfg, checkpoint)], the first one's config deciding the data;
    returns the summary (also in out_dir/summary.json, with out_dir/metrics.csv)."""
    cfg = members[0][0]
    split = split or cfg["inference"]["split"]
    device = resolve_device(cfg["trainer"]["device"])
    loaded, trained = _load_members(members, device)
    num_classes = cfg["model"]["out_channels"]
    names = data.class_names(cfg["data"], num_classes)
    case_names, cases = _labelled_cases(cfg, split)
    # Every case checked before any inference: a bad label is named at once, not after the cases before it.
    check_datalist(cfg["data"], cfg["model"]["in_channels"], num_classes, splits=(split,))
    loader = data.make_eval_loader(cfg["data"], num_classes, split)
    rows = []
    progress = tqdm(zip(case_names, cases, loader), total=len(cases), desc=f"evaluate {split}", unit="case")
    for case, entry, batch in progress:
        progress.set_postfix_str(case)
        pred = _segment(loaded, batch, cfg, device)
        gt, spacing = _load_label(entry["label"], num_classes, pred.shape)
        if cfg["inference"]["save_predictions"]:
            data.save_segmentation(pred, batch, out_dir / "predictions" / f"{case}.nii.gz")
        for index, m in metrics.per_class_metrics(pred, gt, num_classes, spacing).items():
            rows.append({"case": case, "class_index": index, "class_name": names[index], **m})
        if cfg["inference"]["save_overlays"]:
            image = np.asanyarray(nib.load(entry["image"]).dataobj).reshape(pred.shape)
            reports.save_overlay_png(image, gt, pred, out_dir / "overlays" / f"{case}.png")
    checkpoint = trained[0] if len(trained) == 1 else {"members": trained}
    summary = {**reports.summarize(rows, names), "split": split, "checkpoint": checkpoint}
    reports.write_metrics_csv(rows, out_dir / "metrics.csv")
    reports.write_summary_json(summary, out_dir / "summary.json")
    return summary


def evaluate_run(cfg, run_dir, out_dir=None):
    """Evaluate both checkpoints of a run folder, best and latest, each into <out_dir>/<checkpoint name>/
    (default <run_dir>/eval), and print their scores side by side (also written to <out_dir>/best_vs_latest.txt):
    papers differ on which of the two they report. Two checkpoints of the same step are evaluated once.
    Returns {checkpoint name: summary}."""
    run = RunDir(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run.eval_root
    found = run.checkpoints()
    if not found:
        raise ConfigError(f"{run.path}: no {' or '.join(RunDir.CHECKPOINTS)} there (not a run folder?)")
    fileio.check_writable(out_dir)  # before inference, not after it
    summaries, steps = {}, {}
    for path in found:
        ckpt = load_checkpoint(path, mmap=True)
        steps[path.stem] = (ckpt.get("epoch"), ckpt.get("iteration"))
        twin = next((name for name, step in steps.items() if name != path.stem and step == steps[path.stem]
                     and step[1] is not None), None)
        if twin is None:
            summaries[path.stem] = evaluate(cfg, path, out_dir / path.stem)
        else:
            summaries[path.stem] = _copy_evaluation(out_dir / twin, out_dir / path.stem, path)
    table = reports.format_side_by_side(summaries, {name: step[0] for name, step in steps.items()})
    with fileio.atomic_path(out_dir / RunDir.BEST_VS_LATEST, ".txt") as tmp:
        Path(tmp).write_text(table + "\n")
    print()
    print(table)
    return summaries


def _copy_evaluation(source, target, checkpoint):
    """The evaluation in `source` as that of `checkpoint`, which holds the same training step."""
    shutil.copytree(source, target, dirs_exist_ok=True)
    summary = json.loads((source / "summary.json").read_text())
    twin = Path(summary["checkpoint"]["path"]).name
    summary["checkpoint"] = {**summary["checkpoint"], "path": str(checkpoint)}
    reports.write_summary_json(summary, target / "summary.json")
    print(f"{checkpoint.name} holds the same training step as {twin}: its evaluation is a copy, in {target}")
    return summary


# ---- prediction -------------------------------------------------------------------------------------------

def _nifti_inputs(inputs):
    """NIfTI files from a file, a folder of them, or a list of either. In a folder, macOS AppleDouble files
    (._name.nii.gz) are metadata, not images: skipped with a note."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.name.endswith((".nii", ".nii.gz")))
            skipped = [p.name for p in found if p.name.startswith(APPLEDOUBLE_PREFIX)]
            if skipped:
                print(f"skipped {len(skipped)} macOS AppleDouble file(s) in {item}: {', '.join(skipped[:3])}"
                      f"{' ...' if len(skipped) > 3 else ''}", file=sys.stderr)
            found = [p for p in found if not p.name.startswith(APPLEDOUBLE_PREFIX)]
            if not found:
                raise ConfigError(f"no NIfTI files (.nii, .nii.gz) in folder {item}")
            paths.extend(found)
        elif item.is_file():
            paths.append(item)
        else:
            raise ConfigError(f"input not found: {item}")
    names = [_case_name(p) for p in paths]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"two inputs would both be written as {twice[0]}.nii.gz; predict them separately")
    return paths


def predict(cfg, checkpoint, inputs, out_dir):
    """Segment unlabelled NIfTI images (a file, a folder or a list); writes <out_dir>/<case>.nii.gz in each
    input's geometry (shape and affine) and returns the written paths."""
    return _predict([(cfg, checkpoint)], inputs, out_dir)


def predict_ensemble(members, inputs, out_dir):
    """`predict` with several checkpoints [(cfg, checkpoint)] of one model, their softmax averaged."""
    check_ensemble(members)
    written = _predict(members, inputs, out_dir)
    _write_members(members, Path(out_dir))
    return written


def _predict(members, inputs, out_dir):
    cfg = members[0][0]
    paths = _nifti_inputs(inputs)
    check_images(paths, cfg["model"]["in_channels"])  # readable, intact, 3D, finite: NaN gives an empty mask
    device = resolve_device(cfg["trainer"]["device"])
    loaded, _ = _load_members(members, device)
    loader = data.make_predict_loader(cfg["data"], paths)
    written = []
    for path, batch in tqdm(zip(paths, loader), total=len(paths), desc="predict", unit="image"):
        pred = _segment(loaded, batch, cfg, device)
        written.append(data.save_segmentation(pred, batch, Path(out_dir) / f"{_case_name(path)}.nii.gz"))
    return written


if __name__ == "__main__":  # python test.py ... is python main.py test ...
    import runpy

    sys.argv = [str(Path(__file__).with_name("main.py")), "test", *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
