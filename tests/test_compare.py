import csv
import html
import json
import re
import shutil
import statistics as pystats
import struct
import subprocess

import matplotlib.image
import numpy as np
import pytest
from scipy import stats as sps

from experiments.comparison import RunResult, compare, stats

MODELS = ["em_net", "unetr", "swin_unetr"]
CLASSES = ["spleen", "liver", "aorta"]
SEEDS = 3
CASES = 8
FIGURES = ("dice_boxplot.png", "dice_vs_gflops.png", "dice_difference_heatmap.png")  # in the report's order
FILES = {"table.md", "table.csv", "table.tex", "stats.csv", "report.html", *FIGURES}


def make_scores(n_models=3, seeds=SEEDS, cases=CASES, classes=3, seed=0):
    """dice, hd95 arrays (models, seeds, cases, classes): model m is about 4 Dice points below model m-1."""
    rng = np.random.default_rng(seed)
    shape = (n_models, seeds, cases, classes)
    case_effect = rng.normal(0, 0.03, (1, 1, cases, 1))
    dice = np.clip(0.86 - 0.04 * np.arange(n_models)[:, None, None, None] + case_effect
                   + rng.normal(0, 0.02, shape), 0, 1)
    hd95 = 4.0 + 0.8 * np.arange(n_models)[:, None, None, None] + rng.gamma(2.0, 0.5, shape)
    return dice, hd95


def make_results(dice, hd95, models=MODELS, classes=CLASSES, selected=("unetr",)):
    results = []
    for m, model in enumerate(models):
        for s in range(dice.shape[1]):
            rows = [{"case": f"case{c:02d}", "class_index": k + 1, "class_name": classes[k],
                     "dice": float(dice[m, s, c, k]), "hd95": float(hd95[m, s, c, k])}
                    for c in range(dice.shape[2]) for k in range(dice.shape[3])]
            results.append(RunResult(model=model, replicate=f"seed_{s}", rows=rows, params=(m + 1) * 10_000_000,
                                     flops=(m + 1) * 1.5e11,
                                     provenance={"commit": "0123abc", "seed": s, "wall_time_s": 3723.0 + s,
                                                 "best_epoch": 90 + s, "latest_epoch": 100},
                                     selected_on_test=model in selected, config={"model": {"name": model}}))
    return results


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    dice, hd95 = make_scores()
    out = tmp_path_factory.mktemp("compare")
    summary = compare(make_results(dice, hd95), out, missing=["swin_unetr seed_3: no checkpoint_best.pt"],
                      warnings=["a caller's warning"])
    return out, summary, dice, hd95


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def case_averaged(scores, m, k):
    """Per-case scores of model m averaged over seeds, for class k or (k None) the mean over classes."""
    per_seed = scores[m].mean(axis=2) if k is None else scores[m][:, :, k]
    return per_seed.mean(axis=0)


# ---- files and tables -------------------------------------------------------------------------------------

def test_every_file_written(compared):
    out, summary, _, _ = compared
    assert {p.name for p in out.iterdir()} == FILES  # nothing else, no temporary left behind
    assert set(summary["files"]) == FILES
    assert all((out / name).stat().st_size > 0 for name in FILES)
    assert summary["n_models"] == 3 and summary["n_cases"] == CASES and summary["n_runs"] == 9
    assert summary["tests_run"] is True and summary["reference"] == "em_net"


