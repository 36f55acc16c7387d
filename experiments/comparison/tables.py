"""The paper's Table 1 (Dice per class, mean Dice and HD95, params, GFLOPs) and the HD95 table, built once as
cells and written as Markdown, LaTeX and CSV (report.py writes the same cells as HTML).

Models are duck-typed: anything with .name, .runs, .selected_on_test, .params, .flops and .scores(metric), an
array (runs, cases, classes).
"""
import csv
import io
import math
from dataclasses import dataclass, field

import numpy as np

HIGHER_IS_BETTER = {"dice": True, "hd95": False}
DAGGER_NOTE = "†"


@dataclass
class Cell:
    value: float | None          # None: unknown (e.g. no FLOPs count)
    std: float | None = None     # across runs; None with a single run
    bold: bool = False
    marked: bool = False         # Holm-adjusted p < 0.05 against the reference


@dataclass
class Column:
    header: str
    metric: str | None           # "dice", "hd95", or None for params / GFLOPs (never bolded)
    class_name: str | None       # a class, "mean", or None
    decimals: int = 2


@dataclass
class Row:
    model: str
    selected_on_test: bool
    runs: int
    cells: list                  # one Cell per column


@dataclass
class Table:
    title: str
    columns: list
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def _metric_cell(model, column, class_names):
    scores = model.scores(column.metric)
    if column.class_name == "mean":
        run_means = scores.mean(axis=(1, 2))
    else:
        run_means = scores[:, :, class_names.index(column.class_name)].mean(axis=1)
    scale = 100.0 if column.metric == "dice" else 1.0
    std = scale * float(np.std(run_means, ddof=1)) if run_means.size > 1 else None
    return Cell(scale * float(run_means.mean()), std)


def _cell(model, column, class_names, significant):
    if column.metric is None:
        count = model.params if column.class_name == "params" else model.flops
        return Cell(None if count is None else count / (1e6 if column.class_name == "params" else 1e9))
    cell = _metric_cell(model, column, class_names)
    cell.marked = bool(significant.get((model.name, column.class_name, column.metric), False))
    return cell


def _mark_best(table):
    """Bold the best displayed value of each metric column (ties on the rounded value all bold)."""
    if len(table.rows) < 2:
        return
    for j, column in enumerate(table.columns):
        if column.metric is None:
            continue
        shown = [round(row.cells[j].value, column.decimals) for row in table.rows]
        best = max(shown) if HIGHER_IS_BETTER[column.metric] else min(shown)
        for row, value in zip(table.rows, shown):
            row.cells[j].bold = value == best


def table_columns(class_names):
    """Columns of Table 1 (Dice) and Table 2 (HD95)."""
    first = [Column(name, "dice", name) for name in class_names]
    first += [Column("Mean Dice", "dice", "mean"), Column("Mean HD95 (mm)", "hd95", "mean"),
              Column("Params (M)", None, "params"), Column("GFLOPs", None, "flops", decimals=1)]
    second = [Column(name, "hd95", name) for name in class_names] + [Column("Mean", "hd95", "mean")]
    return first, second


def build_tables(models, class_names, significant, notes):
    """[Table 1, Table 2]; `significant` maps (model, class or "mean", metric) to True where the Holm-adjusted
    p < 0.05; `notes` are the caption lines shown under both tables."""
    columns = table_columns(class_names)
    titles = ("Table 1: Dice (%) per class, mean Dice (%), mean HD95 (mm), parameters and GFLOPs",
              "Table 2: HD95 (mm) per class and their mean")
    tables = []
    for title, cols in zip(titles, columns):
        table = Table(title, cols, notes=list(notes))
        for model in models:
            cells = [_cell(model, c, class_names, significant) for c in cols]
            table.rows.append(Row(model.name, model.selected_on_test, len(model.runs), cells))
        _mark_best(table)
        tables.append(table)
    return tables


def cell_text(cell, decimals, pm=" ± ", bold="**{}**", mark=DAGGER_NOTE):
    """A cell as text: value (± std), bold where best, the significance mark after it; "–" when unknown."""
    if cell.value is None:
        return "–"
    text = f"{cell.value:.{decimals}f}"
    if cell.std is not None:
        text += f"{pm}{cell.std:.{decimals}f}"
    if cell.bold:
        text = bold.format(text)
    return text + (mark if cell.marked else "")


def _md_escape(text):
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*")


def to_markdown(tables):
    parts = []
    for table in tables:
        lines = [f"## {table.title}", "", "| Model | " + " | ".join(_md_escape(c.header) for c in table.columns) + " |",
                 "|---|" + "---:|" * len(table.columns)]
        for row in table.rows:
            label = _md_escape(row.model) + ("\\*" if row.selected_on_test else "")
            texts = [cell_text(cell, c.decimals) for cell, c in zip(row.cells, table.columns)]
            lines.append(f"| {label} | " + " | ".join(texts) + " |")
        lines += [""] + [f"{_md_escape(note)}  " for note in table.notes]
        parts.append("\n".join(lines).rstrip() + "\n")
    return "\n".join(parts)


_TEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "±": r"$\pm$", "†": r"$^\dagger$", "–": "--", "<": r"$<$", ">": r"$>$"}


def tex_escape(text):
    return "".join(_TEX_SPECIALS.get(ch, ch) for ch in str(text))


def to_latex(tables):
    """Two table environments (booktabs: \\usepackage{booktabs})."""
    parts = ["% generated by main.py compare (experiments/comparison/tables.py); needs \\usepackage{booktabs}"]
    for table in tables:
        lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{tex_escape(table.title)}}}",
                 r"\begin{tabular}{l" + "r" * len(table.columns) + "}", r"\toprule",
                 "Model & " + " & ".join(tex_escape(c.header) for c in table.columns) + r" \\", r"\midrule"]
        for row in table.rows:
            label = tex_escape(row.model) + ("$^*$" if row.selected_on_test else "")
            texts = [cell_text(cell, c.decimals, pm=r" $\pm$ ", bold=r"\textbf{{{}}}", mark=r"$^\dagger$")
                     for cell, c in zip(row.cells, table.columns)]
            lines.append(f"{label} & " + " & ".join(texts) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}", r"\par\footnotesize"]
        lines += [tex_escape(note) + r"\par" for note in table.notes]
        lines.append(r"\end{table}")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def column_key(column):
    """The table.csv name of a column: dice_<class>, hd95_<class>, dice_mean, hd95_mean, params_M, gflops."""
    if column.metric is None:
        return {"params": "params_M", "flops": "gflops"}[column.class_name]
    return f"{column.metric}_{column.class_name}"


def _csv_number(value):
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(float(value))


def to_csv(tables):
    """One line per model: every column of both tables with its std (unrounded; Dice in %, HD95 in mm)."""
    seen, fields = set(), []
    for table in tables:
        for j, column in enumerate(table.columns):
            key = column_key(column)
            if key not in seen:
                seen.add(key)
                fields.append((key, table, j, column.metric is not None))
    header = ["model", "selected_on_test", "runs"]
    for key, _, _, has_std in fields:
        header += [key, f"{key}_std"] if has_std else [key]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for i, row in enumerate(tables[0].rows):
        line = [row.model, str(row.selected_on_test).lower(), row.runs]
        for _, table, j, has_std in fields:
            cell = table.rows[i].cells[j]
            line += [_csv_number(cell.value), _csv_number(cell.std)] if has_std else [_csv_number(cell.value)]
        writer.writerow(line)
    return out.getvalue()
