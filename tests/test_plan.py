"""Fingerprint and plan: `main.py plan` and `prepare` on two generated data sets (anisotropic CT-like phantoms,
one case stored slice-first; MR-like phantoms), the plan's values checked against the rules computed here
independently, then `train` on plan.yaml as written and `test`; the bad inputs; the staleness warning; the
model registry's window rules against the builders."""
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

import config
import data
import main
import models
from data import fingerprint as fingerprints
from data import plan as plans
from data.preflight import check_datalist
from data.synthetic import make_case

IN_PLANE = 0.8
CT_Z = [5.0, 4.0, 5.0, 6.0, 5.0, 3.5]  # per training case: median 5, 10th percentile 3.75
CT_SLICES = [10, 6, 10, 6, 10, 6]
PERMUTED = 3  # this case is stored slice-first (voxel axes z, x, y)
MR_SPACING = (1.2, 1.2, 1.5)
CLASSES = {"0": "background", "1": "liver", "2": "stomach"}


def phantom(seed, shape):
    """(image in HU, label 0/1/2) of a synthetic abdomen drawn coarsely so that it fits `shape`."""
    image, organs, _ = make_case(np.random.default_rng(seed), shape=shape, spacing=(3.0, 3.0, 12.0))
    label = np.select([organs == 5, organs == 6], [1, 2], 0).astype(np.uint8)  # liver, stomach
    return image, label


def save(array, affine, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


def lps(spacing):
    return np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])


def save_case(root, folder, name, image, label, spacing, permuted=False):
    """Image and label as NIfTI; `permuted` stores them slice-first with the affine to match (same anatomy)."""
    affine = lps(spacing)
    if permuted:
        image, label = (np.ascontiguousarray(a.transpose(2, 0, 1)) for a in (image, label))
        affine = affine[:, [2, 0, 1, 3]]
    save(image, affine, root / f"images{folder}" / name)
    save(label, affine, root / f"labels{folder}" / name)
    return {"image": f"./images{folder}/{name}", "label": f"./labels{folder}/{name}"}


def make_ct_set(root):
    """Thick-slice CT phantoms (0.8 x 0.8 x 3.5-6 mm, 6 or 10 slices), no validation list, 2 labelled test cases
    shorter in z than any window. Returns {image path: (image, label, spacing)} of the labelled cases in RAS order."""
    cases, truth = [], {}
    for i, (z, slices) in enumerate(zip(CT_Z, CT_SLICES)):
        image, label = phantom(i, (32, 32, slices))
        cases.append(save_case(root, "Tr", f"ct_{i}.nii.gz", image, label, (IN_PLANE, IN_PLANE, z), i == PERMUTED))
        truth[cases[-1]["image"][2:]] = (image, label, (IN_PLANE, IN_PLANE, z))
    tests = [save_case(root, "Ts", f"ct_{i}.nii.gz", *phantom(i, (32, 32, 5)), (IN_PLANE, IN_PLANE, 5.0))
             for i in (10, 11)]
    (root / "dataset.json").write_text(json.dumps({"name": "ct", "modality": {"0": "CT"}, "labels": CLASSES,
                                                   "training": cases, "test": tests}))
    return truth


def mr_image(hu, seed):
    """An MR-like image of the phantom: another intensity scale, 0 outside the body."""
    signal = np.clip(hu + 1000.0, 0.0, None) * 0.6 + np.random.default_rng(seed).normal(0, 8.0, hu.shape)
    return np.where(hu < -900, 0.0, np.abs(signal)).astype(np.float32)


def make_mr_task(root):
    """An MSD task folder (for `prepare msd`): 5 MR-like cases and 1 labelled test case, 20 slices of 1.5 mm."""
    cases, truth = [], {}
    for i in range(5):
        hu, label = phantom(20 + i, (32, 32, 20))
        cases.append(save_case(root, "Tr", f"mr_{i}.nii.gz", mr_image(hu, i), label, MR_SPACING))
        truth[cases[-1]["image"][2:]] = (mr_image(hu, i), label, MR_SPACING)
    hu, label = phantom(30, (32, 32, 20))
    test = save_case(root, "Ts", "mr_9.nii.gz", mr_image(hu, 9), label, MR_SPACING)
    (root / "dataset.json").write_text(json.dumps({"name": "mr", "modality": {"0": "MRI"}, "labels": CLASSES,
                                                   "training": cases, "test": [test]}))
    return truth


