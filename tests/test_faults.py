"""Faults and bad input, as a user meets them: runs killed and resumed (SIGKILL, SIGTERM, SIGINT, with and
without loader workers) end exactly where an uninterrupted run ends; non-finite steps; pre-flight of broken
data; one-line errors at the command line; run-folder rules.

Training runs here use the real loader, augmentation, loop, checkpoints and CLI, with a tiny registered
network (tests/cli_with_test_net.py) so that a run takes seconds.
"""
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_with_test_net  # noqa: E402  (registers the test network in this process too)

import main  # noqa: E402
from core.checkpoint import load_checkpoint  # noqa: E402
from data import generate_synthetic_dataset  # noqa: E402
from data.preflight import CACHE_NAME, CACHE_VERSION, check_datalist  # noqa: E402

LAUNCHER = Path(cli_with_test_net.__file__)
EPOCHS, ITERS = 5, 6  # 30 steps; 2 training cases of batch 1: data passes end mid-epoch
PROGRESS = re.compile(r"(\d+)/(\d+) \[")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    generate_synthetic_dataset(root / "phantoms", n_train=2, n_val=1, n_test=1, seed=5)
    (root / "net.yaml").write_text("model:\n  name: fault-test-net\n  roi_size: [32, 32, 32]\n")
    return root


def train_args(work, *more):
    return ["train", "--model_config", str(work / "net.yaml"), "--set", f"data.data_dir={work / 'phantoms'}",
            "--set", "data.spacing=[3.0, 3.0, 4.0]", "--set", "data.num_samples=2", "--set", "data.num_workers=0",
            # every random transform on, so that a resume must reproduce each of them
            "--set", "data.flip_prob=0.5", "--set", "data.rot90_prob=0.5", "--set", "data.intensity_prob=0.5",
            "--set", f"trainer.max_epochs={EPOCHS}", "--set", f"trainer.iters_per_epoch={ITERS}",
            "--set", "trainer.val_every=2", "--set", "trainer.warmup_epochs=1", "--set", "trainer.lr=0.01",
            "--set", "trainer.device=cpu", "--set", "inference.sw_batch_size=8", *more]


