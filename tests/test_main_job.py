"""The whole product from the command line, as a user runs it: the main job (shortened) with the real tiny
EM-Net on the synthetic phantoms, then `test` from the run folder alone, then `predict`."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd):
    result = subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=cwd, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    work = tmp_path_factory.mktemp("job")
    stdout = run_cli("run", "--set", "trainer.max_epochs=1", "--set", "trainer.iters_per_epoch=2",
                     "--set", "trainer.val_every=1", "--set", f"data.data_dir={work / 'synthetic'}",
                     "--logdir", str(work / "run"), cwd=work)
    return work, stdout


def test_main_job_writes_every_output_and_prints_the_table(main_job):
    work, stdout = main_job
    run = work / "run"
    for name in ("config.yaml", "train.log", "progress.png", "checkpoint_latest.pt", "checkpoint_best.pt"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))
    assert "gallbladder" in stdout and "HD95" in stdout and str(run) in stdout
    eval_dir = run / "eval" / "checkpoint_best"
    with open(eval_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 8  # 4 test phantoms x 8 organs
    for row in rows:  # the empty-mask rule: never NaN, Dice in [0, 1]
        assert 0.0 <= float(row["dice"]) <= 1.0 and np.isfinite(float(row["hd95"]))
    summary = json.loads((eval_dir / "summary.json").read_text())
    assert summary["num_cases"] == 4 and set(summary["per_class"]) >= {"liver", "pancreas"}
    assert len(list((eval_dir / "overlays").glob("*.png"))) == 4


def test_predictions_keep_each_input_geometry(main_job):
    work, _ = main_job
    dataset = json.loads((work / "synthetic" / "dataset.json").read_text())
    for entry in dataset["test"]:
        image = nib.load(work / "synthetic" / entry["image"])
        name = Path(entry["image"]).name
        pred = nib.load(work / "run" / "eval" / "checkpoint_best" / "predictions" / name)
        assert pred.shape == image.shape
        np.testing.assert_allclose(pred.affine, image.affine, atol=1e-5)
        assert set(np.unique(np.asarray(pred.dataobj))) <= set(range(9))


def test_test_and_predict_from_the_run_folder_alone(main_job):
    work, _ = main_job
    checkpoint = work / "run" / "checkpoint_latest.pt"
    run_cli("test", "--checkpoint", str(checkpoint), "--set", f"data.data_dir={work / 'synthetic'}",
            "--output", str(work / "retest"), cwd=work)
    assert (work / "retest" / "metrics.csv").is_file()

    image_path = next((work / "synthetic").glob("imagesTs/*.nii.gz"))
    run_cli("predict", "--checkpoint", str(checkpoint), "--input", str(image_path),
            "--output", str(work / "segmentations"), cwd=work)
    written = list((work / "segmentations").glob("*.nii.gz"))
    assert len(written) == 1
    image, seg = nib.load(image_path), nib.load(written[0])
    assert seg.shape == image.shape
    np.testing.assert_allclose(seg.affine, image.affine, atol=1e-5)


def test_bad_override_fails_before_any_work(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "main.py"), "--set", "data.spacng=[1,1,1]"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "data.spacng" in result.stderr and "data.spacing" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_unknown_scan_backend_for_test_is_a_one_line_error(main_job):
    work, _ = main_job
    result = subprocess.run([sys.executable, str(REPO / "main.py"), "test", "--checkpoint",
                             str(work / "run" / "checkpoint_latest.pt"), "--set", "trainer.scan_backend=warp"],
                            cwd=work, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "trainer.scan_backend" in result.stderr and "'warp'" in result.stderr


@pytest.mark.parametrize("script, args, message", [
    ("train.py", ["--set", "trainer.lrr=1"], "did you mean 'trainer.lr'"),
    ("test.py", ["--checkpoint", "missing.pt"], "checkpoint missing.pt not found"),
])
def test_train_and_test_scripts_run_directly_with_the_cli_flags(tmp_path, script, args, message):
    result = subprocess.run([sys.executable, str(REPO / script), *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr
