"""The CLI: parsing, config choice per command, dispatch (to recording stand-ins for train/test/data),
one-line user errors with exit status 2, and the FLOP count."""
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

import config
import main
from engine import flops
from models.registry import list_models, register_model

REPO = Path(__file__).resolve().parents[1]

if "clitest-conv" not in list_models():
    @register_model("clitest-conv")
    def _conv(in_channels=1, out_channels=2, roi_size=(4, 4, 4)):
        return torch.nn.Conv3d(in_channels, out_channels, 3, padding=1)


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture
def configs(tmp_path):
    return [
        "--data_config", write(tmp_path / "d.yaml", {"data": {"name": "toy", "data_dir": str(tmp_path / "toy")}}),
        "--model_config", write(tmp_path / "m.yaml",
                                {"model": {"name": "clitest-conv", "out_channels": 2, "roi_size": [4, 4, 4]}}),
        "--trainer_config", write(tmp_path / "t.yaml", {"trainer": {"max_epochs": 2, "warmup_epochs": 1,
                                                                     "device": "cpu"}}),
    ]


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """Stand-ins for train.run, test.evaluate, test.predict and data.ensure_for that record calls."""
    log = []

    def run(cfg, run_dir, resume=None):
        log.append(("train", cfg, Path(run_dir), resume))
        config.save_config(cfg, Path(run_dir) / "config.yaml")
        best, latest = Path(run_dir) / "checkpoint_best.pt", Path(run_dir) / "checkpoint_latest.pt"
        best.write_bytes(b"x")
        latest.write_bytes(b"x")
        return {"best_checkpoint": str(best), "latest_checkpoint": str(latest), "best_metric": 0.75}

    def evaluate(cfg, checkpoint, out_dir):
        log.append(("evaluate", cfg, Path(checkpoint), Path(out_dir)))
        return {"mean_dice": 0.5}

    def predict(cfg, checkpoint, inputs, out_dir):
        log.append(("predict", cfg, Path(checkpoint), inputs, Path(out_dir)))
        return [Path(out_dir) / "a.nii.gz"]

    def ensure(d):
        if d["name"] == "synthetic":
            log.append(("ensure", d["data_dir"]))

    monkeypatch.setitem(sys.modules, "train", types.SimpleNamespace(run=run))
    monkeypatch.setitem(sys.modules, "test", types.SimpleNamespace(evaluate=evaluate, predict=predict))
    monkeypatch.setitem(sys.modules, "data", types.SimpleNamespace(ensure_for=ensure))
    monkeypatch.chdir(tmp_path)
    return log


def exit_status(argv, capsys, default_command="run"):
    with pytest.raises(SystemExit) as err:
        main.cli(argv, default_command)
    return err.value.code, capsys.readouterr().err


def test_train_dispatch_resolves_layers_and_overrides(calls, configs, tmp_path):
    result = main.cli(["train", *configs, "--set", "trainer.lr=3e-4", "--logdir", str(tmp_path / "run")])
    (kind, cfg, folder, resume), = calls
    assert kind == "train" and folder == tmp_path / "run" and resume is None
    assert cfg["model"]["name"] == "clitest-conv" and cfg["trainer"]["max_epochs"] == 2
    assert cfg["trainer"]["lr"] == 3e-4 and result["best_metric"] == 0.75


def test_default_run_folder_is_named_after_model_and_data(calls, configs, tmp_path):
    main.cli(["train", *configs])
    folder = calls[0][2]
    assert folder.parent == Path("runs") / "clitest-conv_toy" and folder.is_dir()


def test_resume_loads_the_saved_config_with_set_on_top(calls, configs, tmp_path, capsys):
    main.cli(["train", *configs, "--logdir", "run"])
    main.cli(["train", "--resume", "run", "--set", "trainer.max_epochs=7"])
    _, first, _, _ = calls[0]
    kind, cfg, folder, resume = calls[1]
    assert folder == Path("run") and resume == Path("run")
    assert cfg["trainer"]["max_epochs"] == 7 and cfg["model"] == first["model"]
    code, err = exit_status(["train", "--resume", "run", *configs[:2]], capsys)
    assert code == 2 and "--resume uses RUN_DIR/config.yaml" in err
    code, err = exit_status(["train", "--resume", str(tmp_path)], capsys)
    assert code == 2 and err == f"error: --resume {tmp_path}: no config.yaml there (not a run folder?)\n"


