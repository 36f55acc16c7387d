"""Synthetic CT phantoms: determinism, anatomy, geometry, and the atomic generation of the data set."""
import json

import nibabel as nib
import numpy as np
import pytest
import yaml

import data
from data import synthetic


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate_synthetic_dataset(out, n_train=2, n_val=1, n_test=1, seed=7)
    return out


def _case(seed):
    return synthetic.make_case(np.random.default_rng(seed))


def test_same_seed_same_case_different_seed_different():
    image_a, label_a, affine_a = _case(3)
    image_b, label_b, affine_b = _case(3)
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_array_equal(label_a, label_b)
    np.testing.assert_array_equal(affine_a, affine_b)
    image_c, label_c, _ = _case(4)
    assert (label_a != label_c).mean() > 0.001 and not np.array_equal(image_a, image_c)


def test_dataset_is_deterministic_in_seed(generated, tmp_path):
    synthetic.generate_synthetic_dataset(tmp_path / "again", n_train=2, n_val=1, n_test=1, seed=7)
    synthetic.generate_synthetic_dataset(tmp_path / "other", n_train=1, n_val=0, n_test=0, seed=8)
    for rel in ("imagesTr/phantom_000.nii.gz", "labelsTs/phantom_003.nii.gz"):
        ref = np.asarray(nib.load(str(generated / rel)).dataobj)
        np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "again" / rel)).dataobj), ref)
    other = np.asarray(nib.load(str(tmp_path / "other" / "imagesTr/phantom_000.nii.gz")).dataobj)
    assert not np.array_equal(other, np.asarray(nib.load(str(generated / "imagesTr/phantom_000.nii.gz")).dataobj))


def test_dataset_json_lists_and_labels(generated):
    content = json.loads((generated / "dataset.json").read_text())
    assert content["labels"] == {str(k): v for k, v in synthetic.LABELS.items()} and len(content["labels"]) == 9
    assert [len(content[s]) for s in ("training", "validation", "test")] == [2, 1, 1]
    for split in ("training", "validation", "test"):
        for entry in content[split]:
            assert (generated / entry["image"]).is_file() and (generated / entry["label"]).is_file()


def test_every_case_has_all_organs_with_plausible_hu(generated):
    content = json.loads((generated / "dataset.json").read_text())
    for entry in content["training"] + content["validation"] + content["test"]:
        image = np.asarray(nib.load(str(generated / entry["image"])).dataobj).astype(np.float64)
        label = np.asarray(nib.load(str(generated / entry["label"])).dataobj)
        assert set(np.unique(label).tolist()) == set(range(9))
        counts = {v: int((label == v).sum()) for v in range(1, 9)}
        assert counts[5] == max(counts.values())  # the liver is the largest organ
        assert min(counts.values()) >= 150  # smallest organs stay several voxels wide after resampling
        for value, hu_key, *_ in synthetic.ORGANS + [(7, "aorta")]:
            inside = image[label == value]
            if hu_key == "stomach":
                assert (inside < -500).mean() > 0.03  # gas cap
                inside = inside[inside > -500]
            # per-case contrast jitter (5 HU), noise and partial volume at the rim move the median a little
            assert abs(np.median(inside) - synthetic.HU[hu_key]) < 30, (entry["image"], hu_key)
        outside = image[(label == 0)]
        assert np.median(image[0]) < -900  # air around the body
        assert (np.abs(outside - synthetic.HU["fat"]) < 50).mean() > 0.02  # subcutaneous fat and organ planes
        noise = image[label == 5] - np.median(image[label == 5])
        assert 8 < np.std(noise) < 25


def test_geometry_is_non_ras_and_anisotropic(generated):
    img = nib.load(str(generated / "imagesTr" / "phantom_000.nii.gz"))
    lab = nib.load(str(generated / "labelsTr" / "phantom_000.nii.gz"))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    np.testing.assert_allclose(img.header.get_zooms(), synthetic.SPACING)
    assert img.shape == synthetic.SHAPE and img.get_data_dtype() == np.int16
    np.testing.assert_array_equal(img.affine, lab.affine)
    assert lab.get_data_dtype() == np.uint8
    # Anatomy sits on the correct side in patient space: liver on the right (RAS x > 0), spleen on the left.
    label = np.asarray(lab.dataobj)
    centre = nib.affines.apply_affine(img.affine, (np.array(img.shape) - 1) / 2)

    def mean_x(value):
        return nib.affines.apply_affine(img.affine, np.argwhere(label == value)).mean(0)[0] - centre[0]

    assert mean_x(5) > 5 and mean_x(1) < -5
    assert np.abs(img.affine[:3, 3]).max() > 20  # origin away from the volume corner at 0


def test_ensure_generates_once_and_atomically(tmp_path, monkeypatch):
    target = tmp_path / "sets" / "synthetic"

    def crash(out_dir, **kwargs):
        (out_dir / "imagesTr").mkdir(parents=True)
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "generate_synthetic_dataset", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        synthetic.ensure_synthetic_dataset(target)
    assert not target.exists() and list((tmp_path / "sets").iterdir()) == []  # nothing half-written left
    monkeypatch.undo()

    json_path = synthetic.ensure_synthetic_dataset(target, n_train=1, n_val=1, n_test=1, seed=0)
    assert json_path == target.resolve() / "dataset.json"
    stamp = json_path.stat().st_mtime_ns
    assert synthetic.ensure_synthetic_dataset(target, n_train=1, n_val=1, n_test=1, seed=0) == json_path
    assert json_path.stat().st_mtime_ns == stamp  # not regenerated
    assert sorted(p.name for p in (tmp_path / "sets").iterdir()) == ["synthetic"]


def test_synthetic_config_reads_and_fits_roi(tmp_path):
    """configs/datasets/synthetic.yaml on the phantoms: at 2 mm the body is a few 32^3 windows across."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "configs" / "defaults.yaml").read_text())
    layer = yaml.safe_load((root / "configs" / "datasets" / "synthetic.yaml").read_text())
    for section, values in layer.items():
        cfg[section].update(values)
    cfg["data"]["data_dir"] = str(tmp_path / "synthetic")
    synthetic.ensure_synthetic_dataset(cfg["data"]["data_dir"], n_train=1, n_val=1, n_test=1)
    dl = data.read_datalist(cfg["data"], 9)
    assert data.class_names(cfg["data"], 9)[5] == "liver" and len(dl["test"]) == 1
    out = data.eval_transforms(cfg["data"])(dl["validation"][0])
    shape = out["image"].shape[1:]
    assert all(32 <= n <= 64 for n in shape), shape  # about 48 x 34 x 50
    assert all(r % 32 == 0 for r in cfg["model"]["roi_size"])
    label = out["label"][0].numpy()
    assert set(np.unique(label).tolist()) == set(range(9))
    # after resampling even the smallest organ keeps a real volume
    assert min(int((label == v).sum()) for v in range(1, 9)) >= 40
