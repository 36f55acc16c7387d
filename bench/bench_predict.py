"""`main.py predict` on one realistic abdominal CT on this CPU: wall time and peak memory.

    python bench/bench_predict.py [--workdir /tmp/bench_predict] [--sw-batch-sizes 1 4]

The paper's EM-Net (configs synapse + em_net: roi 128, 9 classes, 39.4 M parameters) with random weights
saved as a checkpoint (timing does not depend on training), on a synthetic 512 x 512 x 150 CT of
0.75 x 0.75 x 2.5 mm in an LPS-like affine: the phantoms of data/synthetic.py drawn at the scale of an
adult abdomen (a body about 330 x 250 mm, filling the field of view as a real scan does). Each
sw_batch_size runs `main.py predict` in a fresh process; the time is its wall time (imports, reading,
preprocessing, sliding window, inversion, writing) and its CPU time (less sensitive to other jobs on the
machine); the memory is its peak RSS (getrusage) and the peak of the RSS summed over it and the data
loader's worker processes (sampled every 0.2 s).
The segmentations of the settings are compared voxel by voxel.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from machine import describe as describe_machine  # bench/ is this script's folder, first on sys.path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE = (512, 512, 150)
SPACING = (0.75, 0.75, 2.5)  # mm
# The phantom's body is about 88 x 68 mm; drawn on a grid 3.75x finer it spans about 330 x 255 mm of the
# stored 0.75 mm grid, the size of an adult abdomen.
SCALE = 3.75
CONFIGS = ["--data_config", "synapse", "--model_config", "em_net", "--set", "trainer.device=cpu"]


def make_volume(path):
    from data.synthetic import make_case

    image, _, _ = make_case(np.random.default_rng(0), shape=SHAPE, spacing=tuple(s / SCALE for s in SPACING))
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    affine[:3, 3] = [190.0, 210.0, -480.0]
    img = nib.Nifti1Image(image, affine)
    img.set_data_dtype(np.int16)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def make_checkpoint(folder):
    import torch

    import config
    import models
    from core.checkpoint import save_checkpoint

    cfg = config.resolve_config("synapse", "em_net", overrides=["trainer.device=cpu"])
    torch.manual_seed(0)
    model = models.build_model(cfg["model"]["name"], **config.model_kwargs(cfg))
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / "checkpoint.pt", {"state_dict": model.state_dict(), "config": cfg})
    return folder / "checkpoint.pt"


def _tree_rss_bytes(root):
    """Summed resident memory of process `root` and all its descendants (the data loader's workers)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # the process ended meanwhile
    tree, frontier = {root}, [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier and pid not in tree]
        tree.update(frontier)
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total


def run_predict(checkpoint, image, out_dir, sw_batch_size):
    """Wall and CPU seconds, and peak memory (MiB) of one `main.py predict` process: its own peak RSS
    (getrusage) and the peak of the RSS summed over it and its loader workers (sampled every 0.2 s)."""
    cmd = [sys.executable, str(REPO / "main.py"), "predict", "--checkpoint", str(checkpoint), "--input", str(image),
           "--output", str(out_dir), *CONFIGS, "--set", f"inference.sw_batch_size={sw_batch_size}"]
    started = time.perf_counter()
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_tree = [0]

    def sample():
        while process.returncode is None:
            peak_tree[0] = max(peak_tree[0], _tree_rss_bytes(process.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    errors = process.stderr.read()  # until the child closes it; avoids a full pipe blocking the child
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"predict with sw_batch_size {sw_batch_size} failed ({process.returncode}):\n{errors[-3000:]}")
    return {"sw_batch_size": sw_batch_size, "wall_s": round(seconds, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),  # includes its reaped workers
            "peak_rss_mib": round(usage.ru_maxrss / 1024),  # ru_maxrss is in KiB on Linux
            "peak_tree_rss_mib": round(peak_tree[0] / 2**20)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_predict"))
    parser.add_argument("--sw-batch-sizes", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    image = args.workdir / "ct_512x512x150.nii.gz"
    if not image.is_file():
        make_volume(image)
    checkpoint = make_checkpoint(args.workdir / "run")
    print(describe_machine(), flush=True)

    results, segmentations = [], {}
    for n in args.sw_batch_sizes:
        out_dir = args.workdir / f"pred_sw{n}"
        results.append(run_predict(checkpoint, image, out_dir, n))
        segmentations[n] = np.asarray(nib.load(str(out_dir / image.name)).dataobj)
        print(json.dumps(results[-1]), flush=True)
    first = args.sw_batch_sizes[0]
    for n in args.sw_batch_sizes[1:]:
        differ = int(np.count_nonzero(segmentations[n] != segmentations[first]))
        print(f"sw_batch_size {n} vs {first}: {differ} of {segmentations[first].size} voxels differ")
    print("| sw_batch_size | wall s | CPU s | peak RSS GiB (process) | peak RSS GiB (with workers) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['sw_batch_size']} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['peak_rss_mib'] / 1024:.2f} "
              f"| {r['peak_tree_rss_mib'] / 1024:.2f} |")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
