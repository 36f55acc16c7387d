"""Pictures of a run: overlays of predictions on the image, and the training curves (progress.png)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
import numpy as np  # noqa: E402

from core.fileio import atomic_path  # noqa: E402


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
