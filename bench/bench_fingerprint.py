"""`main.py plan` on a data set of realistic size: 100 CT cases of 512 x 512 x 100 voxels (.nii.gz), cold (no
fingerprint cache) and cached, with the process's peak memory.

    python bench/bench_fingerprint.py [--workdir /tmp/bench_fingerprint] [--cases 100]

The cases are the phantoms of data/synthetic.py drawn on a 128 x 128 x 50 grid at the scale of an adult
abdomen, upsampled 4 x 4 x 2 to 512 x 512 x 100 and given per-case quantum noise (12 HU), so each file
compresses like a CT scan (about 30 MB) rather than like repeated blocks; 4 drawings are shared by the cases.
Spacings vary per case (0.7-0.9 mm in-plane, 2-3 mm slices). Generated once into --workdir (several GB).
Three runs: "cold" (no fingerprint cache; the OS page cache dropped first where this process may, as root),
the same with the files in the page cache (the CPU's share), and cached (the second `plan`).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from machine import describe as describe_machine  # bench/ is this script's folder, first on sys.path
from rss import reset_peak_rss, status_kb

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BASE = (128, 128, 50)
UPSAMPLE = (4, 4, 2)
DRAWINGS = 4


def _drawings():
    from data.synthetic import make_case

    # A body of about 88 x 68 mm drawn on 128 voxels of 0.85 mm fills the field of view as an abdomen does.
    return [make_case(np.random.default_rng(seed), shape=BASE, spacing=(0.85, 0.85, 2.0))[:2]
            for seed in range(DRAWINGS)]


def _save(array, spacing, path):
    img = nib.Nifti1Image(array, np.diag([-spacing[0], -spacing[1], spacing[2], 1.0]))
    img.set_data_dtype(array.dtype)
    nib.save(img, str(path))


def generate(folder, cases):
    """The data set in `folder` (kept when its dataset.json exists)."""
    if (folder / "dataset.json").is_file():
        return
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    drawings, entries, started = _drawings(), [], time.time()
    for i in range(cases):
        rng = np.random.default_rng(100 + i)
        image, label = (np.repeat(np.repeat(np.repeat(a, UPSAMPLE[0], 0), UPSAMPLE[1], 1), UPSAMPLE[2], 2)
                        for a in drawings[i % DRAWINGS])
        noisy = np.clip(image + rng.normal(0.0, 12.0, image.shape), -1024, 3071).astype(np.int16)
        spacing = (rng.uniform(0.7, 0.9),) * 2 + (rng.choice([2.0, 2.5, 3.0]),)
        name = f"case_{i:03d}.nii.gz"
        _save(noisy, spacing, folder / "imagesTr" / name)
        _save(label, spacing, folder / "labelsTr" / name)
        entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        print(f"\rgenerated {i + 1}/{cases} cases ({time.time() - started:.0f} s)", end="", flush=True)
    print()
    labels = {"0": "background", "1": "spleen", "2": "right_kidney", "3": "left_kidney", "4": "gallbladder",
              "5": "liver", "6": "stomach", "7": "aorta", "8": "pancreas"}
    (folder / "dataset.json").write_text(json.dumps({"name": "bench", "modality": {"0": "CT"}, "labels": labels,
                                                     "training": entries}))


def _drop_page_cache():
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed_plan(folder, rule):
    from data.plan import plan_folder

    reset_peak_rss()
    started = time.perf_counter()
    plan_folder(folder, rule)
    return time.perf_counter() - started, status_kb("VmHWM") / 1024


def generated_data_set(description):
    """The --workdir and --cases of the command line: the folder of that many generated cases, made once."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/bench_fingerprint")
    parser.add_argument("--cases", type=int, default=100)
    args = parser.parse_args()
    folder = Path(args.workdir) / f"ct{args.cases}"
    generate(folder, args.cases)
    return folder, args.cases


def main():
    folder, cases = generated_data_set(__doc__)
    from data.plan import WindowRule

    rule = WindowRule("em-net", "em_net", (32, 32, 32))
    cache = folder / ".fingerprint_cache.json"
    cache.unlink(missing_ok=True)
    dropped = _drop_page_cache()
    cold = timed_plan(folder, rule)
    cache.unlink()
    warm = timed_plan(folder, rule)  # every file read again, now from the OS page cache
    cached = timed_plan(folder, rule)
    size_gb = sum(p.stat().st_size for p in folder.rglob("*.nii.gz")) / 1e9
    print(f"\n{cases} cases of {' x '.join(str(b * u) for b, u in zip(BASE, UPSAMPLE))} voxels "
          f"({size_gb:.1f} GB of .nii.gz)")
    for what, (seconds, peak_mb) in ((f"cold ({'page cache dropped' if dropped else 'page cache kept: no root'})",
                                      cold), ("no fingerprint cache, files in the OS page cache", warm),
                                     ("cached", cached)):
        print(f"plan, {what}: {seconds:.2f} s, peak RSS {peak_mb:.0f} MB")
    print(f"machine: {describe_machine()}")


if __name__ == "__main__":
    main()
