"""Training loop: outputs of a run, resume, crash safety, LR schedule, deep supervision, validation Dice."""
import math
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import metrics
import train
from config import ConfigError, resolve_config
from core.checkpoint import RESUME_KEYS, load_checkpoint
from core.distributed import DistContext
from data import generate_synthetic_dataset
from engine import step as train_step
from engine.inference import SlidingWindow
from models import list_models, register_model

TINY = "tiny-train-test-net"


class TinyNet(nn.Module):
    """Two convolutions; with deep supervision, training mode adds heads at 1/2 and 1/4 resolution."""

    def __init__(self, in_channels=1, out_channels=9, deep_supervision=False):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, 8, 3, padding=1)
        self.head = nn.Conv3d(8, out_channels, 1)
        # heads only when used, as in EM-Net: DDP rejects parameters that get no gradient
        self.aux = nn.ModuleList([nn.Conv3d(8, out_channels, 1) for _ in range(2 if deep_supervision else 0)])
        self.deep_supervision = deep_supervision

    def forward(self, x):
        h = F.relu(self.conv(x))
        out = self.head(h)
        if self.deep_supervision and self.training:
            return [out] + [aux(F.avg_pool3d(h, 2 ** (i + 1))) for i, aux in enumerate(self.aux)]
        return out


if TINY not in list_models():
    register_model(TINY)(TinyNet)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    generate_synthetic_dataset(out, n_train=2, n_val=1, n_test=1, seed=3)
    return out


def make_cfg(data_dir, *sets):
    return resolve_config(overrides=[
        f"data.data_dir={data_dir}", "data.spacing=[3.0, 3.0, 4.0]", "data.num_samples=2", "data.num_workers=0",
        f"model.name={TINY}", "model.roi_size=[16, 16, 16]",
        "trainer.max_epochs=2", "trainer.iters_per_epoch=3", "trainer.warmup_epochs=1", "trainer.val_every=1",
        "trainer.device=cpu", "trainer.lr=0.01", "inference.sw_batch_size=8", *sets])