# ---- the rules, computed here from the arrays as written -----------------------------------------------------


def expected_spacing(spacings, shapes):
    spacings, shapes = np.array(spacings), np.array(shapes, dtype=float)
    target, sizes = np.median(spacings, 0), np.median(shapes, 0)
    axis = int(np.argmax(target))
    rest = [a for a in range(3) if a != axis]
    if target[axis] > 3 * target[rest].max() and sizes[axis] * 3 < sizes[rest].min():
        target[axis] = max(np.percentile(spacings[:, axis], 10), target[rest].max())
    return target


def body_box(image):
    """Shape of the box of voxels above the image's minimum."""
    where = np.argwhere(image > image.min())
    return where.max(0) - where.min(0) + 1


def expected_window(boxes, spacings, target, multiple=32):
    median = np.median([np.array(b) * np.array(s) / target for b, s in zip(boxes, spacings)], axis=0)
    return [min(128, multiple * max(1, math.ceil(v / multiple))) for v in median]


def read_plan(path):
    """plan.yaml's sections, and whether every key has a comment line just above it."""
    lines = path.read_text().splitlines()
    keys = [i for i, line in enumerate(lines) if line.startswith("  ") and not line.strip().startswith("#")]
    return yaml.safe_load("\n".join(lines)), all(lines[i - 1].strip().startswith("# ") for i in keys)


def check_against_the_rules(plan, fingerprint, truth, normalization):
    images = [truth[c["image"]] for c in fingerprint["cases"]]
    spacings = [s for _, _, s in images]
    boxes = [body_box(image) for image, _, _ in images]
    assert [c["spacing"] for c in fingerprint["cases"]] == [list(s) for s in spacings]  # RAS order
    assert [c["shape_after_crop"] for c in fingerprint["cases"]] == [b.tolist() for b in boxes]
    assert [c["class_voxels"] for c in fingerprint["cases"]] == [np.bincount(lab.ravel(), minlength=3).tolist()
                                                                  for _, lab, _ in images]
    target = expected_spacing(spacings, boxes)
    np.testing.assert_allclose(plan["data"]["spacing"], target, atol=1e-5)
    assert plan["model"]["roi_size"] == expected_window(boxes, spacings, target)
    assert plan["model"]["out_channels"] == 3 and plan["model"]["in_channels"] == 1
    assert plan["data"]["normalization"] == normalization
    foreground = np.concatenate([image[label > 0] for image, label, _ in images]).astype(np.float64)
    stats = fingerprint["intensity"][0]
    assert stats["sampled_voxels"] == foreground.size  # under 10,000 per case: every foreground voxel
    np.testing.assert_allclose(list(stats["percentiles"].values()), np.percentile(foreground, [0.5, 50, 99.5]))
    np.testing.assert_allclose([stats["mean"], stats["std"]], [foreground.mean(), foreground.std()], rtol=1e-12)
    return target, foreground


def run_cli(*argv):
    return main.cli([str(a) for a in argv])


def train_and_test(plan_path, run, capsys):
    """Train 2 steps on plan.yaml as written, test both checkpoints; returns the run's config."""
    run_cli("train", "--data_config", plan_path, "--model_config", "em_net_tiny", "--trainer_config", "synthetic",
            "--set", "trainer.max_epochs=1", "--set", "trainer.iters_per_epoch=2", "--set", "trainer.device=cpu",
            "--logdir", run)
    assert "validation mean Dice" in (run / "train.log").read_text()
    assert "warning" not in capsys.readouterr().err
    run_cli("test", "--checkpoint", run)
    return yaml.safe_load((run / "config.yaml").read_text())


