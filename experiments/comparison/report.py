"""report.html: one self-contained page (figures inlined as data: URIs, no script, nothing fetched) with the
warnings, the tables, the statistics and how to read them, the figures, each run's provenance and config."""
import base64
import html
import json
import math
from dataclasses import dataclass

from . import stats, tables

PROVENANCE_ORDER = ("commit", "seed", "fold", "wall_time_s", "best_epoch", "latest_epoch", "checkpoint", "run_dir",
                    "host")
METRIC_NAMES = {"dice": "Dice", "hd95": "HD95"}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 0.3em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
caption { caption-side: top; text-align: left; font-weight: bold; padding-bottom: 0.3em; }
.notes { font-size: 0.85em; color: #444; max-width: 60em; }
.warnings li { color: #8a3b00; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }
"""


@dataclass
class ReportContext:
    models: list
    reference: object
    cases: list
    class_names: list
    tables: list
    stat_rows: list
    figures: list      # [(png path, caption)]
    missing: list
    warnings: list


def _e(text):
    return html.escape(str(text))


def _table_html(table):
    head = "".join(f"<th>{_e(c.header)}</th>" for c in table.columns)
    body = []
    for row in table.rows:
        label = _e(row.model) + ("<sup>*</sup>" if row.selected_on_test else "")
        cells = "".join(f"<td>{tables.cell_text(cell, c.decimals, bold='<b>{}</b>', mark='<sup>†</sup>')}</td>"
                        for cell, c in zip(row.cells, table.columns))
        body.append(f"<tr><td>{label}</td>{cells}</tr>")
    notes = "".join(f"<p>{_e(note)}</p>" for note in table.notes)
    return (f"<table class='results'><caption>{_e(table.title)}</caption><thead><tr><th>Model</th>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table><div class='notes'>{notes}</div>")


def _number(value, digits=4):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}g}"


def _stats_table(rows, caption):
    head = ("model", "class", "metric", "n", "W", "p", "p (Holm)", "mean diff", "95% CI", "wins/ties/losses", "note")
    body = []
    for r in rows:
        ci = "–" if math.isnan(r["ci_low"]) else f"[{_number(r['ci_low'])}, {_number(r['ci_high'])}]"
        values = (r["model"], r["class"], r["metric"], r["n"], _number(r["statistic"]), _number(r["p"], 3),
                  _number(r["p_holm"], 3), _number(r["mean_diff"]), ci, f"{r['wins']}/{r['ties']}/{r['losses']}",
                  r["note"])
        body.append("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in values) + "</tr>")
    return (f"<table class='stats'><caption>{_e(caption)}</caption><thead><tr>"
            + "".join(f"<th>{_e(h)}</th>" for h in head) + f"</tr></thead><tbody>{''.join(body)}</tbody></table>")


def _evidence_text(ctx):
    """How the statistics were computed, and how little a p-value over a few cases says."""
    n = len(ctx.cases)
    family = {m: sum(1 for r in ctx.stat_rows if r["metric"] == m and not math.isnan(r["p"])) for m in ("dice", "hd95")}
    floor = 2.0 / 2 ** n
    method = (f"Each compared model against the reference <b>{_e(ctx.reference.name)}</b>, per class and for the "
              "mean over classes, on each case's score averaged over the model's runs: paired two-sided Wilcoxon "
              f"signed-rank test (scipy.stats.wilcoxon). Differences are rounded to {stats.DECIMALS} decimals; zero "
              "differences (equal scores) are dropped (zero_method='wilcox'); the exact null distribution is used "
              "without ties, the exact sign-flip permutation distribution with them. No test with fewer than "
              f"{stats.MIN_CASES} paired or non-zero differences, or when every difference is zero (the note says "
              "which); such comparisons are left out of the Holm family.")
    family_text = (f"Holm's step-down correction runs per metric over every test of that metric: each compared model "
                   f"times each class and the class mean ({family['dice']} Dice and {family['hd95']} HD95 tests here).")
    interval = (f"Mean difference: model minus reference (Dice as a fraction, HD95 in mm) with a "
                f"{int(100 * stats.CONFIDENCE)}% percentile bootstrap interval over the cases "
                f"({stats.N_BOOTSTRAP:,} resamples, seed {stats.BOOTSTRAP_SEED}). Wins/ties/losses count cases "
                "where the model is better/equal/worse (higher Dice, lower HD95).")
    parts = [method, family_text, interval]
    weak = (f"<b>Read p-values over {n} cases as weak evidence.</b> They say how surprising the signs and ranks of "
            f"{n} differences would be if the two models were interchangeable, not how large or how general a "
            f"difference is. With {n} cases the exact test cannot give p below 2/2<sup>{n}</sup> = {floor:.2g}")
    floors = [f"{min(1.0, size * floor):.2g} in the {METRIC_NAMES[metric]} family of {size}"
              for metric, size in family.items() if size]
    if floors:
        weak += ", so no Holm-adjusted p can fall below " + " or ".join(floors)
    parts.append(weak + ". Weigh them with the mean difference, its interval and the wins/ties/losses.")
    return "".join(f"<p>{p}</p>" for p in parts)


def _statistics_html(ctx):
    if not ctx.stat_rows:
        return "<h2>Statistics</h2><p>Only one model: nothing to compare.</p>"
    means = [r for r in ctx.stat_rows if r["class"] == "mean"]
    return ("<h2>Statistics</h2>" + _evidence_text(ctx)
            + _stats_table(means, "Mean over classes against the reference (all rows: stats.csv and below)")
            + "<details><summary>Every class</summary>"
            + _stats_table(ctx.stat_rows, "Every class and metric against the reference") + "</details>")


def _figure_html(path, caption):
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"<figure><img src='data:image/png;base64,{data}' alt='{_e(path.stem)}'>"
            f"<figcaption class='notes'>{_e(caption)}</figcaption></figure>")


def _duration(seconds):
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return seconds
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{sec:02d}"


def _provenance_html(models):
    runs = [run for m in models for run in m.runs]
    keys = [k for k in PROVENANCE_ORDER if any(k in run.provenance for run in runs)]
    keys += sorted({k for run in runs for k in run.provenance} - set(keys))
    head = "".join(f"<th>{_e(h)}</th>" for h in ["model", "run", "selected on test", *keys])
    body = []
    for run in runs:
        values = [run.model, run.replicate or "–", "yes" if run.selected_on_test else "no"]
        values += [_duration(run.provenance[k]) if k == "wall_time_s" and k in run.provenance
                   else run.provenance.get(k, "–") for k in keys]
        body.append("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in values) + "</tr>")
    return (f"<h2>Runs</h2><table class='provenance'><caption>Provenance of every run (wall_time_s as h:mm:ss)"
            f"</caption><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def _configs_html(models):
    parts = ["<h2>Configurations</h2>"]
    for run in (run for m in models for run in m.runs):
        text = json.dumps(run.config, indent=2, default=str)
        parts.append(f"<details><summary>{_e(run.label)}</summary><pre>{_e(text)}</pre></details>")
    return "".join(parts)


def _warnings_html(ctx):
    items = [f"missing or unfinished: {m}" for m in ctx.missing] + list(ctx.warnings)
    if not items:
        return "<h2>Warnings</h2><p>None.</p>"
    return "<h2>Warnings</h2><ul class='warnings'>" + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>"


def render(ctx):
    """The whole page as one string."""
    n_runs = sum(len(m.runs) for m in ctx.models)
    summary = (f"<p>{len(ctx.models)} models, {n_runs} runs, {len(ctx.cases)} test cases, "
               f"{len(ctx.class_names)} classes; reference: <b>{_e(ctx.reference.name)}</b>.</p>")
    body = [f"<h1>Comparison against {_e(ctx.reference.name)}</h1>", summary, _warnings_html(ctx), "<h2>Tables</h2>"]
    body += [_table_html(t) for t in ctx.tables]
    body += [_statistics_html(ctx), "<h2>Figures</h2>"]
    body += [_figure_html(path, caption) for path, caption in ctx.figures]
    body += [_provenance_html(ctx.models), _configs_html(ctx.models)]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>Comparison against "
            f"{_e(ctx.reference.name)}</title><style>{STYLE}</style></head>\n<body>\n" + "\n".join(body)
            + "\n</body></html>\n")