def fixed_loader():
    """Two fixed batches, no shuffling or augmentation: an easy task whose data stream is reproducible."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        label = (torch.rand(2, 1, 12, 12, 12, generator=g) > 0.6).float() * 2  # classes 0 and 2
        image = label + 0.3 * torch.randn(label.shape, generator=g)
        batches.append({"image": image, "label": label})
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)


def test_run_writes_every_output(data_dir, tmp_path):
    cfg = make_cfg(data_dir)
    result = train.run(cfg, tmp_path)
    assert result["epochs"] == 2 and result["iterations"] == 6
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["trainer"] == cfg["trainer"] and saved["model"]["name"] == TINY
    text = (tmp_path / "train.log").read_text()
    assert "epoch 2: loss" in text and "validation mean Dice" in text and "mean HD95" in text and "spleen" in text
    assert (tmp_path / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/mean_dice", "val/dice_spleen", "val/dice_pancreas", "val/mean_hd95",
            "val/hd95_pancreas"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]

    for name in ("checkpoint_latest.pt", "checkpoint_best.pt"):
        ckpt = load_checkpoint(tmp_path / name, required_keys=RESUME_KEYS)
        assert set(RESUME_KEYS) <= set(ckpt)
        assert ckpt["config"] == cfg and set(ckpt["rng"]) == {"torch", "cuda", "numpy", "python"}
    latest = load_checkpoint(tmp_path / "checkpoint_latest.pt")
    assert latest["epoch"] == 2 and latest["iteration"] == 6 and latest["scheduler"]["last_epoch"] == 6
    h = latest["history"]
    assert h["epoch"] == [1, 2] and h["val_epoch"] == [1, 2] and len(h["val_class_dice"]["liver"]) == 2
    assert result["best_metric"] == pytest.approx(max(h["val_dice"]))
    assert result["best_checkpoint"] == str(tmp_path / "checkpoint_best.pt")
    assert 0.0 <= result["best_metric"] <= 1.0


def test_loss_decreases_on_easy_task(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "make_train_loader", lambda *args: fixed_loader())
    cfg = make_cfg(data_dir, "trainer.max_epochs=3", "trainer.iters_per_epoch=8", "trainer.val_every=3",
                   "trainer.lr=0.03")
    train.run(cfg, tmp_path)
    losses = load_checkpoint(tmp_path / "checkpoint_latest.pt")["history"]["loss"]
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_crash_then_resume_matches_uninterrupted_run(data_dir, tmp_path, monkeypatch):
    # The real loader with every random transform on: the resume must reproduce the crops and augmentation.
    cfg = make_cfg(data_dir, "trainer.optimizer=sgd", "trainer.grad_clip=1.0", "data.flip_prob=0.5",
                   "data.rot90_prob=0.5", "data.intensity_prob=0.5")
    train.run(cfg, tmp_path / "whole")
    whole = load_checkpoint(tmp_path / "whole" / "checkpoint_latest.pt")

    calls = {"n": 0}
    real_step = train.train_step

    def interrupted_step(*args):
        calls["n"] += 1
        if calls["n"] == 3:  # third step of epoch 1 of 2 (iters_per_epoch 3)
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(train, "train_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg, tmp_path / "part")
    crashed = load_checkpoint(tmp_path / "part" / "checkpoint_latest.pt", required_keys=RESUME_KEYS)
    assert (crashed["epoch"], crashed["iteration"], crashed["scheduler"]["last_epoch"]) == (0, 2, 2)
    log = (tmp_path / "part" / "train.log").read_text()
    assert "training stopped at epoch 0, iteration 2 by KeyboardInterrupt" in log

    monkeypatch.setattr(train, "train_step", real_step)
    result = train.run(cfg, tmp_path / "part", resume=tmp_path / "part")
    resumed = load_checkpoint(tmp_path / "part" / "checkpoint_latest.pt")
    assert (result["epochs"], result["iterations"]) == (2, 6)
    for key, value in whole["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0)
    for key, value in whole["optimizer"]["state"].items():
        torch.testing.assert_close(resumed["optimizer"]["state"][key]["momentum_buffer"], value["momentum_buffer"],
                                   rtol=0, atol=0)
    assert resumed["optimizer"]["param_groups"][0]["lr"] == whole["optimizer"]["param_groups"][0]["lr"]
    assert resumed["scheduler"]["last_epoch"] == whole["scheduler"]["last_epoch"] == 6
    assert resumed["history"]["loss"][1] == whole["history"]["loss"][1]
    assert "resumed" in (tmp_path / "part" / "train.log").read_text()


def test_resume_with_more_epochs_follows_new_schedule(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "make_train_loader", lambda *args: fixed_loader())
    train.run(make_cfg(data_dir, "trainer.val_every=2"), tmp_path)
    lrs = []
    real_step = train.train_step

    def recording_step(model, batch, loss_fn, optimizer, *rest):
        lrs.append(optimizer.param_groups[0]["lr"])
        return real_step(model, batch, loss_fn, optimizer, *rest)

    monkeypatch.setattr(train, "train_step", recording_step)
    result = train.run(make_cfg(data_dir, "trainer.max_epochs=3", "trainer.val_every=2"), tmp_path, resume=tmp_path)
    ckpt = load_checkpoint(tmp_path / "checkpoint_latest.pt")
    assert (result["epochs"], result["iterations"]) == (3, 9)
    assert ckpt["history"]["epoch"] == [1, 2, 3] and ckpt["history"]["val_epoch"] == [2, 3]
    # steps 6, 7, 8 of a 9-step schedule with 3 warmup steps: cosine at progress 3/6, 4/6, 5/6
    expected = [0.01 * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in (3, 4, 5)]
    assert lrs == pytest.approx(expected)
    assert ckpt["history"]["lr"][-1] == pytest.approx(expected[-1])
    assert "trainer.max_epochs: 2 -> 3" in (tmp_path / "train.log").read_text()
    with pytest.raises(ConfigError, match="iters_per_epoch was 3; it cannot change on resume"):
        train.run(make_cfg(data_dir, "trainer.max_epochs=4", "trainer.iters_per_epoch=4"), tmp_path, resume=tmp_path)


def test_resume_without_checkpoint_names_the_path(data_dir, tmp_path):
    with pytest.raises(Exception, match="checkpoint_latest.pt does not exist"):
        train.run(make_cfg(data_dir), tmp_path / "new", resume=tmp_path / "nothing")


def test_lr_schedule_matches_hand_computed_values():
    t = {"lr": 0.1, "warmup_epochs": 2, "iters_per_epoch": 5, "max_epochs": 8}  # 10 warmup steps of 40
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=t["lr"])
    scheduler = train_step.make_scheduler(optimizer, t)
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.01)  # 1/10 of the base lr at the first step
    assert lrs[4] == pytest.approx(0.05)
    assert lrs[9] == pytest.approx(0.1)  # warmup reaches the base lr at its last step
    assert lrs[10] == pytest.approx(0.1)  # cosine starts at progress 0
    assert lrs[25] == pytest.approx(0.05)  # progress 15/30: half way down
    assert lrs[39] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 29 / 30)))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)  # after the last step


def test_deep_supervision_weights_and_upsampling():
    seen = []

    def mean_loss(out, label):
        seen.append(tuple(out.shape))
        return out.mean()

    loss = train_step.DeepSupervisionLoss(mean_loss, [1.0, 0.25, 0.125])
    label = torch.zeros(2, 1, 8, 8, 8)
    outputs = [torch.full((2, 3, 8, 8, 8), 2.0), torch.full((2, 3, 2, 2, 2), 4.0), torch.full((2, 3, 1, 1, 1), 8.0)]
    # (1 * 2 + 0.25 * 4 + 0.125 * 8) / 1.375 = 4 / 1.375
    assert loss(outputs, label).item() == pytest.approx(4.0 / 1.375)
    assert seen == [(2, 3, 8, 8, 8)] * 3
    assert loss(outputs[0], label).item() == pytest.approx(2.0)
    with pytest.raises(ConfigError, match="returned 4 outputs"):
        loss(outputs + outputs[:1], label)

    # trilinear upsampling x2 of a ramp along the last axis (align_corners=False), by hand
    ramp = torch.tensor([0.0, 1.0]).view(1, 1, 1, 1, 2)
    up = []

    def keep(out, label):
        up.append(out)
        return out.sum()

    train_step.DeepSupervisionLoss(keep, [1.0, 1.0])([torch.zeros(1, 1, 1, 1, 4), ramp], torch.zeros(1, 1, 1, 1, 4))
    torch.testing.assert_close(up[1].flatten(), torch.tensor([0.0, 0.25, 0.75, 1.0]))


def test_deep_supervision_run_with_real_dice_ce(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "make_train_loader", lambda *args: fixed_loader())
    cfg = make_cfg(data_dir, "model.deep_supervision=true", "trainer.max_epochs=1")
    result = train.run(cfg, tmp_path)
    loss = load_checkpoint(result["latest_checkpoint"])["history"]["loss"][0]
    assert result["iterations"] == 3 and math.isfinite(loss)


class IntensityToClass(nn.Module):
    """Logits peaking at the class equal to the (rounded) voxel intensity: argmax(logits) = image."""

    def forward(self, x):
        classes = torch.arange(4, dtype=x.dtype).view(1, 4, 1, 1, 1)
        return -(x - classes) ** 2


def test_validate_scores_like_test_with_the_empty_mask_rule():
    label = torch.zeros(1, 1, 20, 20, 12)
    label[0, 0, 2:4, 2:4, 2:4] = 1  # 8 voxels, of which the "image" marks 6 (2 predicted as background)
    label[0, 0, 10:14, 10:13, 5:7] = 2  # 24 voxels, predicted exactly; class 3 absent from both
    image = label.clone()
    image[0, 0, 2, 2, 2:4] = 0
    image[0, 0, 15, 15, 9] = 1  # one false positive of class 1
    loader = [{"image": image, "label": label}]
    spacing = [1.5, 1.0, 2.0]
    window = SlidingWindow((8, 8, 8), overlap=0.5, sw_batch_size=4, blend_mode="constant")
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    result = train.validate(IntensityToClass(), loader, 4, spacing, window, ctx)
    dice1 = 2 * 6 / (7 + 8)
    assert result["class_dice"] == pytest.approx([dice1, 1.0, 1.0])  # both empty: Dice 1, as in test
    assert result["mean_dice"] == pytest.approx((dice1 + 2.0) / 3)
    gt, pred = label[0, 0].numpy(), image[0, 0].numpy()
    # HD95 in mm at data.spacing, the preprocessed space: the false positive lies far from the class-1 block
    hd1 = metrics.hd95(pred == 1, gt == 1, spacing)
    assert hd1 > 5.0 and result["class_hd95"] == pytest.approx([hd1, 0.0, 0.0])
    assert result["mean_hd95"] == pytest.approx(hd1 / 3)


@pytest.mark.parametrize("key, value, message", [
    ("optimizer", "adam", "choose one of adamw, sgd"),
    ("iters_per_epoch", 0, "must be at least 1"),
    ("warmup_epochs", 5, "the warmup must not be longer than the training"),
    ("deep_supervision_weights", [1.0, -1.0], "each value must be at least 0"),
    ("grad_clip", 0.0, "must be above 0"),
])
def test_bad_trainer_values_are_named_when_the_config_is_loaded(data_dir, key, value, message):
    with pytest.raises(ConfigError, match=f"trainer.{key} = .*{message}"):
        make_cfg(data_dir, f"trainer.{key}={value}")


def test_distributed_helpers_single_process():
    from core import distributed

    x = torch.tensor([1.0, 3.0])
    with pytest.raises(ValueError, match="trainer.device: 'tpu'"):
        distributed.resolve_device("tpu")
    assert distributed.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert np.isclose(distributed.all_reduce_sum(x).sum().item(), 4.0)


def _ddp_worker(rank, world_size, port, data_dir, run_dir):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train.make_train_loader = lambda *args: fixed_loader()
    seen = {}
    real_step = train.train_step

    def keep_model(model, *rest):
        seen["model"] = model
        return real_step(model, *rest)

    train.train_step = keep_model
    result = train.run(make_cfg(data_dir, "trainer.max_epochs=1", "trainer.iters_per_epoch=2"), run_dir)
    torch.save({"result": result, "wrapped": type(seen["model"]).__name__,
                "state_dict": seen["model"].module.state_dict()}, run_dir.parent / f"rank{rank}.pt")


def test_two_process_ddp_on_cpu(data_dir, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children reuse the imported modules, where spawn would spend ~15 s importing again
    workers = torch.multiprocessing.start_processes(_ddp_worker, args=(2, port, data_dir, tmp_path / "run"),
                                                    nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 120
    while not workers.join(timeout=2):  # re-raises a worker's exception
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("the two DDP workers did not finish within 120 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["wrapped"] == ranks[1]["wrapped"] == "DistributedDataParallel"
    for key, value in ranks[0]["state_dict"].items():
        torch.testing.assert_close(ranks[1]["state_dict"][key], value, rtol=0, atol=0)
    # one validation case, on rank 0 only: the reduced Dice reaches both ranks
    assert ranks[0]["result"]["best_metric"] == ranks[1]["result"]["best_metric"]
    saved = load_checkpoint(tmp_path / "run" / "checkpoint_latest.pt")
    log_text = (tmp_path / "run" / "train.log").read_text()
    assert saved["iteration"] == 2 and log_text.count("world size 2") == 1  # rank 0 alone logs
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 1


@pytest.mark.parametrize("name, optimizer, lr", [("sgd", torch.optim.SGD, 1e-2), ("adamw", torch.optim.AdamW, 3e-4),
                                                 ("synthetic", torch.optim.AdamW, 5e-3)])
def test_trainer_configs_resolve_and_build(name, optimizer, lr):
    cfg = resolve_config(trainer_config=name)  # its values pass the checks of config/rules.py
    built = train_step.make_optimizer(nn.Linear(2, 2), cfg["trainer"])
    assert isinstance(built, optimizer) and built.param_groups[0]["lr"] == lr
    if name == "sgd":  # the reference protocol
        group = built.param_groups[0]
        assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.99, True, 3e-5)
        assert cfg["trainer"]["warmup_epochs"] == 10