def launch(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(LAUNCHER), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def run_to_end(args, cwd):
    process = launch(args, cwd)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err.decode()[-3000:]
    return out.decode(), err.decode()


def signal_at(args, cwd, signum, iteration):
    """Start a run, send `signum` once its progress bar shows `iteration` steps done; returns (exit status,
    stderr)."""
    process = launch(args, cwd)
    err, sent, deadline = b"", False, time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        ready, _, _ = select.select([process.stderr], [], [], 0.5)
        if ready:
            chunk = os.read(process.stderr.fileno(), 65536)
            err += chunk
            done = [int(m.group(1)) for m in PROGRESS.finditer(err.decode(errors="replace"))]
            if not sent and done and done[-1] >= iteration:
                process.send_signal(signum)
                sent = True
    if process.poll() is None:
        process.kill()
    rest_out, rest_err = process.communicate(timeout=60)
    err += rest_err
    assert sent, f"the run ended before iteration {iteration}: {err.decode()[-2000:]}"
    return process.returncode, err.decode(errors="replace")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def latest(run):
    return load_checkpoint(run / "checkpoint_latest.pt")


def assert_same_run(a, b):
    for key, value in a["state_dict"].items():  # weights and BatchNorm statistics
        assert torch.equal(b["state_dict"][key], value), (key, (b["state_dict"][key] - value).abs().max().item())
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(b["optimizer"]["state"][index][name]), torch.as_tensor(value))
    assert a["history"]["loss"] == b["history"]["loss"] and a["history"]["val_dice"] == b["history"]["val_dice"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


@pytest.fixture(scope="module")
def uninterrupted(work):
    # In a fresh interpreter like the interrupted runs: nothing another test changed in this process
    # (threads, default dtype, flags) can make the reference differ.
    run_to_end(train_args(work, "--logdir", str(work / "whole")), work)
    return latest(work / "whole")


def test_killed_and_stopped_runs_resume_to_the_uninterrupted_result(work, uninterrupted):
    """One run, stopped four times at random iterations and resumed each time, loader workers switched on
    and off in between: SIGKILL mid-epoch (nothing saved: back to the last epoch's checkpoint) without and
    with workers, SIGTERM and SIGINT (saved at the step they stopped after). It must end bit-identical."""
    # Signals are sent early in an epoch: the run reacts a few steps after its progress bar shows the target.
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    run, why = work / "chain", f"random kill points of seed {seed}"
    resume = ["train", "--resume", str(run), "--set", "data.num_workers={}"]

    status, err = signal_at(train_args(work, "--logdir", str(run)), work, signal.SIGKILL,
                            rng.randint(ITERS + 1, ITERS + 2))
    assert status == -signal.SIGKILL, why
    assert latest(run)["iteration"] == ITERS, why  # the end of epoch 1

    resume[-1] = "data.num_workers=2"
    status, err = signal_at(resume, work, signal.SIGKILL, rng.randint(2 * ITERS + 1, 2 * ITERS + 2))
    assert status == -signal.SIGKILL and latest(run)["iteration"] == 2 * ITERS, why

    for signum, workers, low in ((signal.SIGTERM, 0, 2 * ITERS + 2), (signal.SIGINT, 2, 3 * ITERS + 2)):
        resume[-1] = f"data.num_workers={workers}"
        status, err = signal_at(resume, work, signum, rng.randint(low, low + 1))
        assert status == 128 + signum, (why, err[-2000:])
        stopped = int(re.search(rf"stopped by {signum.name} at epoch \d+, iteration (\d+)", err).group(1))
        assert latest(run)["iteration"] == stopped and stopped % ITERS, why  # mid-epoch, saved where it stopped
        assert f"resume with: python main.py train --resume {run}" in err
        assert err.count("Traceback") == 0 and f"error: stopped by {signum.name}" in err
        assert err.count(f"stopped by {signum.name}") == 1  # main.py's line only; train.log has it too
        assert (run / "train.log").read_text().count(f"stopped by {signum.name} at epoch") == 1

    resume[-1] = "data.num_workers=0"
    run_to_end(resume, work)
    resumed = latest(run)
    assert resumed["iteration"] == EPOCHS * ITERS
    assert_same_run(uninterrupted, resumed)


# ---- non-finite steps ----------------------------------------------------------------------------------


def cli(*argv):
    """main.cli in this process: (exit status, stderr text)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main.cli(list(argv), default_command="train")
            code = 0
        except SystemExit as stop:
            code = stop.code
    return code, err.getvalue()


def phantoms_with_a_nan_voxel(work, name, cases):
    """A copy of the phantoms whose training images `cases` hold one NaN voxel at their centre (the 32^3
    crops of these small volumes always include it)."""
    folder = work / name
    if not folder.exists():
        shutil.copytree(work / "phantoms", folder)
        training = json.loads((folder / "dataset.json").read_text())["training"]
        for index in cases:
            path = folder / training[index]["image"]
            image = nib.load(path)
            array = np.asarray(image.dataobj, dtype=np.float32)
            array[tuple(n // 2 for n in array.shape)] = np.nan
            nib.save(nib.Nifti1Image(array, image.affine), path)
    return folder


def test_nonfinite_steps_are_skipped_and_too_many_stop_with_the_good_checkpoint_untouched(work):
    run = work / "nan-run"
    code, _ = cli(*train_args(work, "--logdir", str(run), "--set", "trainer.max_epochs=1"))
    assert code == 0
    good = (run / "checkpoint_latest.pt").read_bytes()

    # NaN in every training image (past the pre-flight, which would refuse it): stop after 3 skipped steps.
    nan_data = phantoms_with_a_nan_voxel(work, "nan-all", [0, 1])
    code, err = cli("train", "--resume", str(run), "--set", "trainer.max_epochs=2", "--set",
                    f"data.data_dir={nan_data}", "--set", "data.check_intensities=false",
                    "--set", "trainer.max_nonfinite_steps=3")
    assert code == 1
    message = err.strip().splitlines()[-1]
    assert message == (f"error: training stopped at iteration {ITERS + 3}: 3 non-finite steps in a row (loss nan; "
                       f"trainer.max_nonfinite_steps = 3). The last good checkpoint, {run / 'checkpoint_latest.pt'} "
                       f"(epoch 1, iteration {ITERS}), is left as it was. Lower trainer.lr, set trainer.grad_clip, "
                       "or check the data")
    assert (run / "checkpoint_latest.pt").read_bytes() == good and "Traceback" not in err

    # One of the two cases NaN: its steps are skipped (weights and BatchNorm statistics untouched), the
    # others train; the run ends with finite weights and says how many it skipped.
    nan_one = phantoms_with_a_nan_voxel(work, "nan-one", [0])
    code, err = cli(*train_args(work, "--logdir", str(work / "nan-one-run"), "--set", f"data.data_dir={nan_one}",
                                "--set", "data.check_intensities=false", "--set", "trainer.max_epochs=2",
                                "--set", "trainer.max_nonfinite_steps=3"))
    assert code == 0, err[-2000:]
    ckpt = latest(work / "nan-one-run")
    skipped = ckpt["skipped"]["nonfinite"]
    assert 0 < skipped < 2 * ITERS and ckpt["skipped"]["amp_overflow"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert all(np.isfinite(ckpt["history"]["loss"]))
    log = (work / "nan-one-run" / "train.log").read_text()
    assert f"({skipped} non-finite and 0 AMP-overflow steps skipped)" in log


class NormNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 3, 1)
        self.norm = torch.nn.BatchNorm3d(3)

    def forward(self, x):
        return self.norm(self.conv(x))


def test_train_step_skips_nonfinite_steps_and_tells_amp_overflow_apart():
    """The real train_step with float16 autocast and a GradScaler on the CPU (the CUDA path's logic)."""
    from engine import step as train

    torch.manual_seed(0)
    model = NormNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    label = torch.zeros(1, 1, 4, 4, 4)

    def step(image, loss_fn, scaler, use_amp):
        before = [t.clone() for t in (*model.parameters(), *model.buffers())]
        loss, outcome = train.train_step(model, {"image": image, "label": label}, loss_fn, optimizer, scaler,
                                         {"grad_clip": 1.0}, torch.device("cpu"), use_amp)
        unchanged = all(torch.equal(a, b) for a, b in zip(before, (*model.parameters(), *model.buffers())))
        return outcome, unchanged

    def mean_square(out, _):
        return (out.float() ** 2).mean()

    def huge(out, _):  # float16 gradients overflow at the initial scale 2^16, not at a lower one
        return mean_square(out, _) * 1e6

    nan_image = torch.randn(1, 1, 4, 4, 4)
    nan_image[0, 0, 1, 2, 3] = float("nan")
    plain = torch.amp.GradScaler("cpu", enabled=False)
    assert step(torch.randn(1, 1, 4, 4, 4), mean_square, plain, False) == (train.STEP_OK, False)
    assert step(nan_image, mean_square, plain, False) == (train.STEP_NONFINITE, True)  # BatchNorm untouched too

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    assert step(torch.randn(1, 1, 4, 4, 4), huge, scaler, True)[0] == train.STEP_AMP_OVERFLOW
    assert scaler.get_scale() == 2.0**15  # the scaler skipped the update and halved its scale
    assert step(nan_image, mean_square, scaler, True) == (train.STEP_NONFINITE, True)
    low = torch.amp.GradScaler("cpu", init_scale=0.5)  # below 1, overflow no longer explains inf gradients
    assert step(torch.randn(1, 1, 4, 4, 4), lambda out, _: (out.float() * 1e30).sum(), low, True) == (
        train.STEP_NONFINITE, True)


# ---- pre-flight ------------------------------------------------------------------------------------------


def _save(path, array, affine=None):
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))


