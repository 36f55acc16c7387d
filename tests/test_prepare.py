"""`main.py prepare` on a fake BTCV archive (and a fake MSD task) built from the synthetic phantoms: file lists,
splits, label remaps, untouched images and headers, the one-line errors, then training on the prepared folder."""
import hashlib
import json
import shutil
import signal
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import config
import data
import main
from data.prepare import prepare
from data.synthetic import make_case

REPO = Path(__file__).resolve().parents[1]
SHAPE = (24, 24, 8)
SPACING = (0.7, 0.7, 3.0)  # BTCV-like: fine in-plane, thick slices
LABELLED = list(range(1, 11)) + list(range(21, 41))
TEST_CASES = [1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38]
# The phantoms' 8 organs (spleen, right kidney, left kidney, gallbladder, liver, stomach, aorta, pancreas) carry
# their BTCV values; the 5 organs they lack (esophagus, IVC, portal vein, adrenal glands) are small blocks.
BTCV_VALUE_OF_PHANTOM = np.array([0, 1, 2, 3, 4, 6, 7, 8, 11], dtype=np.uint8)
EXTRA_ORGANS = (5, 9, 10, 12, 13)
STANDARD = {1: 1, 2: 2, 3: 3, 4: 4, 6: 5, 7: 6, 8: 7, 11: 8}  # BTCV value -> class (the paper's 8 organs)


def affine(number):
    """LPS-like (non-RAS), anisotropic, off-origin, a different origin per case."""
    a = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    a[:3, 3] = [8.0 + number, 9.0, -12.0 - number]
    return a


def save(array, number, path):
    img = nib.Nifti1Image(array, affine(number))
    img.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def fake_case(number):
    # Phantom content drawn at 4 mm so the whole abdomen fits in 24 x 24 x 8 voxels, stored at 0.7 x 0.7 x 3 mm.
    image, phantom, _ = make_case(np.random.default_rng(number), shape=SHAPE, spacing=(4.0, 4.0, 12.0))
    label = BTCV_VALUE_OF_PHANTOM[phantom]
    for i, value in enumerate(EXTRA_ORGANS):
        label[1 + 4 * i:3 + 4 * i, 20:22, 3:5] = value
    return image, label


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """The unpacked RawData.zip layout: 30 labelled training scans, 3 unlabelled testing scans."""
    root = tmp_path_factory.mktemp("Abdomen")
    training = root / "RawData" / "Training"
    for sub in (training / "img", training / "label", root / "RawData" / "Testing" / "img"):
        sub.mkdir(parents=True)
    for number in LABELLED:
        image, label = fake_case(number)
        save(image, number, training / "img" / f"img{number:04d}.nii.gz")
        save(label, number, training / "label" / f"label{number:04d}.nii.gz")
    for number in (61, 62, 63):
        save(fake_case(number)[0], number, root / "RawData" / "Testing" / "img" / f"img{number:04d}.nii.gz")
    return root


def raw_label(archive, number):
    return np.asarray(nib.load(str(archive / "RawData/Training/label" / f"label{number:04d}.nii.gz")).dataobj)


