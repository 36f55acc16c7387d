"""Evaluation outputs: metrics.csv, summary.json, the printed table, overlay and progress pictures.

Rows are dicts {"case", "class_index", "class_name", "dice", "hd95"}, one per case and foreground class.
Every file is written to a temporary name next to its destination and renamed, so a crash never leaves
a half-written file behind.
"""
import csv
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
import numpy as np  # noqa: E402

from fileio import atomic_path  # noqa: E402

CSV_FIELDS = ("case", "class_index", "class_name", "dice", "hd95")


def write_metrics_csv(rows, path):
    """Write one line per case and class with the columns of CSV_FIELDS."""
    with atomic_path(path, ".csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                missing = [k for k in CSV_FIELDS if k not in row]
                if missing:
                    raise KeyError(f"metrics row {row!r} lacks {', '.join(missing)}")
                writer.writerow(row)
    return path


def read_metrics_csv(path):
    """The rows of a metrics.csv with their numeric types restored."""
    with open(path, newline="") as f:
        return [
            {
                "case": r["case"],
                "class_index": int(r["class_index"]),
                "class_name": r["class_name"],
                "dice": float(r["dice"]),
                "hd95": float(r["hd95"]),
            }
            for r in csv.DictReader(f)
        ]


def _class_name(class_names, index):
    if isinstance(class_names, dict):
        return str(class_names.get(index, class_names.get(str(index), index)))
    return str(class_names[index]) if 0 <= index < len(class_names) else str(index)


def summarize(rows, class_names):
    """Per-class mean and std (over cases) of Dice and HD95, and their means over classes.

    `class_names` maps a class index to its name: a list indexed by class (background at 0) or a dict.
    mean_dice / mean_hd95 average the per-class means, so each class weighs the same.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("no metric rows to summarize (were there any cases?)")
    by_class = {}
    for row in rows:
        by_class.setdefault(int(row["class_index"]), []).append(row)
    per_class = {}
    for index in sorted(by_class):
        dices = np.array([r["dice"] for r in by_class[index]], dtype=np.float64)
        hds = np.array([r["hd95"] for r in by_class[index]], dtype=np.float64)
        per_class[_class_name(class_names, index)] = {
            "dice_mean": float(dices.mean()),
            "dice_std": float(dices.std()),
            "hd95_mean": float(hds.mean()),
            "hd95_std": float(hds.std()),
        }
    return {
        "per_class": per_class,
        "mean_dice": float(np.mean([v["dice_mean"] for v in per_class.values()])),
        "mean_hd95": float(np.mean([v["hd95_mean"] for v in per_class.values()])),
        "num_cases": len({r["case"] for r in rows}),
    }


def write_summary_json(summary, path):
    with atomic_path(path, ".json") as tmp:
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
    return path


def format_table(summary):
    """The results table: one line per class (Dice in %, HD95 in mm, mean ± std over cases), then the mean."""
    names = list(summary["per_class"])
    width = max([len("mean"), len("class")] + [len(n) for n in names])
    header = f"{'class':<{width}}  {'Dice %':>15}  {'HD95 mm':>17}"
    lines = [header, "-" * len(header)]
    for name, v in summary["per_class"].items():
        dice = f"{100 * v['dice_mean']:.2f} ± {100 * v['dice_std']:.2f}"
        hd = f"{v['hd95_mean']:.2f} ± {v['hd95_std']:.2f}"
        lines.append(f"{name:<{width}}  {dice:>15}  {hd:>17}")
    lines.append("-" * len(header))
    lines.append(f"{'mean':<{width}}  {100 * summary['mean_dice']:>15.2f}  {summary['mean_hd95']:>17.2f}")
    lines.append(f"({summary['num_cases']} cases)")
    return "\n".join(lines)


def _overlay_slices(gt, pred, num_slices):
    """Axial (last-axis) slices spread over the extent of the foreground, or of the volume if none."""
    foreground = np.flatnonzero((gt > 0).any(axis=(0, 1)) | (pred > 0).any(axis=(0, 1)))
    lo, hi = (foreground[0], foreground[-1]) if foreground.size else (0, gt.shape[2] - 1)
    return np.unique(np.linspace(lo, hi, num_slices + 2)[1:-1].round().astype(int))


def save_overlay_png(image, gt, pred, path, num_slices=4):
    """A few axial slices: image, ground truth over it, prediction over it, side by side.

    image, gt and pred are 3D arrays of one shape (H, W, D); D is the axial axis (RAS orientation).
    """
    image, gt, pred = (np.asarray(a) for a in (image, gt, pred))
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if not (image.shape == gt.shape == pred.shape) or image.ndim != 3:
        raise ValueError(f"overlay needs three 3D arrays of one shape, got {image.shape}, {gt.shape}, {pred.shape}")
    num_classes = int(max(gt.max(), pred.max(), 1)) + 1
    cmap = plt.get_cmap("tab20", 20)
    slices = _overlay_slices(gt, pred, int(num_slices))
    lo, hi = np.percentile(image, [0.5, 99.5])
    fig, axes = plt.subplots(len(slices), 3, figsize=(9, 3 * len(slices)), squeeze=False)
    for row, z in zip(axes, slices):
        # transpose so the first array axis runs left-right, as radiology viewers show it
        base = image[:, :, z].T
        for ax, labels, title in zip(row, (None, gt, pred), ("image", "ground truth", "prediction")):
            ax.imshow(base, cmap="gray", vmin=lo, vmax=hi, origin="lower")
            if labels is not None:
                lab = labels[:, :, z].T
                ax.imshow(np.ma.masked_equal(lab, 0), cmap=cmap, vmin=0, vmax=19, alpha=0.5,
                          origin="lower", interpolation="nearest")
                if lab.any():
                    ax.contour(lab, levels=np.arange(0.5, num_classes), colors="yellow", linewidths=0.5)
            ax.set_title(f"{title}, slice {z}", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return path


def plot_progress(history, path):
    """Training curves: loss per epoch and validation Dice per validated epoch.

    history = {"epoch": [...], "loss": [...], "val_epoch": [...], "val_dice": [...]}.
    """
    for key in ("epoch", "loss", "val_epoch", "val_dice"):
        if key not in history:
            raise KeyError(f"training history lacks {key!r}")
    if len(history["epoch"]) != len(history["loss"]) or len(history["val_epoch"]) != len(history["val_dice"]):
        raise ValueError("training history: epoch/loss and val_epoch/val_dice must have equal lengths")
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(history["epoch"], history["loss"], color="tab:blue")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(alpha=0.3)
    ax_dice.plot(history["val_epoch"], history["val_dice"], marker="o", color="tab:green")
    ax_dice.set_xlabel("epoch")
    ax_dice.set_ylabel("validation mean Dice")
    ax_dice.grid(alpha=0.3)
    if history["val_dice"]:
        best = int(np.argmax(history["val_dice"]))
        ax_dice.set_title(f"best {history['val_dice'][best]:.4f} at epoch {history['val_epoch'][best]}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return path