@pytest.fixture
def broken(tmp_path):
    """A data set whose every training case but the first is broken in its own way."""
    root = tmp_path / "broken"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    image = np.random.default_rng(0).normal(0, 100, (24, 24, 16)).astype(np.float32)
    label = np.zeros((24, 24, 16), np.uint8)
    label[6:14, 6:14, 4:10] = 1
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    nan_image = image.copy()
    nan_image[3, 3, 3] = np.nan
    fractional = label.astype(np.float32)
    fractional[8, 8, 8] = 0.5
    outside = label.copy()
    outside[7, 7, 7] = 12
    cases = {
        "good": (image, label, None),
        "shape": (image, label[:, :, :12], None),
        "affine": (image, label, shifted),
        "fractional": (image, fractional, None),
        "outside": (image, outside, None),
        "nan": (nan_image, label, None),
        "flat": (image[:, :, 0], label[:, :, 0], None),
        "channels": (np.stack([image, image], -1), label, None),
        "truncated": (image, label, None),
    }
    training = []
    for name, (img, lab, label_affine) in cases.items():
        _save(root / "images" / f"{name}.nii.gz", img)
        _save(root / "labels" / f"{name}.nii.gz", lab, label_affine)
        training.append({"image": f"images/{name}.nii.gz", "label": f"labels/{name}.nii.gz"})
    truncated = root / "images" / "truncated.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[:2000])
    (root / "dataset.json").write_text(json.dumps({
        "labels": {str(i): f"class{i}" for i in range(9)}, "training": training, "validation": training[:1]}))
    return root


EXPECTED_PROBLEMS = {
    1: r"label .*shape\.nii\.gz: shape \(24, 24, 12\) differs from its image's \(24, 24, 16\)",
    2: r"label .*affine\.nii\.gz: affine differs from its image's by up to 5 mm",
    3: r"label .*fractional\.nii\.gz: non-integer values \(e\.g\. 0\.5\)",
    4: r"label .*outside\.nii\.gz: values 12 outside the classes 0\.\.8",
    5: r"image .*nan\.nii\.gz: 1 voxels are NaN or infinite",
    6: r"image .*flat\.nii\.gz: 2D of shape \(24, 24\)",
    7: r"image .*channels\.nii\.gz: 4D with 2 volumes, but model\.in_channels is 1",
    8: r"image .*truncated\.nii\.gz: voxel data unreadable: compressed data corrupt or truncated",
}


