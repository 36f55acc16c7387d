"""`experiments.comparison.compare` on a comparison the size of the paper's: wall time end to end.

    python bench/bench_compare.py [--out DIR] [--repeats 3]

13 models x 3 seeds x 12 cases x 8 classes of generated metrics (Dice and HD95 drawn around a per-model
level, each case a little easier or harder for every model), compared against the first model: tables,
stats.csv (12 x 9 x 2 = 216 paired tests, each with a 10,000-resample bootstrap), three figures and
report.html. The time is of the compare() call (imports excluded), best of --repeats; the target is under
30 s on 2 CPU cores.
"""
import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments.comparison import RunResult, compare  # noqa: E402

MODELS, SEEDS, CASES = 13, 3, 12
CLASSES = ["spleen", "right kidney", "left kidney", "gallbladder", "liver", "stomach", "aorta", "pancreas"]


def make_results(seed=0):
    rng = np.random.default_rng(seed)
    shape = (MODELS, SEEDS, CASES, len(CLASSES))
    level = rng.uniform(0.72, 0.86, (MODELS, 1, 1, 1))
    dice = np.clip(level + rng.normal(0, 0.04, (1, 1, CASES, 1)) + rng.normal(0, 0.03, shape), 0, 1)
    hd95 = 3.0 + 40 * (1 - level) + rng.gamma(2.0, 2.0, shape)
    results = []
    for m in range(MODELS):
        for s in range(SEEDS):
            rows = [{"case": f"img{c:04d}", "class_index": k + 1, "class_name": name,
                     "dice": float(dice[m, s, c, k]), "hd95": float(hd95[m, s, c, k])}
                    for c in range(CASES) for k, name in enumerate(CLASSES)]
            results.append(RunResult(f"model_{m:02d}", f"seed_{s}", rows, int(rng.integers(5e6, 1e8)),
                                     float(rng.uniform(1e11, 1e12)), {"commit": "bench", "seed": s,
                                                                      "wall_time_s": 36000.0},
                                     False, {"model": {"name": f"model_{m:02d}"}}))
    return results


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="output folder (default: a temporary folder, removed afterwards)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = make_results()
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        for _ in range(args.repeats):
            start = time.perf_counter()
            summary = compare(results, out)
            times.append(time.perf_counter() - start)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {cpu_name()}, {cores} cores available, {platform.platform()}, Python {platform.python_version()}")
    print(f"compare: {summary['n_models']} models, {summary['n_runs']} runs, {summary['n_cases']} cases, "
          f"{summary['n_classes']} classes, tests run: {summary['tests_run']}")
    print(f"wall time end to end: best {min(times):.2f} s, all {', '.join(f'{t:.2f}' for t in times)} s "
          f"(target < 30 s)")


if __name__ == "__main__":
    main()
