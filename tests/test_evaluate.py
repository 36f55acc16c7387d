"""test.py end to end on a tiny NIfTI data set and a tiny registered model (CPU, a few seconds)."""
import ast
import copy
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

import config
import metrics
import models
import reports
import test as evaluation
from core.checkpoint import CheckpointError, save_checkpoint
from engine.inference import SlidingWindow, infer_volume
from engine.network import load_network

MODEL = "tiny-eval-net"
NAMES = ["background", "soft", "bright"]
SHAPE = (26, 22, 12)
SPACING = (1.5, 1.2, 3.0)


class TinyNet(nn.Module):
    """Pointwise classifier of the [0, 1]-scaled intensity; rejects inputs other than its window."""

    def __init__(self, in_channels=1, out_channels=3, roi_size=(16, 16, 8), deep_supervision=False):
        super().__init__()
        self.roi_size = tuple(roi_size)
        self.head = nn.Conv3d(in_channels, out_channels, 1)
        if deep_supervision:
            self.deep_supervision_heads = nn.ModuleList([nn.Conv3d(in_channels, out_channels, 1)])

    def forward(self, x):
        if tuple(x.shape[2:]) != self.roi_size:
            raise ValueError(f"window {tuple(x.shape[2:])} != {self.roi_size}")
        return self.head(x)


if MODEL not in models.list_models():
    models.register_model(MODEL)(TinyNet)


def _affine(shift):
    # LPS-like, anisotropic, off-origin: orientation, resampling and inversion all have work to do
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    affine[:3, 3] = [20.0 + shift, 15.0, -10.0]
    return affine


def _case(rng, with_bright):
    """Image (HU) and label: body at 0 HU labelled 'soft', an inner block at 200 HU labelled 'bright'."""
    image = np.full(SHAPE, -1000, dtype=np.int16)
    label = np.zeros(SHAPE, dtype=np.uint8)
    x0, y0 = rng.integers(2, 5, size=2)
    image[x0:x0 + 18, y0:y0 + 14, 2:10] = 0
    label[x0:x0 + 18, y0:y0 + 14, 2:10] = 1
    image[x0 + 4:x0 + 10, y0 + 4:y0 + 9, 4:8] = 200
    if with_bright:
        # the label's block is one voxel larger than the bright region: an imperfect, known overlap
        label[x0 + 4:x0 + 11, y0 + 4:y0 + 9, 4:8] = 2
    return image, label


def _write_dataset(root, n_cases=3):
    rng = np.random.default_rng(1)
    (root / "imagesTs").mkdir(parents=True)
    (root / "labelsTs").mkdir()
    entries = []
    for i in range(n_cases):
        image, label = _case(rng, with_bright=i != 1)  # case 1: 'bright' missing from the label
        for folder, array in (("imagesTs", image), ("labelsTs", label)):
            nib.save(nib.Nifti1Image(array, _affine(i)), str(root / folder / f"case_{i}.nii.gz"))
        entries.append({"image": f"imagesTs/case_{i}.nii.gz", "label": f"labelsTs/case_{i}.nii.gz"})
    content = {"labels": {str(i): n for i, n in enumerate(NAMES)}, "training": entries[:1],
               "validation": entries[:1], "test": entries}
    (root / "dataset.json").write_text(json.dumps(content))
    return entries


def _cfg(root):
    cfg = config.read_yaml(config.DEFAULTS_FILE)
    cfg["data"].update(name="tiny", data_dir=str(root), spacing=[2.0, 2.0, 3.0], num_workers=0)
    cfg["model"] = {"name": MODEL, "in_channels": 1, "out_channels": 3, "roi_size": [16, 16, 8]}
    cfg["trainer"]["device"] = "cpu"
    cfg["inference"].update(sw_batch_size=2)
    return cfg