def test_preflight_lists_every_broken_case_before_the_model_is_built(work, broken):
    logdir = work / "never-started"
    code, err = cli(*train_args(work, "--logdir", str(logdir), "--set", f"data.data_dir={broken}"))
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0] == f"error: data pre-flight of {broken} (training, validation) found 8 problem(s):"
    for index, pattern in EXPECTED_PROBLEMS.items():
        assert sum(bool(re.fullmatch(rf"  training\[{index}\]: {pattern}.*", line)) for line in lines) == 1, pattern
    assert "parameters" not in err  # no model was built
    assert not logdir.exists()  # a run that failed before its first checkpoint leaves no folder


def test_preflight_cache_is_used_and_follows_file_changes(work, broken):
    cfg = main._resolve(main.build_parser().parse_args(train_args(work, "--set", f"data.data_dir={broken}")))
    with pytest.raises(Exception, match="found 8 problem"):
        check_datalist(cfg["data"], 1, 9)
    cache = json.loads((broken / CACHE_NAME).read_text())["entries"]
    # voxels read: 7 images (not the 2D one, rejected on its header, nor the truncated one) and 8 labels
    assert sum(k.startswith("image|") for k in cache) == 7 and sum(k.startswith("label|") for k in cache) == 8
    outside = next(k for k in cache if k.startswith(f"label|{broken / 'labels' / 'outside.nii.gz'}|"))
    cache[outside]["values"] = [0.0, 1.0]  # the cache answers for this unchanged file
    (broken / CACHE_NAME).write_text(json.dumps({"version": CACHE_VERSION, "entries": cache}))
    with pytest.raises(Exception, match="found 7 problem"):
        check_datalist(cfg["data"], 1, 9)
    time.sleep(0.01)
    _save(broken / "labels" / "outside.nii.gz", np.full((24, 24, 16), 9, np.uint8))  # changed: read again
    with pytest.raises(Exception, match=r"(?s)found 8 problem.*outside\.nii\.gz: values 9 outside"):
        check_datalist(cfg["data"], 1, 9)


def test_predict_refuses_an_image_with_nan_voxels(work, uninterrupted, broken):
    code, err = cli("predict", "--checkpoint", str(work / "whole" / "checkpoint_latest.pt"), "--input",
                    str(broken / "images" / "nan.nii.gz"), "--output", str(work / "nan-pred"))
    assert code == 2
    assert re.fullmatch(r"error: input check found 1 problem\(s\):\n  input\[0\]: image .*nan\.nii\.gz: 1 voxels "
                        r"are NaN or infinite\n", err)
    assert not list((work / "nan-pred").glob("*.nii.gz"))


# ---- the loader behind exact resume ----------------------------------------------------------------------


def test_train_loader_draws_depend_only_on_their_place_in_the_stream(work):
    from data import make_train_loader

    args = main.build_parser().parse_args(train_args(work))
    cfg = main._resolve(args)

    def draws(workers, data_pass, position, passes):
        cfg["data"]["num_workers"] = workers
        loader = make_train_loader(cfg["data"], 9, [32, 32, 32], 1, cfg["trainer"]["seed"])
        loader.sampler.start(data_pass, position)
        return [batch for _ in range(passes) for batch in loader]

    def same(a, b):
        return torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])

    stream = draws(0, 0, 0, 3)  # 3 passes of 2 cases
    assert len(stream) == 6 and len({float(b["image"].sum()) for b in stream}) == 6  # all different
    with_workers = draws(2, 0, 0, 3)
    assert len(with_workers) == 6 and all(same(a, b) for a, b in zip(stream, with_workers))
    from_middle = draws(0, 1, 1, 2)  # pass 1 from its second case, then pass 2
    assert len(from_middle) == 3 and all(same(a, b) for a, b in zip(stream[3:], from_middle))


# ---- one-line errors at the command line -----------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_one_line_and_debug_shows_the_traceback(work):
    args = train_args(work, "--logdir", str(work / "no-cuda"), "--set", "trainer.device=cuda")
    code, err = cli(*args)
    assert (code, err) == (2, "error: trainer.device: 'cuda' was asked for but CUDA is not available here\n")
    with pytest.raises(Exception, match="CUDA is not available"):
        main.cli(["--debug", *args])
    assert not (work / "no-cuda").exists()