def predictions_match_inputs(data_dir, run):
    """Every test prediction has its image's shape and affine, also where the image is shorter than the window."""
    content = json.loads((data_dir / "dataset.json").read_text())
    for entry in content["test"]:
        image = nib.load(str(data_dir / entry["image"]))
        pred = nib.load(str(run / "eval" / "checkpoint_latest" / "predictions" / Path(entry["image"]).name))
        assert pred.shape == image.shape and np.allclose(pred.affine, image.affine)


# ---- end to end ------------------------------------------------------------------------------------------------


def test_ct_plan_follows_the_rules_then_trains_and_tests(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "ct"
    truth = make_ct_set(folder)
    before = {p: p.read_bytes() for p in folder.rglob("*.nii.gz")}
    run_cli("plan", folder, "--model_config", "em_net_tiny")
    assert sorted(p.name for p in folder.iterdir()) == [".fingerprint_cache.json", "dataset.json", "fingerprint.json",
                                                       "imagesTr", "imagesTs", "labelsTr", "labelsTs", "plan.yaml"]
    assert {p: p.read_bytes() for p in folder.rglob("*.nii.gz")} == before  # nothing copied or changed
    plan, commented = read_plan(folder / "plan.yaml")
    fingerprint = json.loads((folder / "fingerprint.json").read_text())
    assert commented
    target, foreground = check_against_the_rules(plan, fingerprint, truth, "ct")
    assert target[2] == 3.75 and plan["model"]["roi_size"] == [32, 32, 32]  # z at the 10th percentile
    np.testing.assert_allclose(plan["data"]["intensity_range"], np.percentile(foreground, [0.5, 99.5]), atol=1e-3)
    np.testing.assert_allclose([plan["data"]["intensity_mean"], plan["data"]["intensity_std"]],
                               [foreground.mean(), foreground.std()], atol=1e-4)
    assert plan["data"]["val_fraction"] == 0.2 and plan["data"]["data_dir"] == str(folder)
    assert plan["data"]["fingerprint_sha256"] == fingerprints.sha256_of(folder / "fingerprint.json")

    cfg = train_and_test(f"{folder.name}/plan.yaml", tmp_path / "run", capsys)
    assert cfg["data"]["normalization"] == "ct" and cfg["model"]["roi_size"] == [32, 32, 32]
    predictions_match_inputs(folder, tmp_path / "run")


def test_mr_prepare_plans_zscore_then_trains_and_tests(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    truth = make_mr_task(tmp_path / "Task01_MR")
    run_cli("prepare", "msd", "--raw", tmp_path / "Task01_MR", "--out", "mr", "--model_config", "em_net_tiny")
    folder = tmp_path / "mr"
    plan, commented = read_plan(folder / "plan.yaml")
    fingerprint = json.loads((folder / "fingerprint.json").read_text())
    assert commented and "plan written" in capsys.readouterr().out
    assert [c["split"] for c in fingerprint["cases"]] == ["training"] * 4 + ["validation"]  # prepare's split
    check_against_the_rules(plan, fingerprint, truth, "zscore")
    first = fingerprint["cases"][0]
    assert math.prod(first["shape_after_crop"]) < math.prod(first["shape"])  # MR's zero background is cropped
    assert "intensity_range" not in plan["data"] and "val_fraction" not in plan["data"]
    assert plan["model"]["roi_size"] == [32, 32, 32]

    # `plan` on the prepared folder measures the same (each case's sample is seeded by its path)
    prepared = (folder / "fingerprint.json").read_bytes()
    run_cli("plan", folder, "--model_config", "em_net_tiny")
    assert (folder / "fingerprint.json").read_bytes() == prepared

    train_and_test(tmp_path / "mr" / "plan.yaml", tmp_path / "run", capsys)
    predictions_match_inputs(folder, tmp_path / "run")


# ---- the fingerprint: sample, cache, staleness -------------------------------------------------------------------


def test_sample_is_bounded_seeded_and_read_once(tmp_path, monkeypatch):
    folder = tmp_path / "ct"
    truth = make_ct_set(folder)
    reads = []
    real_read = fingerprints.read_array
    monkeypatch.setattr(fingerprints, "read_array", lambda path: reads.append(Path(path).name) or real_read(path))
    fp = fingerprints.fingerprint_folder(folder, sample_size=200)[0]
    foreground = [image[label > 0].astype(np.float64) for image, label, _ in truth.values()]
    stats = fp["intensity"][0]
    assert stats["sampled_voxels"] == sum(min(v.size, 200) for v in foreground) < sum(v.size for v in foreground)
    pool = np.concatenate(foreground)
    assert np.percentile(pool, 35) <= stats["percentiles"]["50"] <= np.percentile(pool, 65)
    assert pool.min() <= stats["percentiles"]["0.5"] and stats["percentiles"]["99.5"] <= pool.max()
    assert len(reads) == 2 * len(truth)

    reads.clear()
    assert fingerprints.fingerprint_folder(folder, sample_size=200)[0] == fp  # from the cache, read nothing
    assert reads == []
    label = folder / "labelsTr" / "ct_1.nii.gz"
    save(np.asarray(nib.load(str(label)).dataobj), nib.load(str(label)).affine, label)  # rewritten: new mtime
    assert fingerprints.fingerprint_folder(folder, sample_size=200)[0] == fp  # same content, same sample
    assert sorted(reads) == ["ct_1.nii.gz", "ct_1.nii.gz"]
    assert len(json.loads((folder / ".fingerprint_cache.json").read_text())["entries"]) == len(truth)  # pruned


def test_a_plan_older_than_its_data_is_a_warning_at_the_preflight(tmp_path, capsys):
    folder = tmp_path / "ct"
    make_ct_set(folder)
    rule = plans.WindowRule("em-net", "em_net_tiny", (32, 32, 32))
    plan_path = plans.plan_folder(folder, rule)
    cfg = config.resolve_config(str(plan_path), "em_net_tiny")

    def warning():
        capsys.readouterr()
        check_datalist(cfg["data"], 1, 3)
        err = capsys.readouterr().err
        assert err.count("\n") <= 1
        return err

    assert warning() == ""
    label = folder / "labelsTr" / "ct_0.nii.gz"
    img = nib.load(str(label))
    values = np.asarray(img.dataobj).copy()
    save(values, img.affine, label)
    assert warning() == ""  # rewritten with the same content
    values[0, 0, 0] = 2
    save(values, img.affine, label)
    assert f"warning: the plan is older than its data: since {folder / 'fingerprint.json'} was made, 1 of its files " \
           "changed (e.g. labelsTr/ct_0.nii.gz: content changed); run `python main.py plan" in warning()
    plans.plan_folder(folder, rule)
    assert "is not the fingerprint this plan was made from (data.fingerprint_sha256 differs)" in warning()
    cfg = config.resolve_config(str(plan_path), "em_net_tiny")  # the new plan
    assert warning() == ""
    content = json.loads((folder / "dataset.json").read_text())
    content["training"].append({"image": "./imagesTs/ct_10.nii.gz", "label": "./labelsTs/ct_10.nii.gz"})
    (folder / "dataset.json").write_text(json.dumps(content))
    assert "1 listed case(s) are not in it (e.g. " in warning()
    (folder / "fingerprint.json").write_text("{}")
    assert "is not the fingerprint this plan was made from" in warning()


# ---- bad inputs ----------------------------------------------------------------------------------------------------


def tiny_set(root, spacings=((1.0, 1.0, 2.0),) * 3, channels=(1, 1, 1), classes=CLASSES):
    """Cases of 8 x 8 x 4 voxels, class 1 in each (class 2 in none)."""
    cases = []
    for i, (spacing, n) in enumerate(zip(spacings, channels)):
        image = np.random.default_rng(i).normal(0, 100, (8, 8, 4) + ((n,) if n > 1 else ())).astype(np.float32)
        label = np.zeros((8, 8, 4), np.uint8)
        label[2:6, 2:6, 1:3] = 1
        save(image, lps(spacing), root / "imagesTr" / f"t{i}.nii.gz")
        save(label, lps(spacing), root / "labelsTr" / f"t{i}.nii.gz")
        cases.append({"image": f"imagesTr/t{i}.nii.gz", "label": f"labelsTr/t{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"labels": classes, "training": cases}))
    return root


def one_line_error(capsys, *argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_status:
        run_cli(*argv)
    *progress, line = capsys.readouterr().err.splitlines()  # tqdm's bar, then the error
    assert exit_status.value.code == 2 and line.startswith("error: ") and all("fingerprint" in p for p in progress if p)
    return line


def test_mixed_channels_a_single_case_and_unknown_classes_are_one_line_errors(tmp_path, capsys):
    mixed = tiny_set(tmp_path / "mixed", channels=(1, 2, 1))
    err = one_line_error(capsys, "plan", mixed)
    assert f"{mixed}: cases have different numbers of channels: 1 (imagesTr/t0.nii.gz) and 2 (imagesTr/t1.nii.gz)" \
        in err
    single = tiny_set(tmp_path / "single", spacings=[(1.0, 1.0, 2.0)])
    err = one_line_error(capsys, "plan", single)
    assert f"{single}: 1 labelled case; a plan needs at least 2 (one to train on, one to validate on)" in err
    assert not (single / "plan.yaml").exists()
    assert "data.data_dir" not in one_line_error(capsys, "plan", tmp_path / "nowhere")
    beyond = tiny_set(tmp_path / "beyond", classes={"0": "background", "1": "liver"})
    label = nib.load(str(beyond / "labelsTr" / "t2.nii.gz"))
    save(np.asarray(label.dataobj) * 2, label.affine, beyond / "labelsTr" / "t2.nii.gz")
    err = one_line_error(capsys, "plan", beyond)
    assert f"{beyond / 'labelsTr' / 't2.nii.gz'}: label value 2 outside dataset.json's classes 0..1" in err


def test_a_class_in_no_case_and_spacings_far_apart_are_warnings_in_the_plan(tmp_path, capsys):
    folder = tiny_set(tmp_path / "t", spacings=[(1.0, 1.0, 0.5), (1.0, 1.0, 2.0), (1.0, 1.0, 6.0)])
    run_cli("plan", folder)
    printed, text = capsys.readouterr().out, (folder / "plan.yaml").read_text()
    for warning in ("class 2 (stomach) is in no case: the network cannot learn it",
                    "spacings along z (inferior-superior) differ over 10x: 0.5 mm (imagesTr/t0.nii.gz) and 6 mm "
                    "(imagesTr/t2.nii.gz); check the headers"):
        assert f"# WARNING: {warning}\n" in text and f"warning: {warning}\n" in printed
    plan, _ = read_plan(folder / "plan.yaml")
    assert plan["data"]["normalization"] == "zscore"  # no modality in dataset.json
    assert plan["model"]["roi_size"] == [32, 32, 32]  # the em_net default: multiples of 32


# ---- the rules one by one ------------------------------------------------------------------------------------------


def test_target_spacing_takes_the_10th_percentile_only_for_thick_and_few_slices():
    thick = [[0.8, 0.8, z] for z in (0.5, 0.5, 5.0, 5.0, 5.0)]
    assert plans.target_spacing(thick, [[400, 400, 40]] * 5)[0] == [0.8, 0.8, 0.8]  # not finer than in-plane
    assert plans.target_spacing(thick, [[400, 400, 200]] * 5)[0] == [0.8, 0.8, 5.0]  # not 3x fewer slices
    assert plans.target_spacing([[1.0, 1.0, 2.5]] * 3, [[300, 300, 50]] * 3)[0] == [1.0, 1.0, 2.5]  # < 3x
    spacing, why = plans.target_spacing([[4.0, 0.7, 0.7], [6.0, 0.7, 0.7]], [[30, 500, 500]] * 2)
    assert spacing == [4.2, 0.7, 0.7] and "x (left-right) is anisotropic" in why  # any axis, here the first


def test_window_rounds_each_side_up_to_the_models_multiple_and_caps_it():
    vtunet = plans.WindowRule("vtunet", "vtunet", *models.window_rule("vtunet"))
    assert vtunet.multiples == (4, 32, 32)
    assert plans.choose_window([10, 40, 300], vtunet) == [12, 64, 128]
    unet = plans.WindowRule("unet", "unet", *models.window_rule("unet"))  # 16, and 2 voxels at 1/16
    assert plans.choose_window([5, 5, 20], unet) == [16, 16, 32] and plans.choose_window([5, 5, 5], unet)[0] == 32


# Every network of the project (not the test nets other test files register), by its own config.
SHIPPED = [name for name in models.list_models() if name.replace("-", "_") in config.available("models")]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_models_window_rule_is_what_its_builder_accepts(name):
    cfg = config.resolve_config(model_config=name.replace("-", "_"))
    kwargs = config.model_kwargs(cfg)
    rule = plans.WindowRule(name, name, *models.window_rule(name, **kwargs))
    smallest = plans.choose_window([1, 1, 1], rule)
    models.build_model(name, **{**kwargs, "roi_size": smallest})
    for axis, multiple in enumerate(rule.multiples):
        if multiple > 1:
            off = list(smallest)
            off[axis] += multiple // 2
            with pytest.raises(ValueError):
                models.build_model(name, **{**kwargs, "roi_size": off})


# ---- the normalizations --------------------------------------------------------------------------------------------


def test_ct_normalization_clips_then_scores_and_zscore_is_per_image(tmp_path):
    cfg = config.resolve_config(overrides=["data.normalization=ct", "data.intensity_range=[-100, 300]",
                                           "data.intensity_mean=50", "data.intensity_std=80",
                                           "data.crop_foreground=false", "data.spacing=[1, 1, 1]"])
    ramp = np.broadcast_to(np.array([-1000, -100, 50, 300, 900], np.float32)[:, None, None], (5, 3, 2)).copy()
    save(ramp, np.eye(4), tmp_path / "ramp.nii.gz")
    out = data.eval_transforms(cfg["data"], with_label=False)({"image": str(tmp_path / "ramp.nii.gz")})["image"]
    np.testing.assert_allclose(out[0, :, 0, 0].numpy(), [-1.875, -1.875, 0.0, 3.125, 3.125], atol=1e-6)

    # zscore: cropped to the voxels above the minimum (the zero border), then mean 0 and std 1 there
    image = np.zeros((12, 10, 6), np.float32)
    image[2:9, 3:8, 1:5] = np.random.default_rng(0).uniform(100, 900, (7, 5, 4))
    save(image, np.eye(4), tmp_path / "mr.nii.gz")
    zscore = {**cfg["data"], "normalization": "zscore", "crop_foreground": True}
    out = data.eval_transforms(zscore, with_label=False)({"image": str(tmp_path / "mr.nii.gz")})["image"]
    assert tuple(out.shape) == (1, 7, 5, 4)
    assert abs(float(out.mean())) < 1e-5 and abs(float(out.std(unbiased=False)) - 1) < 1e-5


@pytest.mark.parametrize("normalization", ["ct", "zscore"])
def test_predictions_invert_to_the_input_geometry_with_either_crop(tmp_path, normalization):
    folder = tmp_path / "ct"
    make_ct_set(folder)
    plan_path = plans.plan_folder(folder, plans.WindowRule("em-net", "em_net", (32, 32, 32)))
    cfg = config.resolve_config(str(plan_path), overrides=[f"data.normalization={normalization}",
                                                           "data.num_workers=0"])
    for batch, entry in zip(data.make_eval_loader(cfg["data"], 3, "test"),
                            json.loads((folder / "dataset.json").read_text())["test"]):
        restored = data.invert_prediction(batch["label"][0].round().long(), batch, cfg["data"])
        truth = np.asarray(nib.load(str(folder / entry["label"])).dataobj)
        assert restored.shape == truth.shape and batch["image"].shape[-1] > truth.shape[-1]  # z: 5 mm -> 3.75 mm
        for value in (1, 2):
            a, b = restored == value, truth == value
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9, value
