"""Evaluation outputs: metrics.csv, summary.json and the printed tables (tables.py), overlay and progress
pictures (figures.py). Every file is written to a temporary name and renamed: never half-written."""
from .figures import plot_progress, save_overlay_png
from .tables import (
    CSV_FIELDS,
    format_side_by_side,
    format_table,
    read_metrics_csv,
    summarize,
    write_metrics_csv,
    write_summary_json,
)

__all__ = ["CSV_FIELDS", "format_side_by_side", "format_table", "plot_progress", "read_metrics_csv",
           "save_overlay_png", "summarize", "write_metrics_csv", "write_summary_json"]