def test_test_uses_the_config_saved_next_to_the_checkpoint(calls, configs, tmp_path, capsys):
    main.cli(["train", *configs, "--logdir", "run"])
    main.cli(["test", "--checkpoint", "run/checkpoint_best.pt", "--set", "inference.mirror=true"])
    kind, cfg, checkpoint, out_dir = calls[-1]
    assert kind == "evaluate" and checkpoint == Path("run/checkpoint_best.pt")
    assert out_dir == Path("run/eval/checkpoint_best")
    assert cfg["inference"]["mirror"] is True and cfg["data"]["name"] == "toy"
    # explicit config flags replace the saved config; --output replaces the default folder
    main.cli(["test", "--checkpoint", "run/checkpoint_best.pt", "--model_config", configs[3], "--output", "o"])
    kind, cfg, checkpoint, out_dir = calls[-1]
    assert out_dir == Path("o") and cfg["data"]["name"] == "synthetic" and cfg["model"]["name"] == "clitest-conv"
    code, err = exit_status(["test", "--checkpoint", "run/nothing.pt"], capsys)
    assert (code, err) == (2, "error: checkpoint run/nothing.pt not found\n")
    (tmp_path / "loose.pt").write_bytes(b"x")
    code, err = exit_status(["test", "--checkpoint", "loose.pt"], capsys)
    assert code == 2 and "config.yaml not found; pass --data_config" in err


def test_predict_dispatch(calls, configs, tmp_path):
    main.cli(["train", *configs, "--logdir", "run"])
    main.cli(["predict", "--checkpoint", "run/checkpoint_latest.pt", "--input", "a.nii.gz", "--input", "scans"])
    kind, cfg, checkpoint, inputs, out_dir = calls[-1]
    assert kind == "predict" and inputs == [Path("a.nii.gz"), Path("scans")]
    assert out_dir == Path("run/predict/checkpoint_latest") and cfg["model"]["name"] == "clitest-conv"


def test_main_job_without_arguments(calls, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(main, "DEFAULT_CONFIGS", {**main.DEFAULT_CONFIGS, "model_config": str(tmp_path / "m.yaml")})
    write(tmp_path / "m.yaml", {"model": {"name": "clitest-conv"}})
    main.cli([])
    assert [c[0] for c in calls] == ["ensure", "train", "evaluate"]
    cfg = calls[1][1]
    assert calls[0][1] == cfg["data"]["data_dir"] and cfg["data"]["name"] == "synthetic"
    assert cfg == config.resolve_config("synthetic", str(tmp_path / "m.yaml"), "synthetic")
    folder = calls[1][2]
    assert calls[2][2] == folder / "checkpoint_best.pt" and calls[2][3] == folder / "eval" / "checkpoint_best"
    out = capsys.readouterr().out
    for line in (f"run folder:   {folder}", f"config:       {folder / 'config.yaml'}",
                 f"log:          {folder / 'train.log'}", f"TensorBoard:  tensorboard --logdir {folder}",
                 f"evaluation:   {folder / 'eval' / 'checkpoint_best'}",
                 "(best, validation metric 0.7500)"):
        assert line in out


def test_default_command_lets_train_py_run_with_the_same_flags(calls, configs):
    main.cli([*configs, "--logdir", "r"], default_command="train")
    assert [c[0] for c in calls] == ["train"]


def test_flops_counts_a_convolution_exactly(configs, capsys):
    cfg = config.resolve_config(configs[1], configs[3], configs[5])
    # Conv3d 1->2, kernel 3, padding 1 at 4^3: 2 * 64 outputs x 27 multiply-adds each
    assert flops.count_flops(cfg) == {"params": 2 * 27 + 2, "flops": 2 * 2 * 64 * 27, "macs": 2 * 64 * 27,
                                     "scan_flops": 0}
    main.cli(["flops", *configs])
    out = capsys.readouterr().out
    assert "model clitest-conv at input (1, 1, 4, 4, 4)" in out and "params: 56 (0.00 M)" in out


def test_flops_bad_device_is_a_user_error(configs, capsys):
    code, err = exit_status(["flops", *configs, "--set", "trainer.device=gpu0"], capsys)
    assert code == 2 and err.startswith("error: --set: trainer.device = 'gpu0'") and err.count("\n") == 1
    if not torch.cuda.is_available():
        code, err = exit_status(["flops", *configs, "--set", "trainer.device=cuda"], capsys)
        assert (code, err) == (2, "error: trainer.device: 'cuda' was asked for but CUDA is not available here\n")


def test_bad_key_from_the_command_line_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "main.py", "--set", "trainer.lrr=1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "error: --set: unknown key 'trainer.lrr'; did you mean 'trainer.lr'?\n"


def test_missing_config_name_exits_2_and_lists_the_names(capsys):
    code, err = exit_status(["flops", "--model_config", "em_nett"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "configs/models/em_nett.yaml not found; available models:" in err and "em_net" in err


def test_help_texts(capsys):
    with pytest.raises(SystemExit) as err:
        main.cli(["--help"])
    out = capsys.readouterr().out
    assert err.value.code == 0
    assert all(name in out for name in ("run", "train", "test", "predict", "flops"))
    with pytest.raises(SystemExit):
        main.cli(["train", "--help"])
    out = capsys.readouterr().out
    assert "--resume RUN_DIR" in out and "--set KEY=VALUE" in out and "default: em_net_tiny" in out
