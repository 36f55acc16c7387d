"""Compare evaluated runs against a reference model: the paper's tables, paired statistics, figures and one
self-contained HTML report.

    compare(results, output_dir, reference=None, missing=(), warnings=())

writes table.md, table.csv, table.tex, stats.csv, dice_boxplot.png, dice_vs_gflops.png,
dice_difference_heatmap.png and report.html into output_dir, each file atomically.
"""
import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.fileio import atomic_path

from . import figures, report, stats, tables

METRICS = ("dice", "hd95")
SIGNIFICANCE = 0.05
STATS_FIELDS = ("model", "reference", "class", "metric", "n", "n_nonzero", "statistic", "p", "p_holm",
                "mean_diff", "ci_low", "ci_high", "wins", "ties", "losses", "method", "note")


@dataclass
class RunResult:
    model: str             # row label, e.g. "em_net" or "em_net (ensemble of 3 folds)"
    replicate: str         # "seed_0", "fold_2", ... or "" for a single run
    rows: list             # metrics.csv rows: {"case", "class_index", "class_name", "dice", "hd95"}
    params: int | None     # parameter count
    flops: float | None    # FLOPs of one forward pass at the training window
    provenance: dict       # e.g. commit, seed or fold, wall_time_s, best_epoch, latest_epoch, run_dir, checkpoint
    selected_on_test: bool  # its best checkpoint was chosen on the test cases (marked in every table)
    config: dict           # resolved run config (shown in the report)

    @property
    def label(self):
        return f"{self.model} {self.replicate}".strip()


@dataclass
class ModelScores:
    """One model's runs as arrays (runs, cases, classes), cases and classes in the comparison's order."""
    name: str
    runs: list
    dice: np.ndarray
    hd95: np.ndarray

    def scores(self, metric):
        return getattr(self, metric)

    def per_case(self, metric, class_index=None):
        """Each case's score averaged over the runs, for one class (an index) or the mean over classes."""
        s = self.scores(metric)
        per_run = s.mean(axis=2) if class_index is None else s[:, :, class_index]
        return per_run.mean(axis=0)

    @property
    def selected_on_test(self):
        return any(run.selected_on_test for run in self.runs)

    @property
    def params(self):
        return next((run.params for run in self.runs if run.params is not None), None)

    @property
    def flops(self):
        return next((run.flops for run in self.runs if run.flops is not None), None)


# ---- honesty checks ---------------------------------------------------------------------------------------

def _run_grid(run):
    """{(case, class_index): row} of one run, and its {class_index: class_name}; duplicates and
    non-finite scores are errors naming the run."""
    if not run.rows:
        raise ValueError(f"run '{run.label}' has no metric rows")
    grid, names = {}, {}
    for row in run.rows:
        key = (str(row["case"]), int(row["class_index"]))
        if key in grid:
            raise ValueError(f"run '{run.label}' lists case {key[0]} class {key[1]} twice")
        if not (math.isfinite(float(row["dice"])) and math.isfinite(float(row["hd95"]))):
            raise ValueError(f"run '{run.label}': non-finite score for case {key[0]} class {key[1]}")
        if names.setdefault(key[1], str(row["class_name"])) != str(row["class_name"]):
            raise ValueError(f"run '{run.label}' names class {key[1]} both {names[key[1]]!r} and "
                             f"{row['class_name']!r}")
        grid[key] = row
    return grid, names


def _case_list(run, grid, classes):
    cases = list(dict.fromkeys(case for case, _ in grid))
    absent = [(c, k) for c in cases for k in classes if (c, k) not in grid]
    if absent:
        raise ValueError(f"run '{run.label}' has no score for case {absent[0][0]} class {absent[0][1]} "
                         f"({len(absent)} case-class pairs missing)")
    return cases