def _checkpoint(path, cfg, deep_supervision=True):
    """A checkpoint-room checkpoint of TinyNet trained with deep supervision; the weights classify
    x = HU scaled to [0, 1]: logits (0, 10x - 2, 20x - 8.5) give 0 below x 0.2, 1 up to x 0.65, 2 above."""
    net = TinyNet(roi_size=cfg["model"]["roi_size"], deep_supervision=deep_supervision)
    with torch.no_grad():
        net.head.weight.copy_(torch.tensor([0.0, 10.0, 20.0]).view(3, 1, 1, 1, 1))
        net.head.bias.copy_(torch.tensor([0.0, -2.0, -8.5]))
    save_checkpoint(path, {"state_dict": net.state_dict(), "config": cfg, "epoch": 3, "best_metric": 0.5})
    return path


@pytest.fixture
def setup(tmp_path):
    entries = _write_dataset(tmp_path / "data")
    cfg = _cfg(tmp_path / "data")
    return cfg, _checkpoint(tmp_path / "run" / "checkpoint_best.pt", cfg), entries, tmp_path


def test_evaluate_writes_predictions_metrics_summary_and_overlays(setup, capsys):
    cfg, ckpt, entries, tmp_path = setup
    summary = evaluation.evaluate(cfg, ckpt)
    out = tmp_path / "run" / "eval" / "checkpoint_best"  # default: next to the checkpoint

    rows = reports.read_metrics_csv(out / "metrics.csv")
    assert len(rows) == 3 * 2  # cases x foreground classes
    for i in range(3):
        image = nib.load(str(tmp_path / "data" / entries[i]["image"]))
        pred_img = nib.load(str(out / "predictions" / f"case_{i}.nii.gz"))
        assert pred_img.shape == image.shape
        np.testing.assert_allclose(pred_img.affine, image.affine, atol=1e-5)
        pred = np.asanyarray(pred_img.dataobj)
        label = nib.load(str(tmp_path / "data" / entries[i]["label"]))
        gt = np.asanyarray(label.dataobj)
        expected = metrics.per_class_metrics(pred, gt, 3, label.header.get_zooms())
        got = {r["class_index"]: r for r in rows if r["case"] == f"case_{i}"}
        assert [got[c]["class_name"] for c in (1, 2)] == ["soft", "bright"]
        for c in (1, 2):
            assert got[c]["dice"] == pytest.approx(expected[c]["dice"])
            assert got[c]["hd95"] == pytest.approx(expected[c]["hd95"])
        assert (out / "overlays" / f"case_{i}.png").read_bytes()[:4] == b"\x89PNG"

    by = {(r["case"], r["class_index"]): r for r in rows}
    # the intensity classifier finds the body well, resampling costs a little at the edges
    assert all(by[(f"case_{i}", 1)]["dice"] > 0.85 for i in range(3))
    assert by[("case_0", 2)]["dice"] > 0.6
    # case 1 has no 'bright' label but a bright region: hallucinated -> Dice 0, HD95 = image diagonal
    assert by[("case_1", 2)]["dice"] == 0.0
    assert by[("case_1", 2)]["hd95"] == pytest.approx(metrics.image_diagonal_mm(SHAPE, SPACING), rel=1e-5)

    assert json.loads((out / "summary.json").read_text()) == summary
    checkpoint = {"path": str(ckpt), "epoch": 3, "iteration": None}
    assert summary == {**reports.summarize(rows, NAMES), "split": "test", "checkpoint": checkpoint}
    assert summary["num_cases"] == 3 and list(summary["per_class"]) == ["soft", "bright"]
    printed = capsys.readouterr().out
    assert "soft" in printed and "bright" in printed and "(3 cases)" in printed


def test_a_bad_test_label_is_named_before_any_inference(setup, monkeypatch):
    cfg, ckpt, entries, tmp_path = setup
    path = tmp_path / "data" / entries[2]["label"]
    label = nib.load(str(path))
    broken = np.asarray(label.dataobj).copy()
    broken[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(broken, label.affine), str(path))
    monkeypatch.setattr(evaluation, "_segment", lambda *args: pytest.fail("inference ran before the check"))
    with pytest.raises(config.ConfigError) as err:
        evaluation.evaluate(cfg, ckpt)
    assert f"test[2]: label {path}" in str(err.value) and "7" in str(err.value)


def test_without_resampling_the_prediction_is_exactly_the_intensity_classes(setup):
    # target spacing = the files' spacing: only reorientation, cropping and their inversion remain, and
    # the pointwise model's prediction must equal the classes of the original intensities voxel for voxel
    cfg, ckpt, entries, tmp_path = setup
    cfg["data"]["spacing"] = list(SPACING)
    cfg["inference"]["save_overlays"] = False
    evaluation.evaluate(cfg, ckpt, out_dir=tmp_path / "ev")
    rows = {(r["case"], r["class_index"]): r for r in reports.read_metrics_csv(tmp_path / "ev" / "metrics.csv")}
    assert not (tmp_path / "ev" / "overlays").exists()
    for i in (0, 2):
        hu = np.asanyarray(nib.load(str(tmp_path / "data" / entries[i]["image"])).dataobj)
        expected = np.where(hu >= 200, 2, np.where(hu >= 0, 1, 0))
        pred = np.asanyarray(nib.load(str(tmp_path / "ev" / "predictions" / f"case_{i}.nii.gz")).dataobj)
        np.testing.assert_array_equal(pred, expected)
        # hand-computed: body 18x14x8 = 2016 voxels; bright block 6x5x4 = 120 in the image, 7x5x4 = 140 labelled
        assert rows[(f"case_{i}", 2)]["dice"] == pytest.approx(2 * 120 / (120 + 140))
        assert rows[(f"case_{i}", 1)]["dice"] == pytest.approx(2 * 1876 / (1876 + 1896))
        # directed 95th percentiles: gt -> pred 1.5 mm (the extra slice holds 20 of the 110 surface voxels),
        # pred -> gt 1.2 mm (6 of 96 surface voxels are interior to gt, 1 voxel along axis 1 from its face)
        assert rows[(f"case_{i}", 2)]["hd95"] == pytest.approx(SPACING[0])


def test_predict_folder_writes_one_file_per_input_in_its_geometry(setup):
    cfg, ckpt, entries, tmp_path = setup
    cfg["inference"]["mirror"] = True  # a pointwise model is flip-invariant: same result as without
    folder = tmp_path / "data" / "imagesTs"
    written = evaluation.predict(cfg, ckpt, folder, tmp_path / "pred")
    assert [p.name for p in written] == [f"case_{i}.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [p.name for p in written]
    evaluated = evaluation.evaluate(cfg, ckpt, out_dir=tmp_path / "ev")
    assert evaluated["num_cases"] == 3
    for i, path in enumerate(written):
        image = nib.load(str(folder / f"case_{i}.nii.gz"))
        pred = nib.load(str(path))
        assert pred.shape == image.shape
        np.testing.assert_allclose(pred.affine, image.affine, atol=1e-5)
        same = nib.load(str(tmp_path / "ev" / "predictions" / f"case_{i}.nii.gz"))
        np.testing.assert_array_equal(np.asanyarray(pred.dataobj), np.asanyarray(same.dataobj))


def test_predict_single_file_and_bad_inputs(setup):
    cfg, ckpt, entries, tmp_path = setup
    one = tmp_path / "data" / entries[2]["image"]
    assert [p.name for p in evaluation.predict(cfg, ckpt, one, tmp_path / "p1")] == ["case_2.nii.gz"]
    with pytest.raises(config.ConfigError, match="input not found: .*nope.nii.gz"):
        evaluation.predict(cfg, ckpt, tmp_path / "nope.nii.gz", tmp_path / "p2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(config.ConfigError, match="no NIfTI files"):
        evaluation.predict(cfg, ckpt, tmp_path / "empty", tmp_path / "p2")


def test_missing_checkpoint_is_a_config_error(setup):
    cfg, ckpt, entries, tmp_path = setup
    with pytest.raises(CheckpointError, match="checkpoint .*absent.pt does not exist"):
        evaluation.evaluate(cfg, tmp_path / "absent.pt")


def test_strict_loading_names_missing_and_unexpected_keys(setup):
    cfg, ckpt, entries, tmp_path = setup
    sd = torch.load(ckpt, weights_only=False)["state_dict"]
    sd.pop("head.bias")
    sd["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, {"state_dict": sd, "config": cfg})
    with pytest.raises(CheckpointError, match="missing keys 1: head.bias.*unexpected keys 1: extra.weight"):
        load_network(cfg, bad, torch.device("cpu"))


def test_loading_error_names_the_model_settings_that_differ(setup):
    cfg, ckpt, entries, tmp_path = setup
    other = copy.deepcopy(cfg)
    other["model"]["out_channels"] = 4
    with pytest.raises(CheckpointError, match=r"head.weight .*model.out_channels = 3 \(here 4\)"):
        load_network(other, ckpt, torch.device("cpu"))


def test_deep_supervision_heads_are_dropped_and_eval_mode(setup):
    cfg, ckpt, entries, tmp_path = setup
    model, _ = load_network(cfg, ckpt, torch.device("cpu"))
    assert not model.training
    assert not hasattr(model, "deep_supervision_heads")
    assert model.head.bias.tolist() == [0.0, -2.0, -8.5]


def test_mirroring_averages_softmax_over_flips():
    # out[:, 1, x] = in[x + 1] along axis 0 (zero padded); flipping axis 0 turns it into in[x - 1],
    # flips of the other axes change nothing: the mirrored mean is the mean of the two shifts' softmax
    net = nn.Conv3d(1, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        net.weight.zero_()
        net.weight[1, 0, 2, 1, 1] = 1.0
    image = torch.randn(1, 1, 8, 8, 8, dtype=torch.float32)
    window = SlidingWindow((8, 8, 8), overlap=0.0, sw_batch_size=1, blend_mode="constant")
    plus = torch.zeros_like(image)
    plus[:, :, :-1] = image[:, :, 1:]
    minus = torch.zeros_like(image)
    minus[:, :, 1:] = image[:, :, :-1]

    def softmax_of(shifted):
        return torch.softmax(torch.cat([torch.zeros_like(shifted), shifted], 1).double(), 1)

    plain = infer_volume(net, image, window)
    torch.testing.assert_close(plain.double(), softmax_of(plus), atol=1e-6, rtol=0)
    mirrored = infer_volume(net, image, SlidingWindow((8, 8, 8), 0.0, 1, "constant", mirror=True))
    torch.testing.assert_close(mirrored.double(), (softmax_of(plus) + softmax_of(minus)) / 2, atol=1e-6, rtol=0)


def test_cpu_windows_run_one_at_a_time_so_sw_batch_size_leaves_the_output_alone():
    torch.manual_seed(0)
    net = nn.Conv3d(1, 3, 3, padding=1)
    batches = []

    def model(windows):
        batches.append(windows.shape[0])
        return net(windows)

    image = torch.randn(1, 1, 20, 18, 12)
    outputs = []
    for sw_batch_size in (1, 4):
        outputs.append(infer_volume(model, image, SlidingWindow((8, 8, 8), 0.5, sw_batch_size, "gaussian")))
    assert set(batches) == {1} and len(batches) == 2 * 4 * 4 * 2  # windows per axis 4, 4, 2; two runs
    assert torch.equal(outputs[0], outputs[1])


def test_reference_em_net_checkpoint_is_converted(tmp_path):
    # every key and shape of the reference implementation's tiny EM-Net, loaded strictly into ours
    table = Path(__file__).resolve().parent / "data" / "emnet_tiny_reference_keys.tsv"
    sd = {}
    for line in table.read_text().splitlines():
        key, shape = line.split("\t")
        shape = ast.literal_eval(shape)
        sd[key] = torch.zeros(shape, dtype=torch.long) if key.endswith("num_batches_tracked") else torch.randn(shape)
    ref = tmp_path / "reference.pt"
    torch.save({"state_dict": sd, "epoch": 5, "best_acc": 0.7}, ref)
    cfg = config.read_yaml(config.DEFAULTS_FILE)
    cfg["model"] = {"name": "em-net", "in_channels": 1, "out_channels": 4, "feature_size": [8, 16, 32, 64],
                    "depths": [2, 2, 2, 2], "fft_nums": [0, 0, 2, 2], "hidden_size": 64, "roi_size": [32, 32, 32]}
    model, _ = load_network(cfg, ref, torch.device("cpu"))
    torch.testing.assert_close(model.out.conv.conv.weight, sd["out.conv.conv.weight"])


def test_run_folder_evaluation_checks_its_output_folder_before_loading_anything(tmp_path):
    from core import fileio

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint_best.pt").write_bytes(b"not read: the output check comes first")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(fileio.OutputError, match=r"output folder .*a_file/eval is not writable"):
        evaluation.evaluate_run({}, run, blocker / "eval")


def test_an_ensemble_averages_the_members_softmax_before_the_argmax(setup):
    """Two members that disagree: one sees 'bright' from x 0.65, the other (its bright logit shifted) never;
    the ensemble's label map is the argmax of their mean softmax, computed here from the same inputs."""
    cfg, ckpt, entries, tmp_path = setup
    other = tmp_path / "other" / "checkpoint_best.pt"
    _checkpoint(other, cfg)
    state = torch.load(other, weights_only=False)
    state["state_dict"]["head.bias"] = torch.tensor([0.0, -2.0, -30.0])  # bright never wins alone
    save_checkpoint(other, state)
    members = [(cfg, ckpt), (cfg, other)]
    summary = evaluation.evaluate_ensemble(members, tmp_path / "ensemble")
    assert json.loads((tmp_path / "ensemble" / "members.json").read_text()) == [str(ckpt), str(other)]
    assert [m["path"] for m in summary["checkpoint"]["members"]] == [str(ckpt), str(other)]

    loaded = [load_network(cfg, path, torch.device("cpu"))[0] for path in (ckpt, other)]
    window = SlidingWindow.from_config(cfg["inference"], cfg["model"]["roi_size"], False)
    batch = next(iter(evaluation.data.make_eval_loader(cfg["data"], 3, "test")))
    expected = torch.stack([infer_volume(m, batch["image"], window) for m in loaded]).mean(0).argmax(1)
    ours = evaluation.ensemble_probabilities([(m, window) for m in loaded], batch["image"]).argmax(1)
    assert torch.equal(ours, expected)
    single = [infer_volume(m, batch["image"], window).argmax(1) for m in loaded]
    assert not torch.equal(single[0], single[1]) and not torch.equal(ours, single[0])  # not the first member

    mismatched = copy.deepcopy(cfg)
    mismatched["data"]["spacing"] = [1.0, 1.0, 1.0]
    with pytest.raises(config.ConfigError, match=r"ensemble: .*other.* has data.spacing = \[1.0, 1.0, 1.0\]"):
        evaluation.evaluate_ensemble([(cfg, ckpt), (mismatched, other)], tmp_path / "bad")
    zscored = copy.deepcopy(cfg)
    zscored["data"]["normalization"] = "zscore"
    with pytest.raises(config.ConfigError, match=r"ensemble: .*other.* has data.normalization = 'zscore'"):
        evaluation.evaluate_ensemble([(cfg, ckpt), (zscored, other)], tmp_path / "bad")
