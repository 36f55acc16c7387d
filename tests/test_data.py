"""Data room: dataset lists and their pre-flight errors, transforms, loaders and geometry inversion."""
import copy
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

import data
from data import DataConfigError

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (61, 45, 19)  # odd sizes on purpose
# Non-RAS: axes 0/1 swapped and flipped (an "PL"-like layout), anisotropic voxels, origin offset.
AFFINE = np.array(
    [
        [0.0, -1.3, 0.0, 20.5],
        [-0.9, 0.0, 0.0, 11.0],
        [0.0, 0.0, 3.0, -17.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _phantom(shape=SHAPE, seed=0):
    """Image (HU) and a label of 3 ellipsoids of different sizes, in voxel coordinates."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float64)
    label = np.zeros(shape, np.uint8)
    blobs = [((0.5, 0.5, 0.5), (0.3, 0.3, 0.35)), ((0.28, 0.3, 0.4), (0.2, 0.25, 0.3)),
             ((0.72, 0.7, 0.6), (0.2, 0.22, 0.3))]
    for value, (c, r) in enumerate(blobs, start=1):
        q = sum(((g / (n - 1) - ci) / ri) ** 2 for g, n, ci, ri in zip(grid, shape, c, r))
        label[q <= 1.0] = value
    body = sum(((g / (n - 1) - 0.5) / 0.42) ** 2 for g, n in zip(grid[:2], shape[:2])) <= 1.0
    label[~body] = 0
    image = np.where(body, 40.0, -1000.0) + 60.0 * label + rng.normal(0, 5, shape)
    return image.astype(np.int16), label


def _write(path, array, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


def _make_dataset(root, n_train=2, n_val=1, n_test=1, labels=4, test_as_paths=False):
    lists = {"training": [], "validation": [], "test": []}
    for i in range(n_train + n_val + n_test):
        split = "training" if i < n_train else "validation" if i < n_train + n_val else "test"
        image, label = _phantom(seed=i)
        _write(root / "images" / f"case{i}.nii.gz", image)
        _write(root / "labels" / f"case{i}.nii.gz", label)
        entry = {"image": f"./images/case{i}.nii.gz", "label": f"labels/case{i}.nii.gz"}
        lists[split].append(entry["image"] if split == "test" and test_as_paths else entry)
    content = {"labels": {str(k): f"class{k}" for k in range(labels)}, **lists}
    (root / "dataset.json").write_text(json.dumps(content))
    return content


def _cfg(data_dir, **data_overrides):
    with open(ROOT / "configs" / "defaults.yaml") as f:
        cfg = yaml.safe_load(f)
    cfg["data"].update(
        name="tiny", data_dir=str(data_dir), spacing=[1.5, 1.5, 2.0], intensity_range=[-175.0, 250.0],
        num_samples=2, cache_rate=1.0, num_workers=0, intensity_prob=0.0,
    )
    cfg["data"].update(data_overrides)
    cfg["model"].update(out_channels=4, roi_size=[32, 32, 32])
    cfg["trainer"]["batch_size"] = 1
    return cfg


def lists(cfg):
    return data.read_datalist(cfg["data"], cfg["model"]["out_channels"])


def train_transforms(cfg):
    return data.train_transforms(cfg["data"], cfg["model"]["roi_size"], cfg["model"]["out_channels"])


def train_loader(cfg, rank=0, world_size=1):
    return data.make_train_loader(cfg["data"], cfg["model"]["out_channels"], cfg["model"]["roi_size"],
                                  cfg["trainer"]["batch_size"], cfg["trainer"]["seed"], rank, world_size)


def eval_loader(cfg, split):
    return data.make_eval_loader(cfg["data"], cfg["model"]["out_channels"], split)


@pytest.fixture
def tiny(tmp_path):
    root = tmp_path / "tiny"
    _make_dataset(root)
    return root, _cfg(root)


# ---- dataset list ----------------------------------------------------------------------------------------


def test_read_datalist_absolute_paths_and_labels(tiny):
    root, cfg = tiny
    dl = lists(cfg)
    assert [len(dl[s]) for s in ("training", "validation", "test")] == [2, 1, 1]
    assert dl["labels"] == {0: "class0", 1: "class1", 2: "class2", 3: "class3"}
    assert dl["training"][0] == {
        "image": str((root / "images" / "case0.nii.gz").resolve()),
        "label": str((root / "labels" / "case0.nii.gz").resolve()),
    }
    assert data.class_names(cfg["data"], 4) == ["class0", "class1", "class2", "class3"]


def test_test_entries_may_be_plain_paths_or_absent(tmp_path):
    root = tmp_path / "d"
    content = _make_dataset(root, test_as_paths=True)
    dl = lists(_cfg(root))
    assert dl["test"] == [{"image": str((root / "images" / "case3.nii.gz").resolve())}]
    del content["test"]
    (root / "dataset.json").write_text(json.dumps(content))
    assert lists(_cfg(root))["test"] == []


def test_split_file_replaces_lists(tmp_path):
    root = tmp_path / "d"
    _make_dataset(root)
    split = {"training": [{"image": "images/case3.nii.gz", "label": "labels/case3.nii.gz"}],
             "validation": [{"image": "images/case0.nii.gz", "label": "labels/case0.nii.gz"}],
             "test": []}
    split_path = tmp_path / "split.json"
    split_path.write_text(json.dumps(split))
    dl = lists(_cfg(root, split_file=str(split_path)))
    assert [Path(e["image"]).name for e in dl["training"]] == ["case3.nii.gz"]
    assert [Path(e["image"]).name for e in dl["validation"]] == ["case0.nii.gz"]
    assert dl["test"] == [] and dl["labels"][3] == "class3"


def test_val_fraction_holds_out_last_training_cases(tmp_path):
    root = tmp_path / "d"
    content = _make_dataset(root, n_train=3, n_val=1)
    content["training"] += content.pop("validation")
    (root / "dataset.json").write_text(json.dumps(content))
    with pytest.raises(DataConfigError, match=r"dataset\.json: missing key 'validation'.*val_fraction"):
        lists(_cfg(root))
    dl = lists(_cfg(root, val_fraction=0.25))
    assert [Path(e["image"]).name for e in dl["training"]] == ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz"]
    assert [Path(e["image"]).name for e in dl["validation"]] == ["case3.nii.gz"]


def test_shipped_synapse_splits_match_reference():
    """synapse_reference.json is the reference's split (its order too: it sets the shuffle); synapse.json has the
    same 12 test cases and validates on 4 of the 18 training cases instead."""
    reference = json.loads((ROOT / "configs" / "splits" / "synapse_reference.json").read_text())
    honest = json.loads((ROOT / "configs" / "splits" / "synapse.json").read_text())
    ref = json.loads((ROOT.parent / "shared" / "reference" / "synapse_split.json").read_text()) if (
        ROOT.parent / "shared" / "reference" / "synapse_split.json").exists() else None
    assert len(reference["training"]) == 18 and len(reference["test"]) == 12
    assert reference["validation"] == reference["test"]
    images = lambda entries: {e["image"] for e in entries}  # noqa: E731
    assert not images(reference["training"]) & images(reference["test"])
    assert images(honest["test"]) == images(reference["test"])
    assert images(honest["training"]) | images(honest["validation"]) == images(reference["training"])
    assert len(honest["validation"]) == 4 and not images(honest["validation"]) & images(honest["training"])
    if ref is not None:
        assert reference["training"] == ref["training"] and reference["test"] == ref["validation"]


def _rewrite(root, mutate):
    content = json.loads((root / "dataset.json").read_text())
    mutate(content)
    (root / "dataset.json").write_text(json.dumps(content))


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda c: c.pop("labels"), r"dataset\.json: missing key 'labels'"),
        (lambda c: c.pop("training"), r"dataset\.json: missing key 'training'"),
        (lambda c: c.update(training=[]), r"dataset\.json: key 'training' is an empty list"),
        (lambda c: c["training"][1].update(image="images/nope.nii.gz"),
         r"dataset\.json found 1 problem\(s\):\n  training\[1\]: image file not found: .*nope\.nii\.gz"),
        (lambda c: c["validation"][0].update(label="labels/gone.nii.gz"),
         r"validation\[0\]: label file not found: .*gone\.nii\.gz"),
        (lambda c: c["labels"].pop("3"), r"dataset\.json: 'labels' lists 3 classes but model\.out_channels is 4"),
        (lambda c: c["labels"].update({"x": "y"}), r"dataset\.json: key 'labels' has a non-integer label value"),
        (lambda c: c["training"][0].pop("label"), r"dataset\.json: training\[0\] has no 'label'"),
        (lambda c: c.update(validation="val.json"), r"dataset\.json: key 'validation' must be a list"),
    ],
)
def test_preflight_errors_name_file_and_key(tiny, mutate, pattern):
    root, cfg = tiny
    _rewrite(root, mutate)
    with pytest.raises(DataConfigError, match=pattern):
        lists(cfg)


def test_preflight_missing_dir_json_and_split(tiny, tmp_path):
    root, cfg = tiny
    with pytest.raises(DataConfigError, match=r"data\.data_dir not found: .*nowhere"):
        lists(_cfg(tmp_path / "nowhere"))
    with pytest.raises(DataConfigError, match=r"data\.dataset_json not found: .*other\.json"):
        lists(_cfg(root, dataset_json="other.json"))
    with pytest.raises(DataConfigError, match=r"data\.split_file not found: .*split\.json"):
        lists(_cfg(root, split_file=str(tmp_path / "split.json")))
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DataConfigError, match=r"dataset\.json is not valid JSON"):
        lists(cfg)


# ---- transforms ------------------------------------------------------------------------------------------


def test_train_transforms_crop_to_roi_in_unit_range(tiny):
    _, cfg = tiny
    item = lists(cfg)["training"][0]
    out = train_transforms(cfg)(item)
    assert isinstance(out, list) and len(out) == cfg["data"]["num_samples"]
    for crop in out:
        assert tuple(crop["image"].shape) == (1, 32, 32, 32) == tuple(crop["label"].shape)
        assert crop["image"].min() >= 0.0 and crop["image"].max() <= 1.0
        assert set(torch.unique(crop["label"]).tolist()) <= {0, 1, 2, 3}


def test_class_balanced_crops_centre_on_every_class(tiny):
    _, cfg = tiny
    cfg["data"].update(crop_sampling="classes", num_samples=64)
    cfg["model"]["roi_size"] = [8, 8, 8]  # small enough that a crop's centre voxel decides its class
    item = lists(cfg)["training"][0]
    centres = [int(c["label"][0, 4, 4, 4]) for c in train_transforms(cfg)(item)]
    counts = np.bincount(centres, minlength=4)
    assert (counts >= 6).all(), counts  # 16 expected per class; with pos/neg, class 2 or 3 would be rarer


def test_eval_transforms_resample_reorient_and_window(tiny):
    _, cfg = tiny
    item = lists(cfg)["validation"][0]
    out = data.eval_transforms(cfg["data"])(item)
    image, label = out["image"], out["label"]
    assert image.shape == label.shape and image.shape[0] == 1
    assert nib.aff2axcodes(image.affine.numpy()) == ("R", "A", "S")
    np.testing.assert_allclose(np.abs(np.diag(image.affine.numpy())[:3]), [1.5, 1.5, 2.0], atol=1e-6)
    # physical extent kept: 45 x 1.3 mm, 61 x 0.9 mm, 19 x 3 mm before the foreground crop
    assert image.shape[1] <= round(45 * 1.3 / 1.5) and image.shape[3] <= round(19 * 3.0 / 2.0)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert set(torch.unique(label).tolist()) == {0, 1, 2, 3}  # nearest keeps labels integer
    uncropped = data.eval_transforms({**cfg["data"], "crop_foreground": False})(item)["image"]
    assert all(a < b for a, b in zip(image.shape[1:3], uncropped.shape[1:3]))  # air around the body cropped
    assert image.shape[3] == uncropped.shape[3]  # the body spans all slices
    no_label = data.eval_transforms(cfg["data"], with_label=False)({"image": item["image"]})
    assert "label" not in no_label and no_label["image"].shape == image.shape


def test_intensity_window_maps_hu_linearly(tmp_path):
    root = tmp_path / "d"
    _make_dataset(root)
    cfg = _cfg(root, crop_foreground=False, spacing=[0.9, 1.3, 3.0], orientation="RAS")
    hu = np.array([-1000, -175, 37.5, 250, 400], np.float32)
    image = np.broadcast_to(hu[:, None, None], (5, 4, 3)).copy()
    _write(root / "ramp.nii.gz", image, np.diag([0.9, 1.3, 3.0, 1.0]))
    out = data.eval_transforms(cfg["data"], with_label=False)({"image": str(root / "ramp.nii.gz")})["image"]
    np.testing.assert_allclose(out[0, :, 0, 0].numpy(), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


# ---- loaders ---------------------------------------------------------------------------------------------


def test_loaders_yield_expected_shapes(tiny):
    root, cfg = tiny
    batch = next(iter(train_loader(cfg)))
    assert tuple(batch["image"].shape) == (2, 1, 32, 32, 32) == tuple(batch["label"].shape)
    val = list(eval_loader(cfg, "validation"))
    assert len(val) == 1 and val[0]["image"].ndim == 5 and val[0]["image"].shape == val[0]["label"].shape
    pred = list(data.make_predict_loader(cfg["data"], [root / "images" / "case3.nii.gz"]))
    assert len(pred) == 1 and "label" not in pred[0] and pred[0]["image"].shape[:2] == (1, 1)
    with pytest.raises(DataConfigError, match="split must be 'validation' or 'test'"):
        eval_loader(cfg, "training")
    with pytest.raises(DataConfigError, match=r"image file not found: .*missing\.nii\.gz"):
        data.make_predict_loader(cfg["data"], [root / "missing.nii.gz"])


def test_distributed_train_loader_splits_cases(tiny):
    _, cfg = tiny
    loaders = [train_loader(cfg, rank=r, world_size=2) for r in (0, 1)]
    keys = [list(loader.sampler) for loader in loaders]  # (pass, position, case index)
    assert sorted(index for k in keys for _, _, index in k) == [0, 1]
    assert all(key[:2] == (0, 0) for k in keys for key in k)


# ---- geometry --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("crop_foreground", [True, False])
def test_inversion_round_trip_restores_original_geometry(tiny, tmp_path, crop_foreground):
    root, cfg = tiny
    cfg = copy.deepcopy(cfg)
    cfg["data"]["crop_foreground"] = crop_foreground
    batch = next(iter(eval_loader(cfg, "validation")))
    pre_shape = tuple(batch["image"].shape[2:])
    assert pre_shape != SHAPE  # really resampled and reoriented
    pred = batch["label"][0].round().long()  # identity "prediction" (1, H, W, D) in preprocessed space
    restored = data.invert_prediction(pred, batch, cfg["data"])
    original = nib.load(str(root / "labels" / "case2.nii.gz"))
    truth = np.asarray(original.dataobj)
    assert restored.shape == truth.shape == SHAPE
    assert np.issubdtype(restored.dtype, np.integer)
    for value in (1, 2, 3):
        a, b = restored == value, truth == value
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.95, value
    out = data.save_segmentation(restored, batch, tmp_path / "pred" / "case2.nii.gz")
    saved = nib.load(str(out))
    np.testing.assert_array_equal(saved.affine, original.affine)
    np.testing.assert_array_equal(np.asarray(saved.dataobj), restored)
    assert saved.get_data_dtype() == np.uint8


def test_inversion_rejects_mismatched_prediction(tiny):
    _, cfg = tiny
    batch = next(iter(eval_loader(cfg, "validation")))
    with pytest.raises(ValueError, match="does not match the preprocessed image"):
        data.invert_prediction(torch.zeros(1, 5, 5, 5), batch, cfg["data"])
    with pytest.raises(ValueError, match="original_affine"):
        data.save_segmentation(np.zeros((2, 2, 2)), {"affine": np.eye(4)}, "x.nii.gz")


def test_every_missing_file_is_listed_at_once(tiny):
    root, cfg = tiny

    def break_two(content):
        content["training"][1].update(image="images/nope.nii.gz")
        content["validation"][0].update(label="labels/gone.nii.gz")

    _rewrite(root, break_two)
    with pytest.raises(DataConfigError, match=r"dataset\.json found 2 problem\(s\):\n") as err:
        lists(cfg)
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 2
    assert "training[1]: image file not found" in lines[0] and "nope.nii.gz" in lines[0]
    assert "validation[0]: label file not found" in lines[1] and "gone.nii.gz" in lines[1]