def test_table_numbers_recomputed(compared):
    out, _, dice, hd95 = compared
    rows = {r["model"]: r for r in read_csv(out / "table.csv")}
    assert list(rows) == MODELS
    md = (out / "table.md").read_text()
    for m, model in enumerate(MODELS):
        for metric, scores, scale in (("dice", dice, 100.0), ("hd95", hd95, 1.0)):
            for k, name in [(k, n) for k, n in enumerate(CLASSES)] + [(None, "mean")]:
                # each run's case mean, then mean and sample std over runs, with the standard library
                run_means = [scale * pystats.mean(
                    [pystats.mean(scores[m, s, c]) if k is None else scores[m, s, c, k] for c in range(CASES)])
                    for s in range(SEEDS)]
                assert float(rows[model][f"{metric}_{name}"]) == pytest.approx(pystats.mean(run_means), rel=1e-12)
                assert float(rows[model][f"{metric}_{name}_std"]) == pytest.approx(pystats.stdev(run_means), rel=1e-9)
                assert f"{pystats.mean(run_means):.2f} ± {pystats.stdev(run_means):.2f}" in md
        assert float(rows[model]["params_M"]) == 10.0 * (m + 1)
        assert float(rows[model]["gflops"]) == 150.0 * (m + 1)
    assert "sample standard deviation, ddof=1" in md


def md_table(md, title_start):
    """{model: [cell, ...]} of the Markdown table under the heading starting with title_start."""
    block = md.split(f"## {title_start}")[1].split("## ")[0]
    lines = [line for line in block.splitlines() if line.startswith("| ")][1:]
    return {line.split(" | ")[0][2:].replace("\\*", ""): [c.strip() for c in line.strip(" |").split(" | ")[1:]]
            for line in lines}


def test_bold_on_the_best_cell(compared):
    out, _, dice, hd95 = compared
    md = (out / "table.md").read_text()
    first, second = md_table(md, "Table 1"), md_table(md, "Table 2")
    for j, k in enumerate(list(range(len(CLASSES))) + [None]):
        best_dice = max(range(3), key=lambda m: case_averaged(dice, m, k).mean())
        best_hd = min(range(3), key=lambda m: case_averaged(hd95, m, k).mean())
        assert [first[model][j].startswith("**") for model in MODELS] == [m == best_dice for m in range(3)]
        assert [second[model][j].startswith("**") for model in MODELS] == [m == best_hd for m in range(3)]
    # mean HD95 in Table 1 is a metric column; params and GFLOPs never bold even where smallest
    best_hd = min(range(3), key=lambda m: hd95[m].mean())
    assert [first[model][4].startswith("**") for model in MODELS] == [m == best_hd for m in range(3)]
    assert not any("**" in first[model][5] or "**" in first[model][6] for model in MODELS)
    tex = (out / "table.tex").read_text()
    assert tex.count(r"\textbf{") == md.count("**") // 2


def test_selected_on_test_marked_in_every_table(compared):
    out, _, _, _ = compared
    md = (out / "table.md").read_text()
    assert md.count("| unetr\\* |") == 2 and "| em_net |" in md
    assert md.count("\\* unetr: best checkpoint chosen on these test cases") == 2
    assert (out / "table.tex").read_text().count("unetr$^*$ &") == 2
    page = (out / "report.html").read_text()
    assert page.count("unetr<sup>*</sup>") == 2
    assert {r["model"]: r["selected_on_test"] for r in read_csv(out / "table.csv")} == {
        "em_net": "false", "unetr": "true", "swin_unetr": "false"}


def test_report_has_warnings_provenance_and_configs(compared):
    out, _, _, _ = compared
    page = (out / "report.html").read_text()
    assert "missing or unfinished: swin_unetr seed_3: no checkpoint_best.pt" in page
    assert "a caller&#x27;s warning" in page
    assert "chosen on the test cases; its test scores are optimistic" in page
    assert "weak evidence" in page
    assert "1:02:03" in page and "0123abc" in page  # wall time 3723 s, commit
    assert page.count("<details><summary>") == 9 + 1  # a config per run, and the per-class statistics
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_pngs_are_pngs_of_sensible_size(compared):
    out, _, _, _ = compared
    for name in FILES:
        if name.endswith(".png"):
            width, height = png_size(out / name)
            assert 300 <= width <= 5000 and 200 <= height <= 5000, (name, width, height)


# ---- statistics in stats.csv ------------------------------------------------------------------------------

