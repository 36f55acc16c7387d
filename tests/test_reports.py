import json

import numpy as np
import pytest

import reports

NAMES = ["background", "liver", "spleen"]


def rows():
    return [
        {"case": "a", "class_index": 1, "class_name": "liver", "dice": 0.9, "hd95": 2.0},
        {"case": "a", "class_index": 2, "class_name": "spleen", "dice": 0.5, "hd95": 10.0},
        {"case": "b", "class_index": 1, "class_name": "liver", "dice": 0.7, "hd95": 4.0},
        {"case": "b", "class_index": 2, "class_name": "spleen", "dice": 0.0, "hd95": 300.0},
    ]


def test_metrics_csv_round_trip(tmp_path):
    path = tmp_path / "sub" / "metrics.csv"
    reports.write_metrics_csv(rows(), path)
    lines = path.read_text().splitlines()
    assert lines[0] == "case,class_index,class_name,dice,hd95"
    assert lines[1] == "a,1,liver,0.9,2.0"
    assert reports.read_metrics_csv(path) == rows()
    assert [p.name for p in path.parent.iterdir()] == ["metrics.csv"]  # no temporary left behind


def test_metrics_csv_names_missing_column(tmp_path):
    with pytest.raises(KeyError, match="hd95"):
        reports.write_metrics_csv([{"case": "a", "class_index": 1, "class_name": "x", "dice": 1.0}],
                                  tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


def test_summarize_means_and_stds():
    s = reports.summarize(rows(), NAMES)
    assert s["num_cases"] == 2
    assert list(s["per_class"]) == ["liver", "spleen"]
    liver, spleen = s["per_class"]["liver"], s["per_class"]["spleen"]
    assert liver["dice_mean"] == pytest.approx(0.8)
    assert liver["dice_std"] == pytest.approx(0.1)  # population std over cases
    assert liver["hd95_mean"] == pytest.approx(3.0)
    assert liver["hd95_std"] == pytest.approx(1.0)
    assert spleen["dice_mean"] == pytest.approx(0.25)
    assert spleen["hd95_mean"] == pytest.approx(155.0)
    assert s["mean_dice"] == pytest.approx((0.8 + 0.25) / 2)
    assert s["mean_hd95"] == pytest.approx((3.0 + 155.0) / 2)


def test_summarize_accepts_dict_names_and_rejects_no_rows():
    s = reports.summarize(rows(), {1: "L", 2: "S"})
    assert list(s["per_class"]) == ["L", "S"]
    with pytest.raises(ValueError, match="no metric rows"):
        reports.summarize([], NAMES)


def test_summary_json_and_table(tmp_path):
    s = reports.summarize(rows(), NAMES)
    path = reports.write_summary_json(s, tmp_path / "summary.json")
    assert json.loads(path.read_text()) == s
    table = reports.format_table(s)
    assert "liver" in table and "spleen" in table
    assert "80.00 ± 10.00" in table  # liver Dice in %
    assert "155.00 ± 145.00" in table  # spleen HD95 in mm
    assert "52.50" in table and "79.00" in table  # the means
    assert "(2 cases)" in table


def test_overlay_png(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(24, 20, 16)).astype(np.float32)
    gt = np.zeros(image.shape, dtype=np.uint8)
    gt[5:15, 5:12, 4:12] = 1
    gt[16:20, 3:8, 6:10] = 2
    pred = np.roll(gt, 1, axis=0)
    path = reports.save_overlay_png(image, gt, pred, tmp_path / "overlays" / "case.png", num_slices=4)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > width  # four rows of slices, three columns
    assert list(reports.figures._overlay_slices(gt, pred, 4)) == [5, 7, 8, 10]  # spread over foreground slices 4..11
    with pytest.raises(ValueError, match="one shape"):
        reports.save_overlay_png(image, gt[:-1], pred, tmp_path / "bad.png")


def test_progress_png(tmp_path):
    history = {"epoch": [1, 2, 3, 4], "loss": [1.0, 0.8, 0.6, 0.5], "val_epoch": [2, 4], "val_dice": [0.3, 0.5]}
    path = reports.plot_progress(history, tmp_path / "progress.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(KeyError, match="val_dice"):
        reports.plot_progress({"epoch": [], "loss": [], "val_epoch": []}, tmp_path / "p.png")
    with pytest.raises(ValueError, match="equal lengths"):
        reports.plot_progress({"epoch": [1], "loss": [], "val_epoch": [], "val_dice": []}, tmp_path / "p.png")
