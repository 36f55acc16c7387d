"""The comparison's figures as PNG: Dice box plots per class, mean Dice against GFLOPs (the paper's Figure 1)
and a heat map of per-case Dice differences against the reference.

Models are compare.ModelScores; every figure is written atomically and always written (with a note in
place of the plot when there is nothing to draw), so a comparison folder always holds the same files.
"""
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
import numpy as np  # noqa: E402

from core.fileio import atomic_path  # noqa: E402

DPI = 100
JITTER_SEED = 0


def _save(fig, path):
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    plt.close(fig)
    return path


def _empty(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def dice_boxplot(models, class_names, path):
    """One panel per class and one for the class mean: a box per model over the cases (each case's Dice
    averaged over the model's runs), the cases drawn on top as jittered points."""
    panels = list(class_names) + ["mean over classes"]
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    width = max(3.2, 0.45 * len(models) + 1.2)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, 3.2 * nrows), squeeze=False, sharey=True)
    rng = np.random.default_rng(JITTER_SEED)
    positions = np.arange(1, len(models) + 1)
    for i, ax in enumerate(axes.flat):
        if i >= len(panels):
            ax.set_axis_off()
            continue
        k = i if i < len(class_names) else None
        values = [100 * m.per_case("dice", k) for m in models]
        ax.boxplot(values, positions=positions, widths=0.6, showfliers=False)
        for x, v in zip(positions, values):
            ax.scatter(x + rng.uniform(-0.18, 0.18, v.size), v, s=9, alpha=0.6, color="tab:blue", zorder=3)
        ax.set_title(panels[i], fontsize=9)
        ax.set_xticks(positions, [m.name for m in models], rotation=60, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("Dice (%)")
    fig.tight_layout()
    return _save(fig, path)


def dice_vs_gflops(models, path):
    """Mean Dice (mean over runs, bars: std across runs) against GFLOPs, marker area proportional to the
    parameter count; models without a FLOPs count are left out and named in the caption."""
    drawn = [m for m in models if m.flops is not None]
    fig, ax = plt.subplots(figsize=(7, 5))
    if not drawn:
        _empty(ax, "no model has a FLOPs count")
        return _save(fig, path)
    largest = max((m.params or 0) for m in drawn) or 1
    for m in drawn:
        run_means = 100 * m.scores("dice").mean(axis=(1, 2))
        std = float(np.std(run_means, ddof=1)) if run_means.size > 1 else 0.0
        size = 40 + 900 * (m.params or 0) / largest
        ax.errorbar(m.flops / 1e9, run_means.mean(), yerr=std, fmt="none", ecolor="gray", capsize=3, zorder=3)
        ax.scatter(m.flops / 1e9, run_means.mean(), s=size, alpha=0.55, edgecolor="black")
        label = m.name + ("" if m.params is not None else " (params unknown)")
        ax.annotate(label, (m.flops / 1e9, run_means.mean()), fontsize=8, xytext=(6, 6), textcoords="offset points")
    ax.set_xlabel("GFLOPs (one forward pass at the training window)")
    ax.set_ylabel("mean Dice (%)")
    ax.set_title("Mean Dice against GFLOPs; marker area: parameters", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    fig.tight_layout()
    return _save(fig, path)


def difference_heatmap(models, reference, cases, path):
    """Cases (rows) by compared model (columns): each case's mean Dice over classes minus the reference's,
    in percentage points, both averaged over runs. Blue: better than the reference, red: worse."""
    others = [m for m in models if m is not reference]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(others) + 3), max(3.5, 0.32 * len(cases) + 2)))
    if not others:
        _empty(ax, f"only the reference {reference.name}: nothing to compare")
        return _save(fig, path)
    ref = reference.per_case("dice")
    diff = 100 * np.stack([m.per_case("dice") - ref for m in others], axis=1)
    limit = float(np.max(np.abs(diff))) or 1.0
    image = ax.imshow(diff, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    if diff.size <= 400:
        for (i, j), value in np.ndenumerate(diff):
            color = "white" if abs(value) > 0.6 * limit else "black"  # readable on the dark ends of the map
            ax.text(j, i, f"{value:+.1f}", ha="center", va="center", fontsize=6, color=color)
    ax.set_xticks(range(len(others)), [m.name for m in others], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(cases)), cases, fontsize=7)
    ax.set_title(f"Mean Dice difference against {reference.name} (percentage points)", fontsize=10)
    fig.colorbar(image, ax=ax, label="model minus reference (points)")
    fig.tight_layout()
    return _save(fig, path)


def draw_all(models, reference, class_names, cases, out_dir):
    """Write the three figures into out_dir; returns [(path, caption)] in the report's order."""
    left_out = [m.name for m in models if m.flops is None]
    flops_caption = "Mean Dice against GFLOPs, marker area proportional to the parameter count (the paper's " \
                    "Figure 1); bars: standard deviation across runs."
    if left_out:
        flops_caption += f" Left out for want of a FLOPs count: {', '.join(left_out)}."
    return [
        (dice_boxplot(models, class_names, out_dir / "dice_boxplot.png"),
         "Dice per class by model: boxes over the cases (each case averaged over a model's runs), cases as points."),
        (dice_vs_gflops(models, out_dir / "dice_vs_gflops.png"), flops_caption),
        (difference_heatmap(models, reference, cases, out_dir / "dice_difference_heatmap.png"),
         (f"Per-case mean Dice (over classes) of each model minus the reference {reference.name}, in percentage "
          "points, cases by model: one panel shows at a glance on which cases each model gains or loses; the "
          "per-class differences are in stats.csv and the box plots.")),
    ]