def test_stats_csv_matches_scipy_on_seed_averaged_cases(compared):
    out, _, dice, hd95 = compared
    rows = read_csv(out / "stats.csv")
    assert len(rows) == 2 * 2 * (len(CLASSES) + 1)
    for row in rows:
        scores = dice if row["metric"] == "dice" else hd95
        k = None if row["class"] == "mean" else CLASSES.index(row["class"])
        x, y = case_averaged(scores, MODELS.index(row["model"]), k), case_averaged(scores, 0, k)
        expected = sps.wilcoxon(x, y, zero_method="wilcox", method="exact")
        assert row["reference"] == "em_net" and int(row["n"]) == CASES and row["method"] == "exact"
        assert float(row["p"]) == pytest.approx(expected.pvalue, rel=1e-12)
        assert float(row["statistic"]) == expected.statistic
        assert float(row["mean_diff"]) == pytest.approx(np.mean(x - y), abs=1e-9)
        assert float(row["ci_low"]) <= float(row["mean_diff"]) <= float(row["ci_high"])
        assert (float(row["ci_low"]), float(row["ci_high"])) == stats.bootstrap_mean_ci(np.round(x - y, 9))
        better = (x > y) if row["metric"] == "dice" else (x < y)
        assert (int(row["wins"]), int(row["ties"]), int(row["losses"])) == (
            sum(better), sum(x == y), CASES - sum(better) - sum(x == y))


def test_stats_csv_holm_per_metric_family(compared):
    out, _, _, _ = compared
    rows = read_csv(out / "stats.csv")
    for metric in ("dice", "hd95"):
        family = [r for r in rows if r["metric"] == metric]
        p = [float(r["p"]) for r in family]
        m = len(p)
        ranked = sorted(range(m), key=lambda i: p[i])
        for i, r in enumerate(family):
            # Holm by its definition: the largest (m - j) p_(j) over the ranks j up to i's own, capped at 1
            upto = ranked[:ranked.index(i) + 1]
            expected = min(1.0, max((m - j) * p[ranked[j]] for j in range(len(upto))))
            assert float(r["p_holm"]) == pytest.approx(expected, rel=1e-12)


def test_holm_against_hand_computed_values():
    # sorted: 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> raised to 0.06; NaN not counted
    adjusted = stats.holm([0.01, 0.04, 0.03, 0.005, np.nan])
    np.testing.assert_allclose(adjusted[:4], [0.03, 0.06, 0.06, 0.02], rtol=1e-12)
    assert np.isnan(adjusted[4])
    np.testing.assert_allclose(stats.holm([0.5, 0.6]), [1.0, 1.0])  # 0.5 x2 = 1.0 caps the rest
    np.testing.assert_allclose(stats.holm([0.02]), [0.02])
    assert np.isnan(stats.holm([np.nan])).all()


def test_bootstrap_is_seeded_and_matches_scipy():
    d = np.random.default_rng(5).normal(0.02, 0.05, 12)
    ci = stats.bootstrap_mean_ci(d, seed=3)
    assert ci == stats.bootstrap_mean_ci(d, seed=3)
    assert ci != stats.bootstrap_mean_ci(d, seed=4)
    assert ci[0] < d.mean() < ci[1]
    ref = sps.bootstrap((d,), np.mean, n_resamples=10_000, method="percentile", vectorized=True,
                        rng=np.random.default_rng(3)).confidence_interval
    assert ci == pytest.approx((ref.low, ref.high), rel=1e-12)


def test_wins_ties_losses_by_hand():
    a, b = [0.9, 0.8, 0.7, 0.6], [0.8, 0.8, 0.9, 0.5]
    assert stats.wins_ties_losses(a, b, higher_is_better=True) == (2, 1, 1)
    assert stats.wins_ties_losses(a, b, higher_is_better=False) == (1, 1, 2)
    # equal up to float noise from averaging replicates is a tie
    assert stats.wins_ties_losses([(0.1 + 0.2) / 3 * 3], [0.3]) == (0, 1, 0)


