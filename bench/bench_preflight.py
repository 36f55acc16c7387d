"""The pre-flight's cost on a data set of realistic size: 100 CT cases of 512 x 512 x 100 voxels (.nii.gz,
bench_fingerprint.py's data set, generated once), side by side in one run:

    python bench/bench_preflight.py [--workdir /tmp/bench_fingerprint] [--cases 100]

  verified  the pre-flight as it is: every image and label decompressed to the end of its gzip stream (CRC
            and length checked), the voxels checked, nothing cached yet;
  partial   what it did before: nibabel reads the voxels it needs and stops before the stream's end (no CRC),
            the same checks on the arrays;
  cached    the pre-flight again: the answers come from <data_dir>/.preflight_cache.json.
Where this process may (root), the OS page cache is dropped before each cold run, so both read from disk.
"""
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
from bench_fingerprint import _drop_page_cache, generated_data_set  # bench/ is this script's folder, first on sys.path
from machine import describe as describe_machine
from rss import reset_peak_rss, status_kb

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _data_section(folder):
    """configs/defaults.yaml's data section for the generated set (no validation list: 20% of training)."""
    import config

    return {**config.read_yaml(config.DEFAULTS_FILE)["data"], "name": "bench", "data_dir": str(folder),
            "val_fraction": 0.2}


def verified(folder):
    from data.preflight import CACHE_NAME, check_datalist

    (folder / CACHE_NAME).unlink(missing_ok=True)
    return check_datalist(_data_section(folder), 1, 9)


def cached(folder):
    from data.preflight import check_datalist

    return check_datalist(_data_section(folder), 1, 9)


def partial(folder):
    """The checks on arrays nibabel reads without reaching the stream's end, as many files at a time."""
    def read(path):
        array = np.asanyarray(nib.load(str(path)).dataobj)
        return np.unique(array).size if "labels" in str(path) else bool(np.isfinite(array).all())

    files = sorted(folder.glob("imagesTr/*.nii.gz")) + sorted(folder.glob("labelsTr/*.nii.gz"))
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:  # as the pre-flight
        list(pool.map(read, files))
    return len(files) // 2


def timed(fn, folder, drop):
    dropped = _drop_page_cache() if drop else False
    reset_peak_rss()
    started = time.perf_counter()
    count = fn(folder)
    return time.perf_counter() - started, status_kb("VmHWM") / 1024, count, dropped


def main():
    folder, cases = generated_data_set(__doc__)
    size_gb = sum(p.stat().st_size for p in folder.rglob("*.nii.gz")) / 1e9
    print(f"{cases} cases of 512 x 512 x 100 voxels, image and label ({size_gb:.1f} GB of .nii.gz)")
    for name, fn, drop in (("partial (before: no CRC)", partial, True), ("verified (to the stream's end)", verified,
                                                                          True), ("cached", cached, False)):
        seconds, peak, count, dropped = timed(fn, folder, drop)
        page = "page cache dropped" if dropped else ("page cache kept: no root" if drop else "")
        print(f"{name:<32} {count} cases in {seconds:6.1f} s, peak RSS {peak:5.0f} MB  {page}")
    print(f"machine: {describe_machine()}")


if __name__ == "__main__":
    main()