def _difference(what, first, run, mine, theirs):
    """The ValueError for runs tested on different cases or classes, naming both runs and the difference."""
    only_first = sorted(set(theirs) - set(mine), key=str)
    only_run = sorted(set(mine) - set(theirs), key=str)
    detail = []
    if only_first:
        detail.append(f"'{run.label}' lacks {', '.join(map(str, only_first[:5]))}")
    if only_run:
        detail.append(f"'{run.label}' has {', '.join(map(str, only_run[:5]))} that '{first.label}' lacks")
    if not detail:
        detail.append(f"'{first.label}' has {theirs}, '{run.label}' has {mine}")
    return ValueError(f"runs were tested on different {what}: {'; '.join(detail)}")


def validate(results):
    """(cases, {class_index: name}) shared by every run; a ValueError naming the runs when they differ."""
    if not results:
        raise ValueError("nothing to compare: no runs")
    labels = [(r.model, r.replicate) for r in results]
    twice = next((lab for lab in labels if labels.count(lab) > 1), None)
    if twice:
        raise ValueError(f"run '{' '.join(twice).strip()}' is given twice")
    first, expected = results[0], None
    for run in results:
        grid, names = _run_grid(run)
        if "mean" in names.values():
            raise ValueError(f"run '{run.label}' has a class named 'mean', the name of the mean column")
        cases = _case_list(run, grid, sorted(names))
        if expected is None:
            expected = (cases, names)
        elif names != expected[1]:
            theirs = [f"{k}={v}" for k, v in sorted(expected[1].items())]
            raise _difference("classes", first, run, [f"{k}={v}" for k, v in sorted(names.items())], theirs)
        elif set(cases) != set(expected[0]):
            raise _difference("cases", first, run, cases, expected[0])
    return expected


def collect(results, cases, class_indices):
    """ModelScores per model, in order of first appearance."""
    by_model = {}
    for run in results:
        by_model.setdefault(run.model, []).append(run)
    models = []
    for name, runs in by_model.items():
        arrays = {}
        for metric in METRICS:
            per_run = []
            for run in runs:
                values = {(str(r["case"]), int(r["class_index"])): float(r[metric]) for r in run.rows}
                per_run.append([[values[(c, k)] for k in class_indices] for c in cases])
            arrays[metric] = np.asarray(per_run, dtype=np.float64)
        models.append(ModelScores(name, runs, arrays["dice"], arrays["hd95"]))
    return models


# ---- statistics -------------------------------------------------------------------------------------------

def statistics(models, reference, class_names):
    """stats.csv rows: every other model against the reference, per class and the mean over classes, per
    metric; Holm over all classes and models of one metric."""
    rows = []
    for model in models:
        if model is reference:
            continue
        for metric in METRICS:
            for k, cls in [(k, c) for k, c in enumerate(class_names)] + [(None, "mean")]:
                result = stats.compare_paired(model.per_case(metric, k), reference.per_case(metric, k),
                                              higher_is_better=tables.HIGHER_IS_BETTER[metric])
                rows.append({"model": model.name, "reference": reference.name, "class": cls, "metric": metric,
                             **result})
    for metric in METRICS:
        family = [row for row in rows if row["metric"] == metric]
        for row, adjusted in zip(family, stats.holm([row["p"] for row in family])):
            row["p_holm"] = float(adjusted)
    return rows


def _csv_value(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value


def stats_csv(rows):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=STATS_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row[k]) for k in STATS_FIELDS})
    return out.getvalue()


# ---- notes and warnings -----------------------------------------------------------------------------------

def table_notes(models, reference, n_cases, tests_ran):
    runs = ", ".join(f"{m.name} {len(m.runs)}" for m in models)
    notes = [(f"Dice in %, HD95 in mm, over {n_cases} test cases. With several runs per model, a cell is the mean "
              f"over runs of each run's case mean ± the standard deviation across runs (sample standard "
              f"deviation, ddof=1); with one run, the case mean alone. Runs per model: {runs}."),
             ("Bold: the best value of each Dice and HD95 column (highest Dice, lowest HD95); parameters and "
              "GFLOPs are not ranked. –: not known.")]
    if tests_ran:
        notes.append(f"{tables.DAGGER_NOTE} Holm-adjusted p < {SIGNIFICANCE} against the reference "
                     f"{reference.name}: paired two-sided Wilcoxon signed-rank test over the {n_cases} cases, "
                     "each case's score averaged over a model's runs; Holm over every class, the class mean and "
                     "every compared model, per metric (stats.csv).")
    elif len(models) < 2:
        notes.append("No significance marks: one model, nothing to test against.")
    else:
        notes.append("No significance marks: no paired test was run (the note in stats.csv says why).")
    selected = [m.name for m in models if m.selected_on_test]
    if selected:
        notes.append(f"* {', '.join(selected)}: best checkpoint chosen on these test cases, so its scores on "
                     "them are optimistic.")
    return notes


