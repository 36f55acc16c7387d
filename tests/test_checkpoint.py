"""Checkpoint files: atomic saving, loading errors, strict weight loading, RNG round trip."""
import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from core import checkpoint
from core.checkpoint import CheckpointError, load_checkpoint, load_model_weights, save_checkpoint


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2), nn.Conv3d(2, 3, 1))


def test_atomic_save_round_trip_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "ckpt.pt"
    state = {"state_dict": small_net().state_dict(), "epoch": 3, "history": {"loss": [1.0, 0.5]}}
    save_checkpoint(path, state)
    assert os.listdir(tmp_path / "sub") == ["ckpt.pt"]
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["history"] == {"loss": [1.0, 0.5]}
    for key, value in state["state_dict"].items():
        assert torch.equal(loaded["state_dict"][key], value)


def test_failing_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"state_dict": {}, "epoch": 1})

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"state_dict": {}, "epoch": 2})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert load_checkpoint(path)["epoch"] == 1


def test_load_errors_name_the_path_and_what_was_found(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match=f"checkpoint {missing} does not exist"):
        load_checkpoint(missing)
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)

    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a torch file")
    with pytest.raises(CheckpointError, match=f"{garbage} is not a readable checkpoint"):
        load_checkpoint(garbage)

    a_list = tmp_path / "list.pt"
    torch.save([1, 2], a_list)
    with pytest.raises(CheckpointError, match=f"{a_list} is not a checkpoint: .*found a list"):
        load_checkpoint(a_list)

    bare = tmp_path / "bare.pt"
    torch.save(small_net().state_dict(), bare)
    with pytest.raises(CheckpointError, match="found a dict with keys 0.weight.*bare state_dict"):
        load_checkpoint(bare)

    partial = tmp_path / "partial.pt"
    torch.save({"state_dict": {}, "epoch": 1}, partial)
    with pytest.raises(CheckpointError, match="lacks optimizer, scheduler, .*cannot be resumed"):
        load_checkpoint(partial, required_keys=checkpoint.RESUME_KEYS)


def test_reference_checkpoint_with_numpy_scalar_loads(tmp_path):
    path = tmp_path / "reference.pt"
    torch.save({"state_dict": small_net().state_dict(), "epoch": 5, "best_acc": np.float64(0.8)}, path)
    ckpt = load_checkpoint(path)
    assert ckpt["best_acc"] == pytest.approx(0.8)
    load_model_weights(small_net(), ckpt, path)


def test_strict_loading_lists_missing_unexpected_and_shapes(tmp_path):
    sd = small_net().state_dict()
    sd.pop("0.weight")
    sd.pop("0.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["2.weight"] = torch.zeros(4, 2, 1, 1, 1)
    with pytest.raises(CheckpointError) as info:
        load_model_weights(small_net(), sd, "some/run/ckpt.pt")
    text = str(info.value)
    assert "some/run/ckpt.pt" in text and "Sequential" in text
    assert "missing keys 2: 0.bias, 0.weight" in text
    assert "unexpected keys 1: extra.weight" in text
    assert "shape mismatches 1: 2.weight (4, 2, 1, 1, 1) vs model (3, 2, 1, 1, 1)" in text


def test_long_key_lists_are_cut_with_counts():
    target = nn.Sequential(*[nn.Linear(1, 1) for _ in range(6)])
    with pytest.raises(CheckpointError, match=r"missing keys 12: .*\.\.\. \(7 more\)"):
        load_model_weights(target, {}, "x.pt")


def test_module_prefix_and_wrapped_model_are_unwrapped():
    source = small_net()
    for p in source.parameters():
        nn.init.constant_(p, 0.5)
    ddp_style = {f"module.{k}": v for k, v in source.state_dict().items()}
    target = small_net()
    load_model_weights(nn.DataParallel(target), {"state_dict": ddp_style, "epoch": 1}, "ddp.pt")
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_rng_capture_and_restore_round_trip(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    path = tmp_path / "rng.pt"
    save_checkpoint(path, {"state_dict": {}, "rng": checkpoint.capture_rng()})
    first = (torch.rand(3), np.random.randn(3), [random.random() for _ in range(3)])
    torch.manual_seed(2)
    np.random.seed(2)
    random.seed(2)
    checkpoint.restore_rng(load_checkpoint(path)["rng"])
    second = (torch.rand(3), np.random.randn(3), [random.random() for _ in range(3)])
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert first[2] == second[2]
