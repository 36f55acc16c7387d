"""Evaluation tables: metrics.csv, summary.json and the printed tables.

Rows are dicts {"case", "class_index", "class_name", "dice", "hd95"}, one per case and foreground class.
Every file is written to a temporary name next to its destination and renamed, so a crash never leaves
a half-written file behind.
"""
import csv
import json

import numpy as np

from core.fileio import atomic_path

CSV_FIELDS = ("case", "class_index", "class_name", "dice", "hd95")


def write_metrics_csv(rows, path):
    """Write one line per case and class with the columns of CSV_FIELDS."""
    with atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="") as f:
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
    with atomic_path(path, ".json") as tmp, open(tmp, "w") as f:
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