def test_zero_differences_dropped_and_ties_use_exact_permutation():
    ref = np.linspace(0.5, 0.9, 10)
    d = np.array([0.0, 0.0, 0.1, -0.1, 0.2, 0.3, 0.3, 0.4, -0.05, 0.5])
    result = stats.wilcoxon_test(ref + d, ref)
    nonzero = np.round(d, 9)[np.round(d, 9) != 0]
    expected = sps.wilcoxon(nonzero, method=sps.PermutationMethod(n_resamples=np.inf))
    assert result["n"] == 10 and result["n_nonzero"] == 8 and result["method"] == "permutation"
    assert result["p"] == pytest.approx(expected.pvalue, rel=1e-12)
    assert result["statistic"] == expected.statistic
    assert result["note"] == "2 zero differences dropped"


def test_no_test_when_identical_or_too_few_differences():
    x = np.linspace(0.5, 0.9, 10)
    same = stats.wilcoxon_test(x, x)
    assert np.isnan(same["p"]) and same["note"] == "no test: identical scores on every case"
    few = stats.wilcoxon_test(x + np.r_[np.zeros(5), 0.1 * np.arange(1, 6)], x)
    assert np.isnan(few["p"]) and "only 5 cases differ (5 zero differences dropped)" in few["note"]


# ---- honesty checks and markers ---------------------------------------------------------------------------

def test_fewer_than_six_cases_no_test_and_why(tmp_path):
    dice, hd95 = make_scores(cases=5)
    summary = compare(make_results(dice, hd95), tmp_path)
    assert summary["tests_run"] is False
    for row in read_csv(tmp_path / "stats.csv"):
        assert row["p"] == row["p_holm"] == row["ci_low"] == ""
        assert row["note"] == "no test: 5 paired cases, fewer than 6"
        assert row["mean_diff"] != "" and row["wins"] != ""
    page = (tmp_path / "report.html").read_text()
    assert "no test: 5 paired cases, fewer than 6" in page
    assert "only 5 paired cases: no statistical test was run" in page
    assert "No significance marks" in (tmp_path / "table.md").read_text()


def test_dagger_where_holm_adjusted_p_below_005(tmp_path):
    # 12 cases, one class: exact p = 2 / 2**12 when the model wins every case; Holm over 2 tests keeps it small
    dice, hd95 = make_scores(n_models=2, seeds=1, cases=12, classes=1, seed=3)
    dice[1] = np.clip(dice[0] + 0.05 + 0.001 * np.arange(12)[None, :, None], 0, 1)
    summary = compare(make_results(dice, hd95, models=["base", "better"], classes=["liver"]), tmp_path)
    rows = {(r["class"], r["metric"]): r for r in read_csv(tmp_path / "stats.csv")}
    assert float(rows[("liver", "dice")]["p_holm"]) == pytest.approx(2 * 2 / 2 ** 12)
    first = md_table((tmp_path / "table.md").read_text(), "Table 1")
    assert first["better"][0].endswith("†") and first["better"][1].endswith("†")  # liver and mean Dice
    assert not any("†" in cell for cell in first["base"])
    marked_hd = float(rows[("mean", "hd95")]["p_holm"]) < 0.05
    assert first["better"][2].endswith("†") == marked_hd
    assert "± " not in first["better"][0]  # one run: the case mean alone
    assert summary["tests_run"] is True


def test_mismatched_cases_or_classes_raise_naming_runs():
    dice, hd95 = make_scores()
    results = make_results(dice, hd95)
    results[4].rows = [r for r in results[4].rows if r["case"] != "case03"]
    with pytest.raises(ValueError, match=r"different cases: 'unetr seed_1' lacks case03"):
        compare(results, "/nonexistent/never-written")
    results = make_results(dice, hd95)
    results[1].rows = [dict(r, class_name="esophagus") if r["class_index"] == 2 else r for r in results[1].rows]
    with pytest.raises(ValueError, match=r"different classes: 'em_net seed_1' lacks 2=liver; 'em_net seed_1' has "
                                         r"2=esophagus that 'em_net seed_0' lacks"):
        compare(results, "/nonexistent/never-written")
    results = make_results(dice, hd95)
    results[2].rows = results[2].rows[:-1]
    with pytest.raises(ValueError, match="'em_net seed_2' has no score for case case07 class 3"):
        compare(results, "/nonexistent/never-written")


def test_single_model_writes_everything_without_tests(tmp_path):
    dice, hd95 = make_scores(n_models=1)
    summary = compare(make_results(dice, hd95, models=["em_net"]), tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == FILES and summary["tests_run"] is False
    assert read_csv(tmp_path / "stats.csv") == []
    assert "one model, nothing to test against" in (tmp_path / "table.md").read_text()
    assert "**" not in (tmp_path / "table.md").read_text()  # nothing to rank against


def test_reference_choice(tmp_path):
    dice, hd95 = make_scores()
    results = make_results(dice, hd95)
    compare(results, tmp_path, reference="unetr")
    assert {(r["model"], r["reference"]) for r in read_csv(tmp_path / "stats.csv")} == {
        ("em_net", "unetr"), ("swin_unetr", "unetr")}
    with pytest.raises(ValueError, match="reference model 'nnunet' is not among"):
        compare(results, tmp_path, reference="nnunet")


# ---- rendering in a browser -------------------------------------------------------------------------------

PROBE = """<script>
window.addEventListener("load", () => {
  const box = (e) => { const r = e.getBoundingClientRect(); return {w: r.width, h: r.height}; };
  const rgba = (i) => {  // mean of each channel over the decoded image, as the browser painted it
    const canvas = document.createElement("canvas");
    canvas.width = i.naturalWidth;
    canvas.height = i.naturalHeight;
    const context = canvas.getContext("2d");
    context.drawImage(i, 0, 0);
    const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
    const sum = [0, 0, 0, 0];
    for (let p = 0; p < data.length; p++) sum[p % 4] += data[p];
    return sum.map((v) => v / (data.length / 4));
  };
  const images = [...document.images].map((i) => ({complete: i.complete, nw: i.naturalWidth, nh: i.naturalHeight,
                                                   rgba: rgba(i), ...box(i)}));
  const tables = [...document.querySelectorAll("table.results")].map((t) => ({...box(t), text: t.innerText}));
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({images, tables});
  document.body.appendChild(probe);
});
</script>
</body>"""


def test_report_renders_in_headless_chromium(compared, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    out, _, dice, _ = compared
    # the page alone in an empty folder with a probe appended: images can only come from the page itself
    page = tmp_path / "page" / "report.html"
    page.parent.mkdir()
    page.write_text((out / "report.html").read_text().replace("</body>", PROBE))
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'ud'}",
           "--window-size=1280,2000", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    found = re.search(r'<pre id="probe">(.*?)</pre>', run.stdout, re.DOTALL)
    assert found, f"the page's load handler did not run (exit {run.returncode}): {run.stderr[-2000:]}"
    probe = json.loads(html.unescape(found.group(1)))
    pngs = [png_size(out / name) for name in FIGURES]
    assert [(i["nw"], i["nh"]) for i in probe["images"]] == pngs  # decoded, at the size written
    assert all(i["complete"] and i["w"] > 200 and i["h"] > 100 for i in probe["images"])
    for image, name in zip(probe["images"], FIGURES):
        # every pixel decoded: the channel means equal those of the PNG file read by matplotlib
        expected = 255 * matplotlib.image.imread(out / name).reshape(-1, 4).mean(axis=0)
        np.testing.assert_allclose(image["rgba"], expected, atol=1.0, err_msg=name)
    assert len(probe["tables"]) == 2
    for table in probe["tables"]:
        assert table["w"] > 300 and table["h"] > 4 * 15  # header and three model rows laid out
        assert all(model in table["text"] for model in MODELS)
    mean_dice = 100 * dice[0].mean(axis=(1, 2))
    assert f"{mean_dice.mean():.2f} ± {np.std(mean_dice, ddof=1):.2f}" in probe["tables"][0]["text"]