def names(entries, key="image"):
    return [Path(e[key]).name for e in entries]


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_synapse_standard_split_remap_and_untouched_images(archive, tmp_path, capsys):
    out = prepare("synapse", archive, tmp_path / "Synapse")
    content = json.loads((out / "dataset.json").read_text())
    assert content["labels"] == {"0": "background", "1": "spleen", "2": "right_kidney", "3": "left_kidney",
                                 "4": "gallbladder", "5": "liver", "6": "stomach", "7": "aorta", "8": "pancreas"}
    test_names = [f"img{n:04d}.nii.gz" for n in TEST_CASES]
    assert names(content["test"]) == test_names
    assert names(content["validation"]) == ["img0006.nii.gz", "img0024.nii.gz", "img0031.nii.gz", "img0039.nii.gz"]
    assert len(content["training"]) == 14
    assert not set(names(content["training"] + content["validation"])) & set(test_names)
    # the shipped split file is exactly what prepare writes
    shipped = json.loads((REPO / "configs/splits/synapse.json").read_text())
    assert {k: shipped[k] for k in ("training", "validation", "test")} == \
        {k: content[k] for k in ("training", "validation", "test")}

    for entry in content["training"] + content["test"]:
        number = int(Path(entry["image"]).name[3:7])
        raw_image = archive / "RawData/Training/img" / f"img{number:04d}.nii.gz"
        assert (out / entry["image"]).read_bytes() == raw_image.read_bytes()
        label = nib.load(str(out / entry["label"]))
        raw = raw_label(archive, number)
        expected = np.zeros_like(raw)
        for btcv_value, cls in STANDARD.items():
            expected[raw == btcv_value] = cls
        assert label.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(label.dataobj), expected)
        raw_header = nib.load(str(archive / "RawData/Training/label" / f"label{number:04d}.nii.gz")).header
        np.testing.assert_array_equal(label.affine, nib.load(str(raw_image)).affine)
        np.testing.assert_allclose(label.affine, affine(number), atol=1e-5)
        for key in ("dim", "pixdim", "qform_code", "sform_code", "srow_x", "srow_y", "srow_z", "xyzt_units"):
            np.testing.assert_array_equal(label.header[key], raw_header[key], err_msg=key)
    assert set(np.unique(raw_label(archive, 5))) >= {5, 9, 10, 12, 13}  # the dropped organs were there

    printed = capsys.readouterr().out
    assert "training       14 cases" in printed and "test           12 cases" in printed
    assert "spacing      0.70-0.70 x 0.70-0.70 x 3.00-3.00 mm" in printed and "pancreas" in printed
    cfg = config.resolve_config("synapse", overrides=[f"data.data_dir={out}"])
    lists = data.read_datalist(cfg["data"], cfg["model"]["out_channels"])
    assert [len(lists[s]) for s in ("training", "validation", "test")] == [14, 4, 12]


def test_synapse_reference_validates_on_the_test_cases():
    split = json.loads((REPO / "configs/splits/synapse_reference.json").read_text())
    assert names(split["validation"]) == names(split["test"])
    assert sorted(names(split["test"])) == [f"img{n:04d}.nii.gz" for n in TEST_CASES]
    assert len(split["training"]) == 18 and not set(names(split["training"])) & set(names(split["test"]))


def test_synapse_btcv8_keeps_labels_1_to_8(archive, tmp_path):
    out = prepare("synapse", archive / "RawData", tmp_path / "btcv8", labels="btcv8")  # --raw at RawData
    content = json.loads((out / "dataset.json").read_text())
    assert content["labels"]["5"] == "esophagus" and "pancreas" not in content["labels"].values()
    raw = raw_label(archive, 7)
    expected = np.where(raw <= 8, raw, 0)
    np.testing.assert_array_equal(np.asarray(nib.load(str(out / "labelsTr/label0007.nii.gz")).dataobj), expected)


def test_btcv_split_keeps_all_13_organs(archive, tmp_path):
    out = prepare("btcv", archive / "RawData" / "Training", tmp_path / "BTCV")  # --raw at RawData/Training
    content = json.loads((out / "dataset_0.json").read_text())
    assert len(content["labels"]) == 14 and content["labels"]["11"] == "pancreas"
    assert names(content["validation"]) == [f"img{n:04d}.nii.gz" for n in range(35, 41)]
    assert len(content["training"]) == 24
    assert content["test"] == [{"image": f"./imagesTs/img{n:04d}.nii.gz"} for n in (61, 62, 63)]
    np.testing.assert_array_equal(np.asarray(nib.load(str(out / "labelsTr/label0036.nii.gz")).dataobj),
                                  raw_label(archive, 36))
    cfg = config.resolve_config("btcv", overrides=[f"data.data_dir={out}"])
    lists = data.read_datalist(cfg["data"], cfg["model"]["out_channels"])
    assert [len(lists[s]) for s in ("training", "validation", "test")] == [24, 6, 3]


def test_msd_task_gets_a_validation_list(tmp_path):
    task = tmp_path / "Task09_Spleen"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task / sub).mkdir(parents=True)
    for number in range(5):
        image, label = fake_case(number)
        save(image, number, task / "imagesTr" / f"spleen_{number}.nii.gz")
        save((label == 1).astype(np.float32), number, task / "labelsTr" / f"spleen_{number}.nii.gz")
    save(fake_case(9)[0], 9, task / "imagesTs" / "spleen_9.nii.gz")
    (task / "dataset.json").write_text(json.dumps({
        "name": "Spleen", "labels": {"0": "background", "1": "spleen"},
        "training": [{"image": f"./imagesTr/spleen_{n}.nii.gz", "label": f"./labelsTr/spleen_{n}.nii.gz"}
                     for n in range(5)],
        "test": ["./imagesTs/spleen_9.nii.gz"]}))
    out = prepare("msd", task, tmp_path / "prepared")
    content = json.loads((out / "dataset.json").read_text())
    # msd_spleen.yaml's val_fraction 0.2 of 5 cases: the last one, as data.val_fraction would hold out
    assert names(content["training"]) == [f"spleen_{n}.nii.gz" for n in range(4)]
    assert names(content["validation"]) == ["spleen_4.nii.gz"] and content["name"] == "Spleen"
    assert content["test"] == [{"image": "./imagesTs/spleen_9.nii.gz"}]
    label = nib.load(str(out / "labelsTr/spleen_2.nii.gz"))
    assert label.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(label.dataobj))) == {0, 1}


