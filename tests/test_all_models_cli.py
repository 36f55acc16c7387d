"""Every registered baseline goes through the product like EM-Net: `main.py train` for a couple of steps on the
synthetic phantoms, then `main.py test` on the checkpoint it wrote; and `flops --all` lists every registered
model. EM-Net itself is covered by test_main_job.py. The CLI runs in this process (main.cli, the function
`python main.py` calls) to save a Python start-up per command."""
import csv
import importlib.abc
import importlib.util
import shutil
import sys

import pytest
import torch

import data
import main
import models
from models import registry

# The smallest window each network accepts where 32^3 does not (its builder's check): these downsample 32x
# and need at least 2 voxels on the coarsest map (instance norm), or (TransUNet) more than one.
WINDOWS = {
    "swin_unetr": [64, 32, 32],
    "nnunet": [64, 32, 32],
    "umamba_bot": [64, 32, 32],
    "umamba_enc": [64, 32, 32],
    "umamba_bot_official": [64, 32, 32],
    "umamba_enc_official": [64, 32, 32],
    "transunet": [64, 32, 32],
}
BASELINES = [name for name in models.list_models() if name != "em-net"]
NUM_ORGANS = 8

# Short runs: one crop per step, one step, one validation, 4 mm voxels (a phantom fits in one or two
# windows), no overlap between windows, nothing cached beyond the cases read, no pictures or prediction files.
FAST = ["--set", "trainer.max_epochs=1", "--set", "trainer.iters_per_epoch=1", "--set", "trainer.val_every=1",
        "--set", "data.spacing=[4.0,4.0,4.0]",
        "--set", "trainer.warmup_epochs=0", "--set", "data.num_samples=1", "--set", "data.cache_rate=0",
        "--set", "inference.val_overlap=0", "--set", "inference.overlap=0", "--set", "inference.sw_batch_size=2",
        "--set", "inference.save_overlays=false", "--set", "inference.save_predictions=false",
        "--set", "trainer.device=cpu"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "synthetic"
    data.generate_synthetic_dataset(folder, n_train=1, n_val=1, n_test=1)
    return folder


def _config_flags(name):
    return ["--data_config", "synthetic", "--model_config", name.replace("-", "_"), "--trainer_config", "synthetic"]


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_trains_and_tests_through_main(name, synthetic, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    window = WINDOWS.get(name, [32, 32, 32])
    common = [*_config_flags(name), "--set", f"model.roi_size={window}", "--set", f"data.data_dir={synthetic}", *FAST]
    run = tmp_path / "run"
    result = main.cli(["train", *common, "--logdir", str(run)])
    checkpoint = run / "checkpoint_latest.pt"
    assert result["latest_checkpoint"] is not None and checkpoint.is_file()
    assert result["best_checkpoint"] is not None  # the validation after the epoch ran

    main.cli(["test", "--checkpoint", str(checkpoint), "--set", f"data.data_dir={synthetic}", *FAST,
              "--output", str(tmp_path / "eval")])
    with open(tmp_path / "eval" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == NUM_ORGANS  # one test case
    assert {(row["case"], row["class_index"]) for row in rows} == {
        ("phantom_002", str(organ)) for organ in range(1, NUM_ORGANS + 1)}
    for row in rows:
        assert 0.0 <= float(row["dice"]) <= 1.0
    shutil.rmtree(run)  # checkpoints of the large baselines hold ~1 GB of weights and optimizer state


@pytest.fixture
def model_without_config():
    name = "zz-test-net-without-config"
    registry.register_model(name)(lambda in_channels=1, out_channels=9, roi_size=(32, 32, 32): torch.nn.Identity())
    yield name
    del registry._BUILDERS[name]


def test_flops_all_lists_every_registered_model(tmp_path, monkeypatch, capsys, model_without_config):
    monkeypatch.chdir(tmp_path)
    window = [64, 32, 32]  # one window every registered network accepts (see WINDOWS)
    rows = main.cli(["flops", "--all", "--set", f"model.roi_size={window}", "--set", "trainer.device=cpu",
                     "--output", str(tmp_path / "flops")])
    out = capsys.readouterr().out
    names = models.list_models()
    assert [row["model"] for row in rows] == names
    with open(tmp_path / "flops" / "flops.csv") as f:
        table = {row["model"]: row for row in csv.DictReader(f)}
    markdown = (tmp_path / "flops" / "flops.md").read_text()
    assert set(table) == set(names)
    for name in names:
        row = table[name]
        assert f"| {name} |" in markdown and f"| {name} |" in out
        counted = row["params"] != ""
        assert counted != bool(row["note"]), row  # numbers, or a reason, never neither
        if counted:
            assert int(row["params"]) > 0 and int(row["flops"]) >= int(row["scan_flops"]) >= 0
            assert int(row["flops"]) >= 2 * int(row["macs"]) > 0
    config_name = model_without_config.replace("-", "_")
    assert table[model_without_config]["note"] == f"no config configs/models/{config_name}.yaml"

    # EM-Net's row is its own count: parameters of the paper's config at this window, and its scans.
    em_net = models.build_model("em-net", roi_size=window)
    assert int(table["em-net"]["params"]) == sum(p.numel() for p in em_net.parameters())
    assert int(table["em-net"]["scan_flops"]) > 0


def test_calflops_counter_without_calflops_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "calflops", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "torchvision", None)  # the same: a broken one is the next test's case
    with pytest.raises(SystemExit) as exit_info:
        main.cli(["flops", "--all", "--counter", "calflops"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "pip install -r requirements-flops.txt" in err


class _TorchvisionBuiltForAnotherTorch(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `torchvision` as pip's CUDA build does beside torch+cpu: its operator registrations fail."""

    def find_spec(self, name, path, target=None):
        return importlib.util.spec_from_loader(name, self) if name == "torchvision" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise RuntimeError("operator torchvision::nms does not exist")


def test_calflops_counter_with_a_torchvision_that_does_not_load_says_which_build_to_install(monkeypatch, capsys):
    from importlib.metadata import version

    for name in [n for n in sys.modules if n == "torchvision" or n.startswith(("torchvision.", "calflops", "timm"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_TorchvisionBuiltForAnotherTorch(), *sys.meta_path])
    with pytest.raises(SystemExit) as exit_info:
        main.cli(["flops", "--counter", "calflops"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    installed = version("torchvision").split("+")[0]
    assert (f"torchvision {installed} does not load with torch {torch.__version__} (RuntimeError: operator "
            f"torchvision::nms does not exist)") in err
    # +cpu: for ==version alone pip answers "already satisfied" and replaces nothing
    assert err.endswith(f"pip install torchvision=={installed}+cpu --no-deps "
                        "--index-url https://download.pytorch.org/whl/cpu\n")