def generated_warnings(models, n_cases):
    found = []
    for m in models:
        chosen = [run.replicate or "its run" for run in m.runs if run.selected_on_test]
        if chosen:
            found.append(f"{m.name}: the best checkpoint of {', '.join(chosen)} was chosen on the test cases; "
                         "its test scores are optimistic")
        for what in ("params", "flops"):
            values = {getattr(run, what) for run in m.runs} - {None}
            if len(values) > 1:
                found.append(f"{m.name}: its runs report different {what} ({', '.join(map(str, sorted(values)))})")
    no_flops = [m.name for m in models if m.flops is None]
    if no_flops:
        found.append(f"no FLOPs count for {', '.join(no_flops)}: left out of the Dice-GFLOPs figure")
    counts = {m.name: len(m.runs) for m in models}
    if len(set(counts.values())) > 1:
        found.append("models have different numbers of runs (" + ", ".join(f"{k} {v}" for k, v in counts.items())
                     + "): a model with one run shows no spread across runs")
    if n_cases < stats.MIN_CASES:
        found.append(f"only {n_cases} paired cases: no statistical test was run (at least {stats.MIN_CASES} needed)")
    return found


# ---- entry point ------------------------------------------------------------------------------------------

def _write_text(path, text):
    with atomic_path(path, path.suffix) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path


def _reference(models, reference):
    if reference is None:
        return models[0]
    found = next((m for m in models if m.name == reference), None)
    if found is None:
        raise ValueError(f"reference model {reference!r} is not among the compared models: "
                         f"{', '.join(m.name for m in models)}")
    return found


def compare(results, output_dir, reference=None, missing=(), warnings=()):
    """Compare the runs in `results` (RunResult) against `reference` (default: the first model) and write the
    tables, stats.csv, figures and report.html into `output_dir`. Runs tested on different cases or classes
    raise ValueError. Returns {"output_dir", "files", "n_models", "n_runs", "n_cases", "n_classes",
    "reference", "tests_run"}."""
    results = list(results)
    cases, names = validate(results)
    class_indices = sorted(names)
    class_names = [names[k] for k in class_indices]
    models = collect(results, cases, class_indices)
    ref = _reference(models, reference)
    stat_rows = statistics(models, ref, class_names)
    tests_ran = any(not math.isnan(row["p"]) for row in stat_rows)
    significant = {(r["model"], r["class"], r["metric"]): r["p_holm"] < SIGNIFICANCE
                   for r in stat_rows if not math.isnan(r["p_holm"])}
    built = tables.build_tables(models, class_names, significant, table_notes(models, ref, len(cases), tests_ran))

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"table.md": _write_text(out / "table.md", tables.to_markdown(built)),
             "table.csv": _write_text(out / "table.csv", tables.to_csv(built)),
             "table.tex": _write_text(out / "table.tex", tables.to_latex(built)),
             "stats.csv": _write_text(out / "stats.csv", stats_csv(stat_rows))}
    pictures = figures.draw_all(models, ref, class_names, cases, out)
    files.update({path.name: path for path, _ in pictures})
    context = report.ReportContext(models=models, reference=ref, cases=cases, class_names=class_names,
                                   tables=built, stat_rows=stat_rows, figures=pictures, missing=list(missing),
                                   warnings=list(warnings) + generated_warnings(models, len(cases)))
    files["report.html"] = _write_text(out / "report.html", report.render(context))
    return {"output_dir": str(out), "files": {k: str(v) for k, v in files.items()}, "n_models": len(models),
            "n_runs": len(results), "n_cases": len(cases), "n_classes": len(class_names),
            "reference": ref.name, "tests_run": tests_ran}