def test_model_that_cannot_be_built_is_one_line(work, uninterrupted, tmp_path):
    message = ("error: model 'em-net' cannot be built from the model section: EM-Net roi_size [48, 48, 48] must be "
               "positive and divisible by 32 (its total downsampling)")
    code, err = cli(*train_args(work, "--logdir", str(work / "bad-model"), "--model_config", "em_net_tiny",
                                "--set", "model.roi_size=[48, 48, 48]"))
    assert code == 2 and "Traceback" not in err and err.splitlines()[-1] == message
    code, err = cli("test", "--checkpoint", str(work / "whole" / "checkpoint_latest.pt"), "--model_config",
                    "em_net_tiny", "--set", "model.roi_size=[48, 48, 48]", "--output", str(tmp_path / "eval"))
    assert code == 2 and "Traceback" not in err and err.splitlines()[-1] == message


def test_unreadable_checkpoint_and_unwritable_output_are_one_line(work, uninterrupted, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(work / "whole" / "config.yaml", run)
    (run / "checkpoint_latest.pt").write_bytes(b"not a checkpoint")
    code, err = cli("test", "--checkpoint", str(run / "checkpoint_latest.pt"), "--set",
                    f"data.data_dir={work / 'phantoms'}")
    assert code == 2 and err.startswith(f"error: {run / 'checkpoint_latest.pt'} is not a readable checkpoint")
    assert len(err.splitlines()) == 1

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    code, err = cli("test", "--checkpoint", str(work / "whole" / "checkpoint_latest.pt"), "--output",
                    str(a_file / "eval"))
    assert (code, err) == (2, f"error: output folder {a_file / 'eval'} is not writable: a parent is not a folder\n")
    code, err = cli(*train_args(work, "--logdir", str(a_file / "run")))
    assert (code, err) == (2, f"error: --logdir {a_file / 'run'} cannot be created: a parent is not a folder\n")


def test_full_disk_is_named_before_training_and_when_saving(work, full_disk):
    from core.checkpoint import save_checkpoint
    from core.fileio import OutputError

    (full_disk / "data").write_bytes(b"\0" * 200 * 1024)
    code, err = cli(*train_args(work, "--logdir", str(full_disk / "run")))
    assert code == 2 and err.splitlines()[-1] == f"error: run folder {full_disk / 'run'}: disk full (0 MiB free, " \
                         "about 3 MiB needed)", err
    with pytest.raises(OutputError, match=f"cannot write {full_disk / 'x.pt'}: disk full"):
        save_checkpoint(full_disk / "x.pt", {"state_dict": {"w": torch.zeros(100_000)}})
    assert sorted(p.name for p in full_disk.iterdir()) == ["data"]  # no temporary file left behind


# ---- run folders ------------------------------------------------------------------------------------------


def test_logdir_with_a_run_is_refused_unless_overwrite_and_files_are_0644(work, uninterrupted, tmp_path):
    code, err = cli(*train_args(work, "--logdir", str(work / "whole")))
    assert (code, err) == (2, f"error: --logdir {work / 'whole'} already holds a run (checkpoint_best.pt, "
                              f"checkpoint_latest.pt); continue it with --resume {work / 'whole'}, or pass "
                              "--overwrite to replace it\n")
    run = tmp_path / "again"
    shutil.copytree(work / "whole", run)
    old = os.umask(0o022)
    try:
        code, err = cli(*train_args(work, "--logdir", str(run), "--overwrite", "--set", "trainer.max_epochs=1"))
    finally:
        os.umask(old)
    assert code == 0, err
    for name in ("checkpoint_latest.pt", "checkpoint_best.pt"):  # the old run's were at iterations 30 and 12
        assert load_checkpoint(run / name)["iteration"] == ITERS, name
    for name in ("checkpoint_latest.pt", "config.yaml"):
        assert (run / name).stat().st_mode & 0o777 == 0o644, name


def test_synthetic_data_is_generated_only_into_an_empty_or_absent_folder(tmp_path):
    folder = tmp_path / "my-scans"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    code, err = cli("train", "--set", f"data.data_dir={folder}", "--logdir", str(tmp_path / "run"))
    assert (code, err) == (2, f"error: data.data_dir {folder} is not empty and holds no dataset.json; synthetic "
                              "phantoms are generated only into an empty or absent folder\n")
    assert [p.name for p in folder.iterdir()] == ["notes.txt"] and not (tmp_path / "run").exists()

    from data import ensure_synthetic_dataset

    (tmp_path / "empty").mkdir()
    old = os.umask(0o022)
    try:
        ensure_synthetic_dataset(tmp_path / "empty", n_train=1, n_val=1, n_test=0)
    finally:
        os.umask(old)
    assert (tmp_path / "empty" / "dataset.json").is_file()
    assert (tmp_path / "empty").stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700


# ---- torchrun-style: two processes -----------------------------------------------------------------------


DDP_OUTLIVED_GROUP = 97  # exit status of a rank whose DDP model was alive when its process group was destroyed


def _ddp_rank(rank, port, cfg, run_dir, resume):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import gc

    import train
    from core import distributed

    destroy_group = distributed.cleanup

    def destroy_group_after_ddp():
        # A DDP model still alive here would later destroy the group from its reducer, holding the GIL:
        # the exit hang train._release_process_group prevents, which strikes only now and then.
        ddp_alive = any(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
        destroy_group()
        if ddp_alive:
            os._exit(DDP_OUTLIVED_GROUP)

    distributed.cleanup = destroy_group_after_ddp
    try:
        train.run(cfg, run_dir, resume=resume)
    except train.TrainingInterrupted as stop:
        sys.exit(stop.exit_code)


def _ddp_run(cfg, run_dir, resume=None, signal_rank1_after=None, signum=signal.SIGTERM):
    """Two forked ranks (gloo); returns their exit codes. With `signal_rank1_after`, rank 1 alone gets
    `signum` once train.log holds that text."""
    import multiprocessing

    port = free_port()
    context = multiprocessing.get_context("fork")  # reuses this process's imports
    ranks = [context.Process(target=_ddp_rank, args=(r, port, cfg, run_dir, resume)) for r in (0, 1)]
    for process in ranks:
        process.start()
    deadline = time.monotonic() + 240
    if signal_rank1_after is not None:
        log = run_dir / "train.log"
        while not (log.is_file() and signal_rank1_after in log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # a few steps into the next epoch, usually
        os.kill(ranks[1].pid, signum)
    for process in ranks:
        process.join(max(deadline - time.monotonic(), 1))
        if process.is_alive():
            process.kill()
    return [process.exitcode for process in ranks]


def test_sigterm_to_one_rank_stops_all_at_the_same_step_and_resumes_exactly(work):
    cfg = main._resolve(main.build_parser().parse_args(train_args(work, "--set", "trainer.max_epochs=3")))
    assert _ddp_run(cfg, work / "ddp-whole") == [0, 0]
    assert _ddp_run(cfg, work / "ddp-stopped", signal_rank1_after="epoch 1: loss") == [143, 143]
    stopped = latest(work / "ddp-stopped")
    assert ITERS <= stopped["iteration"] < 3 * ITERS and len(stopped["rng_by_rank"]) == 2  # both ranks' streams
    log = (work / "ddp-stopped" / "train.log").read_text()
    assert log.count(f"stopped by SIGTERM at epoch {stopped['epoch']}, iteration {stopped['iteration']}") == 1
    assert _ddp_run(cfg, work / "ddp-stopped", resume=work / "ddp-stopped") == [0, 0]
    assert_same_run(latest(work / "ddp-whole"), latest(work / "ddp-stopped"))


def test_a_run_folder_made_before_the_redesign_resumes_exactly_and_tests(tmp_path):
    """tests/data/run_made_before_the_redesign: a 3-epoch run stopped after epoch 2 (SIGTERM), written by the
    code before the module redesign (commit 533c55d). Resumed here, it must equal that code's own uninterrupted
    run (run_made_before_the_redesign.epoch3.pt), and `test RUN_DIR` must evaluate both of its checkpoints."""
    saved = Path(__file__).resolve().parent / "data" / "run_made_before_the_redesign"
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    generate_synthetic_dataset(tmp_path / "phantoms", n_train=2, n_val=1, n_test=1, seed=5)  # the run's data
    data_dir = f"data.data_dir={tmp_path / 'phantoms'}"
    run_to_end(["train", "--resume", str(run), "--set", data_dir], tmp_path)
    resumed = latest(run)
    expected = load_checkpoint(saved.parent / "run_made_before_the_redesign.epoch3.pt")
    assert resumed["iteration"] == expected["iteration"] == 9
    for key, value in expected["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    for index, state in expected["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(resumed["optimizer"]["state"][index][name]), torch.as_tensor(value))
    assert resumed["history"]["loss"] == expected["history"]["loss"]

    out, _ = run_to_end(["test", "--checkpoint", str(run), "--set", data_dir], tmp_path)
    assert "best (epoch" in out and "latest (epoch 3)" in out
    for name in ("checkpoint_best", "checkpoint_latest"):
        assert json.loads((run / "eval" / name / "summary.json").read_text())["num_cases"] == 1


def test_sigkill_of_one_rank_keeps_the_last_complete_checkpoint_and_resumes_exactly(work):
    """Rank 0 outlives a SIGKILLed rank 1 only to fail at its next collective: it must not replace the
    epoch-end checkpoint, which every rank contributed to, with a mid-epoch one holding its own state alone."""
    cfg = main._resolve(main.build_parser().parse_args(train_args(work, "--set", "trainer.max_epochs=3")))
    if not (work / "ddp-whole").is_dir():
        assert _ddp_run(cfg, work / "ddp-whole") == [0, 0]
    codes = _ddp_run(cfg, work / "ddp-killed", signal_rank1_after="epoch 1: loss", signum=signal.SIGKILL)
    assert codes[1] == -signal.SIGKILL and codes[0] != 0
    kept = latest(work / "ddp-killed")
    assert kept["iteration"] % ITERS == 0 and len(kept["rng_by_rank"]) == 2  # an epoch end, both ranks' streams
    assert "a mid-epoch checkpoint needs every process" in (work / "ddp-killed" / "train.log").read_text()
    assert _ddp_run(cfg, work / "ddp-killed", resume=work / "ddp-killed") == [0, 0]
    assert_same_run(latest(work / "ddp-whole"), latest(work / "ddp-killed"))


# ---- nothing lost, nothing silently wrong ---------------------------------------------------------------------


def files_under(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_a_refused_resume_changes_nothing_on_disk(work, uninterrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(work / "whole", run)
    before = files_under(run)
    code, err = cli("train", "--resume", str(run), "--set", "trainer.iters_per_epoch=9")
    assert code == 2 and err.splitlines()[-1] == (f"error: --resume {run}: trainer.iters_per_epoch was {ITERS}; it "
                                                  "cannot change on resume (got 9)")
    assert files_under(run) == before
    code, err = cli("train", "--resume", str(run), "--set", f"trainer.max_epochs={EPOCHS + 1}")  # still resumes
    assert code == 0, err
    assert latest(run)["iteration"] == (EPOCHS + 1) * ITERS


def test_the_users_files_in_a_logdir_are_never_lost(work, uninterrupted, tmp_path, broken):
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("config.yaml", "train.log", "notes.txt"):
        (mine / name).write_text(f"my {name}")
    code, err = cli(*train_args(work, "--logdir", str(mine)))
    assert code == 2 and f"--logdir {mine} holds config.yaml, train.log, which a new run would replace" in err
    assert {p.name: p.read_text() for p in mine.iterdir()} == {n: f"my {n}" for n in
                                                               ("config.yaml", "train.log", "notes.txt")}

    # --overwrite, then a failed data check: the old run is back as it was, its evaluation included
    run = tmp_path / "run"
    shutil.copytree(work / "whole", run)
    (run / "notes.txt").write_text("mine")
    (run / "eval" / "checkpoint_best").mkdir(parents=True)
    (run / "eval" / "checkpoint_best" / "summary.json").write_text("{}")
    before = files_under(run)
    code, err = cli(*train_args(work, "--logdir", str(run), "--overwrite", "--set", f"data.data_dir={broken}"))
    assert code == 2 and "data pre-flight" in err
    assert files_under(run) == before

    # --overwrite that succeeds: the old run is gone once the new one saved a checkpoint; notes.txt stays
    code, err = cli(*train_args(work, "--logdir", str(run), "--overwrite", "--set", "trainer.max_epochs=1"))
    assert code == 0, err
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith("events.")) == [
        "checkpoint_best.pt", "checkpoint_latest.pt", "config.yaml", "notes.txt", "progress.png", "train.log"]
    assert latest(run)["iteration"] == ITERS and (run / "notes.txt").read_text() == "mine"


def test_a_runs_result_does_not_depend_on_the_number_of_loader_workers(work, uninterrupted):
    """The uninterrupted run reads with 0 workers; the same run with 2 must end identical (MONAI's DataLoader
    with 0 workers re-seeds the global torch generator unless a loader has its own)."""
    run_to_end(train_args(work, "--logdir", str(work / "two-workers"), "--set", "data.num_workers=2"), work)
    assert_same_run(uninterrupted, latest(work / "two-workers"))


def corrupt_in_the_middle(path):
    """Change one byte in the middle of a gzip stream such that zlib still decodes it, to wrong voxels, and only
    the CRC at the stream's end tells; returns how many voxels nibabel then reads wrong."""
    original = np.asarray(nib.load(path).dataobj).copy()
    raw = path.read_bytes()
    for offset in range(len(raw) // 2, len(raw) - 8):
        damaged = bytearray(raw)
        damaged[offset] ^= 0x10
        path.write_bytes(bytes(damaged))
        try:
            wrong = int(np.count_nonzero(np.asarray(nib.load(path).dataobj) != original))
        except Exception:  # noqa: BLE001  (this change breaks the stream visibly; try the next byte)
            continue
        if wrong:
            return wrong
    raise AssertionError(f"no one-byte change in {path} decodes silently")


def test_a_corrupt_gzip_stream_is_found_by_the_preflight_prepare_and_predict(work, uninterrupted, tmp_path):
    from data.prepare import prepare

    folder = tmp_path / "phantoms"
    shutil.copytree(work / "phantoms", folder)
    image = folder / json.loads((folder / "dataset.json").read_text())["training"][1]["image"]
    assert corrupt_in_the_middle(image) > 0  # nibabel alone reads it without a word
    cfg = main._resolve(main.build_parser().parse_args(train_args(work, "--set", f"data.data_dir={folder}")))
    with pytest.raises(Exception, match=r"training\[1\]: image .*: voxel data unreadable: compressed data corrupt "
                                        r"or truncated \(CRC check failed"):
        check_datalist(cfg["data"], 1, 9)

    code, err = cli("predict", "--checkpoint", str(work / "whole" / "checkpoint_latest.pt"), "--input", str(image),
                    "--output", str(tmp_path / "pred"))
    assert code == 2 and "input[0]: image" in err and "CRC check failed" in err
    assert not list((tmp_path / "pred").glob("*.nii.gz"))

    with pytest.raises(Exception, match=r"not a readable NIfTI file \(compressed data corrupt or truncated"):
        prepare("msd", folder, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_missing_files_are_listed_with_every_other_problem_of_the_data(work, broken, tmp_path):
    content = json.loads((broken / "dataset.json").read_text())
    content["training"].append({"image": "images/nowhere.nii.gz", "label": "labels/good.nii.gz"})
    (broken / "dataset.json").write_text(json.dumps(content))
    code, err = cli(*train_args(work, "--logdir", str(tmp_path / "never"), "--set", f"data.data_dir={broken}"))
    lines = err.strip().splitlines()
    assert code == 2 and lines[0].endswith("found 9 problem(s):")
    assert any(re.fullmatch(r"  training\[9\]: image file not found: .*nowhere\.nii\.gz", line) for line in lines)
    assert sum(line.startswith("  training[") for line in lines) == 9


def test_predict_skips_macos_appledouble_files_in_a_folder(work, uninterrupted, tmp_path):
    inputs = tmp_path / "scans"
    inputs.mkdir()
    case = json.loads((work / "phantoms" / "dataset.json").read_text())["test"][0]["image"]
    shutil.copy(work / "phantoms" / case, inputs / "scan.nii.gz")
    (inputs / "._scan.nii.gz").write_bytes(b"\x00\x05\x16\x07 Mac OS X resource fork")
    code, err = cli("predict", "--checkpoint", str(work / "whole" / "checkpoint_latest.pt"), "--input", str(inputs),
                    "--output", str(tmp_path / "pred"))
    assert code == 0, err
    assert [p.name for p in (tmp_path / "pred").iterdir()] == ["scan.nii.gz"]
    assert f"skipped 1 macOS AppleDouble file(s) in {inputs}: ._scan.nii.gz" in err


def test_sigterm_to_one_torchrun_rank_is_our_line_then_torchruns_own_report(work):
    """The real torchrun: SIGTERM to one rank stops both at one step and saves; our one line comes first, then
    torchrun reports the ranks' exit status 143 as a ChildFailedError (its traceback) and exits 1."""
    run = work / "torchrun-stopped"
    args = train_args(work, "--logdir", str(run), "--set", "trainer.iters_per_epoch=400")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    port = free_port()
    torchrun = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master_port", str(port), str(LAUNCHER), *args], cwd=work, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and torchrun.poll() is None:
        log = run / "train.log"
        if log.is_file() and "model fault-test-net" in log.read_text():
            break
        time.sleep(0.1)
    time.sleep(2)  # both ranks in their steps
    ranks = subprocess.run(["pgrep", "-P", str(torchrun.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2, ranks
    os.kill(int(max(ranks, key=int)), signal.SIGTERM)
    _, err = torchrun.communicate(timeout=240)
    err = err.decode(errors="replace")
    assert torchrun.returncode == 1
    ours = [line for line in err.splitlines() if line.startswith("error: stopped by SIGTERM")]
    assert len(ours) == 1 and f"resume with: python main.py train --resume {run}" in ours[0]
    assert err.index(ours[0]) < err.index("ChildFailedError") and "exitcode  : 143" in err
    saved = latest(run)
    assert 0 < saved["iteration"] < 400 and len(saved["rng_by_rank"]) == 2