def test_prepare_twice_gives_the_same_folder_and_needs_force(archive, tmp_path, capsys):
    out = prepare("synapse", archive, tmp_path / "Synapse")
    first = digest(out)
    with pytest.raises(config.ConfigError, match="Synapse exists; pass --force to replace it"):
        prepare("synapse", archive, out)
    (out / "stray.txt").write_text("left over")
    prepare("synapse", archive, out, force=True)
    assert digest(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Synapse"]  # no temporary folder left


def break_label_value(training):
    path = training / "label" / "label0009.nii.gz"
    label = np.asarray(nib.load(str(path)).dataobj).copy()
    label[0, 0, 0] = 14
    save(label, 9, path)
    return path, "label value 14 outside the protocol's range 0..13"


def break_shape(training):
    path = training / "label" / "label0007.nii.gz"
    save(np.zeros((24, 24, 7), np.uint8), 7, path)
    return path, f"shape (24, 24, 7) differs from its image {training / 'img' / 'img0007.nii.gz'} (24, 24, 8)"


def corrupt(training):
    path = training / "img" / "img0023.nii.gz"
    path.write_bytes(path.read_bytes()[:200])
    return path, "not a readable NIfTI file"


def non_finite(training):
    path = training / "img" / "img0010.nii.gz"
    image = np.asarray(nib.load(str(path)).dataobj).astype(np.float32)
    image[3, 3, 3] = np.nan
    save(image, 10, path)
    return path, "holds 1 non-finite intensities"


def missing_case(training):
    path = training / "img" / "img0022.nii.gz"
    path.unlink()
    return path, "not found: RawData/Training of the BTCV archive holds img0001-img0010 and img0021-img0040"


@pytest.mark.parametrize("damage", [break_label_value, break_shape, corrupt, non_finite, missing_case])
def test_first_bad_case_stops_with_one_line_and_leaves_nothing(archive, tmp_path, damage):
    raw = tmp_path / "raw"
    shutil.copytree(archive, raw)
    path, message = damage(raw / "RawData" / "Training")
    with pytest.raises(config.ConfigError) as err:
        prepare("synapse", raw, tmp_path / "out" / "Synapse")
    assert str(err.value).startswith(f"{path}: " if damage is not missing_case else f"{path} ")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(config.ConfigError, match=f"--raw {tmp_path / 'nowhere'}: folder not found"):
        prepare("synapse", tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "Abdomen" / "RawData").mkdir(parents=True)
    with pytest.raises(config.ConfigError, match="no RawData/Training/img and RawData/Training/label under it"):
        prepare("btcv", tmp_path / "Abdomen", tmp_path / "out")
    with pytest.raises(config.ConfigError, match="Abdomen: no dataset.json .point --raw at an MSD task folder"):
        prepare("msd", tmp_path / "Abdomen", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_default_output_list_name_and_validation_share_come_from_the_dataset_configs(tmp_path):
    def defaults(*argv):
        return main._prepare_defaults(main.build_parser().parse_args(["prepare", *argv]))

    assert defaults("synapse", "--raw", str(tmp_path)) == (Path("datasets/Synapse"), "dataset.json", 0.2)
    assert defaults("synapse", "--raw", str(tmp_path), "--labels", "btcv8")[0] == Path("datasets/Synapse_btcv8")
    assert defaults("btcv", "--raw", str(tmp_path))[:2] == (Path("datasets/BTCV"), "dataset_0.json")
    pancreas = defaults("msd", "--raw", str(tmp_path / "Task07_Pancreas"))
    assert pancreas[:2] == (Path("datasets/Task07_Pancreas"), "dataset.json")
    assert pancreas[2] == config.dataset_section("msd_pancreas")["val_fraction"]
    assert defaults("msd", "--raw", str(tmp_path / "Task07_Pancreas"), "--val_fraction", "0.3")[2] == 0.3


def test_prepare_then_train_and_test_best_and_latest_from_the_cli(archive, tmp_path, monkeypatch, capsys):
    # main.cli in this process: the command line's real path without paying the imports three more times
    monkeypatch.chdir(tmp_path)
    main.cli(["prepare", "synapse", "--raw", str(archive), "--out", "Synapse"])
    content = json.loads((tmp_path / "Synapse" / "dataset.json").read_text())
    # a shortened run: 2 training, 1 validation and 1 test case of the prepared folder
    small = {"training": content["training"][:2], "validation": content["validation"][:1], "test": content["test"][:1]}
    (tmp_path / "small.json").write_text(json.dumps(small))
    main.cli(["train", "--data_config", "synapse", "--model_config", "em_net_tiny", "--trainer_config", "synthetic",
              "--set", "data.data_dir=Synapse", "--set", f"data.split_file={tmp_path / 'small.json'}",
              "--set", "data.spacing=[1.4,1.4,3.0]", "--set", "data.num_workers=0",
              "--set", "model.roi_size=[32,32,32]", "--set", "trainer.max_epochs=1",
              "--set", "trainer.iters_per_epoch=2", "--set", "trainer.device=cpu", "--logdir", "run"])
    log = (tmp_path / "run" / "train.log").read_text()
    assert "validation mean Dice" in log and "pancreas" in log
    capsys.readouterr()

    main.cli(["test", "--checkpoint", "run"])
    for name in ("checkpoint_best", "checkpoint_latest"):
        summary = json.loads((tmp_path / "run" / "eval" / name / "summary.json").read_text())
        assert summary["num_cases"] == 1 and list(summary["per_class"])[-1] == "pancreas"
    table = (tmp_path / "run" / "eval" / "best_vs_latest.txt").read_text()
    assert "best (epoch 1)" in table and "latest (epoch 1)" in table and table.strip() in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_status:
        main.cli(["prepare", "synapse", "--raw", "nowhere"])
    assert exit_status.value.code == 2 and capsys.readouterr().err == "error: --raw nowhere: folder not found\n"


def _prepare_until_it_has_begun(archive, out, signum):
    """Run `main.py prepare synapse` and send `signum` once its partial folder holds a case; returns the exit
    status and the partial folders beside `out` afterwards."""
    import os
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, str(REPO / "main.py"), "prepare", "synapse", "--raw", str(archive),
                                "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if any(p.is_dir() and any(p.rglob("*.nii.gz")) for p in out.parent.glob(f".{out.name}.partial-*")):
            process.send_signal(signum)
            break
        time.sleep(0.002)
    status = process.wait(timeout=60)
    return status, sorted(out.parent.glob(f".{out.name}.*"))


def test_an_interrupted_prepare_leaves_no_partial_folder_behind(archive, tmp_path):
    status, left = _prepare_until_it_has_begun(archive, tmp_path / "Synapse", signal.SIGTERM)
    assert status == 128 + signal.SIGTERM and left == [] and not (tmp_path / "Synapse").exists()

    status, left = _prepare_until_it_has_begun(archive, tmp_path / "Synapse", signal.SIGKILL)
    assert status == -signal.SIGKILL and len(left) == 1  # nothing can clean up after SIGKILL...
    out = prepare("synapse", archive, tmp_path / "Synapse")  # ...so the next run of the same output does
    assert sorted(out.parent.glob(".Synapse.*")) == [] and (out / "dataset.json").is_file()
    assert digest(out) == digest(prepare("synapse", archive, tmp_path / "again"))


def test_a_full_disk_while_preparing_is_one_line_and_leaves_nothing(archive, full_disk, capsys):
    """The label files are written by nibabel, outside the atomic writer: the command line still names the
    disk's fault in one line, and the partial folder is gone."""
    (full_disk / "filler").write_bytes(b"\0" * 200 * 1024)
    with pytest.raises(SystemExit) as err:
        main.cli(["prepare", "synapse", "--raw", str(archive), "--out", str(full_disk / "Synapse")])
    last = capsys.readouterr().err.splitlines()[-1]
    assert err.value.code == 2 and last.startswith(f"error: disk full: {full_disk / '.Synapse.partial-'}"), last
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]
