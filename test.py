"""Inference and evaluation: one loop for every data set.

evaluate(cfg, checkpoint): sliding-window inference on the labelled test (or validation) cases, predictions
mapped back to each image's original geometry and compared there with the original label file:
  <out_dir>/predictions/<case>.nii.gz  metrics.csv  summary.json  overlays/<case>.png  (+ the printed table)
predict(cfg, checkpoint, inputs, out_dir): segmentations of unlabelled NIfTI files, in their own geometry.
"""
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

import data
import fileio
import metrics
import models
import reports
from checkpoint import CheckpointError, load_checkpoint, load_model_weights
from config import ConfigError, model_kwargs
from data.preflight import check_images
from distributed import resolve_device
from inference import infer_volume
from models.em_net import convert_reference_state_dict
from models.selective_scan import set_scan_backend

# Deep-supervision heads exist only in training; a model built without them has no such keys.
DEEP_SUPERVISION_PREFIX = "deep_supervision_heads."
REFERENCE_PREFIX = "mamba_encoder."  # keys of the reference EM-Net implementation


# ---- model ------------------------------------------------------------------------------------------------

def load_model(cfg, checkpoint_path, device):
    """Build cfg's model without deep supervision, load the checkpoint strictly, eval mode, on `device`."""
    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.is_file():
        raise ConfigError(f"checkpoint not found: {checkpoint_path}")
    try:
        set_scan_backend(cfg["trainer"]["scan_backend"])
    except ValueError as err:
        raise ConfigError(f"trainer.scan_backend: {err}") from None
    ckpt = load_checkpoint(checkpoint_path)
    name = cfg["model"]["name"]
    kwargs = model_kwargs(cfg)
    if "deep_supervision" in models.model_defaults(name):
        kwargs["deep_supervision"] = False
    try:
        model = models.build_model(name, **kwargs)
    except (ValueError, TypeError) as err:  # e.g. an EM-Net window not divisible by 32: a config error
        raise ConfigError(f"model {name!r} cannot be built from the model section: {err}") from None

    state_dict = ckpt["state_dict"]
    if name == "em-net" and any(k.removeprefix("module.").startswith(REFERENCE_PREFIX) for k in state_dict):
        state_dict = convert_reference_state_dict(state_dict)
    state_dict = {k: v for k, v in state_dict.items()
                  if not k.removeprefix("module.").startswith(DEEP_SUPERVISION_PREFIX)}
    try:
        load_model_weights(model, state_dict, checkpoint_path)
    except CheckpointError as err:
        hint = _model_config_difference(ckpt.get("config"), cfg)
        raise CheckpointError(f"{err}{hint}") from None
    return model.to(device).eval()


def _model_config_difference(saved_cfg, cfg):
    """'; the checkpoint was trained with model.x = ...' when its saved model section differs from cfg's."""
    saved = saved_cfg.get("model") if isinstance(saved_cfg, dict) else None
    if not isinstance(saved, dict):
        return ""
    ours = cfg["model"]
    keys = [k for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)]
    if not keys:
        return ""
    shown = ", ".join(f"model.{k} = {saved.get(k)!r} (here {ours.get(k)!r})" for k in keys[:5])
    return f"; the checkpoint was trained with {shown}"


def resolve_inference_device(cfg):
    try:
        return resolve_device(cfg["trainer"]["device"])
    except ValueError as err:
        raise ConfigError(str(err)) from None


# ---- inference --------------------------------------------------------------------------------------------

def _case_name(path):
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _segment(model, batch, cfg, device):
    """Label map of one loader batch in the original image geometry (int numpy array)."""
    probs = infer_volume(model, batch["image"].to(device), cfg)
    pred = probs.argmax(dim=1).cpu()
    return data.invert_prediction(pred, batch, cfg)


def _load_label(path, num_classes, shape):
    label = nib.load(str(path))
    gt = np.rint(np.asanyarray(label.dataobj)).astype(np.int64)
    if gt.ndim == 4 and gt.shape[3] == 1:
        gt = gt[..., 0]
    if gt.shape != tuple(shape):
        raise ValueError(f"label {path} has shape {gt.shape}, but its image (and the prediction) {tuple(shape)}")
    if gt.min() < 0 or gt.max() >= num_classes:
        raise ValueError(f"label {path} holds values {gt.min()}..{gt.max()}, outside 0..{num_classes - 1}")
    return gt, tuple(float(z) for z in label.header.get_zooms()[:3])


# ---- evaluation -------------------------------------------------------------------------------------------

def evaluate(cfg, checkpoint, out_dir=None, split=None):
    """Evaluate `checkpoint` on the labelled cases of `split` (default inference.split); returns the summary.

    Metrics are computed in each image's ORIGINAL geometry: the prediction is inverted to it and compared
    with the label file as stored, with that file's voxel spacing for HD95.
    """
    split = split or cfg["inference"]["split"]
    out_dir = Path(out_dir) if out_dir is not None else Path(checkpoint).parent / "eval" / Path(checkpoint).stem
    device = resolve_inference_device(cfg)
    model = load_model(cfg, checkpoint, device)
    names = data.class_names(cfg)
    num_classes = cfg["model"]["out_channels"]

    cases = data.read_datalist(cfg)[split]
    unlabelled = [e["image"] for e in cases if "label" not in e]
    if unlabelled:
        raise ConfigError(f"evaluation needs labels; {unlabelled[0]} in the {split!r} list has none "
                          "(use predict for unlabelled images)")
    case_names = [_case_name(e["image"]) for e in cases]
    twice = sorted({n for n in case_names if case_names.count(n) > 1})
    if twice:
        raise ConfigError(f"two {split!r} images are named {twice[0]}; case names must be unique")
    loader = data.make_eval_loader(cfg, split)

    rows = []
    progress = tqdm(zip(case_names, cases, loader), total=len(cases), desc=f"evaluate {split}", unit="case")
    for case, entry, batch in progress:
        progress.set_postfix_str(case)
        pred = _segment(model, batch, cfg, device)
        gt, spacing = _load_label(entry["label"], num_classes, pred.shape)
        if cfg["inference"]["save_predictions"]:
            data.save_segmentation(pred, batch, out_dir / "predictions" / f"{case}.nii.gz")
        for index, m in metrics.per_class_metrics(pred, gt, num_classes, spacing).items():
            rows.append({"case": case, "class_index": index, "class_name": names[index], **m})
        if cfg["inference"]["save_overlays"]:
            image = np.asanyarray(nib.load(entry["image"]).dataobj).reshape(pred.shape)
            reports.save_overlay_png(image, gt, pred, out_dir / "overlays" / f"{case}.png")

    summary = reports.summarize(rows, names)
    reports.write_metrics_csv(rows, out_dir / "metrics.csv")
    reports.write_summary_json(summary, out_dir / "summary.json")
    print(f"{cfg['model']['name']} on {cfg['data']['name']} ({split}), checkpoint {checkpoint}")
    print(reports.format_table(summary))
    print(f"results in {out_dir}")
    return summary


RUN_CHECKPOINTS = ("checkpoint_best.pt", "checkpoint_latest.pt")


def evaluate_run(cfg, run_dir, out_dir=None):
    """Evaluate both checkpoints of a run folder, best and latest, each into <out_dir>/<checkpoint name>/
    (default <run_dir>/eval), and print their scores side by side (also written to <out_dir>/best_vs_latest.txt):
    papers differ on which of the two they report. Returns {checkpoint name: summary}."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "eval"
    found = [run_dir / name for name in RUN_CHECKPOINTS if (run_dir / name).is_file()]
    if not found:
        raise ConfigError(f"{run_dir}: no {' or '.join(RUN_CHECKPOINTS)} there (not a run folder?)")
    fileio.check_writable(out_dir)  # before inference, not after it
    summaries = {path.stem: evaluate(cfg, path, out_dir / path.stem) for path in found}
    epochs = {path.stem: load_checkpoint(path).get("epoch") for path in found}
    table = format_side_by_side(summaries, epochs)
    with fileio.atomic_path(out_dir / "best_vs_latest.txt", ".txt") as tmp:
        Path(tmp).write_text(table + "\n")
    print()
    print(table)
    return summaries


def format_side_by_side(summaries, epochs):
    """One line per class with Dice % and HD95 mm of each checkpoint next to each other, then the means."""
    names = list(summaries)
    heads = [f"{n.removeprefix('checkpoint_')} (epoch {epochs[n]})" for n in names]
    classes = list(summaries[names[0]]["per_class"])
    width = max(len("class"), len("mean"), *(len(c) for c in classes))
    col = max(len("Dice %"), *(len(h) for h in heads))
    lines = [f"{'':<{width}}  " + "  ".join(f"{'Dice %':>{col}}" for _ in names) + "  "
             + "  ".join(f"{'HD95 mm':>{col}}" for _ in names),
             f"{'class':<{width}}  " + "  ".join(f"{h:>{col}}" for h in heads * 2)]
    lines.append("-" * len(lines[1]))
    rows = [(c, [summaries[n]["per_class"][c]["dice_mean"] for n in names],
             [summaries[n]["per_class"][c]["hd95_mean"] for n in names]) for c in classes]
    rows.append(("mean", [summaries[n]["mean_dice"] for n in names], [summaries[n]["mean_hd95"] for n in names]))
    for i, (name, dices, hds) in enumerate(rows):
        if i == len(rows) - 1:
            lines.append("-" * len(lines[1]))
        lines.append(f"{name:<{width}}  " + "  ".join(f"{100 * d:>{col}.2f}" for d in dices) + "  "
                     + "  ".join(f"{h:>{col}.2f}" for h in hds))
    return "\n".join(lines)


# ---- prediction -------------------------------------------------------------------------------------------

def _nifti_inputs(inputs):
    """NIfTI files from a file, a folder of them, or a list of either."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.name.endswith((".nii", ".nii.gz")))
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
    paths = _nifti_inputs(inputs)
    check_images(cfg, paths)  # readable, 3D, finite: a NaN voxel would give an all-background mask
    device = resolve_inference_device(cfg)
    model = load_model(cfg, checkpoint, device)
    loader = data.make_predict_loader(cfg, paths)
    written = []
    for path, batch in tqdm(zip(paths, loader), total=len(paths), desc="predict", unit="image"):
        pred = _segment(model, batch, cfg, device)
        written.append(data.save_segmentation(pred, batch, Path(out_dir) / f"{_case_name(path)}.nii.gz"))
    return written


if __name__ == "__main__":
    import sys

    import main

    main.cli(sys.argv[1:], default_command="test")
