"""The experiment runner's own time per run, beyond the run itself: an experiment of --runs tiny runs (a
3-level U-Net, 1 step, 2 test cases) run in this process; the runner's share is the wall time of
run_experiment less the runs' own wall times (job.execute's, from their records), per run.

    python bench/bench_runner.py [--runs 6] [--workdir /tmp/bench_runner]
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import yaml
from machine import describe as describe_machine  # bench/ is this script's folder, first on sys.path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--workdir", default="/tmp/bench_runner")
    args = parser.parse_args()
    from data import generate_synthetic_dataset
    from experiments import runner, spec
    from experiments.local import LocalLauncher

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    generate_synthetic_dataset(work / "phantoms", n_train=2, n_val=1, n_test=2, seed=0)
    settings = [f"data.data_dir={work / 'phantoms'}", "data.spacing=[6.0, 6.0, 6.0]", "data.num_samples=1",
                "model.roi_size=[16, 16, 16]", "model.channels=[4, 8, 16]", "trainer.max_epochs=1",
                "trainer.iters_per_epoch=1", "trainer.warmup_epochs=0", "trainer.device=cpu",
                "inference.save_predictions=false", "inference.save_overlays=false"]
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump({"name": "bench", "data_config": "synthetic", "trainer_config": "synthetic",
                                    "set": settings, "models": ["unet"], "seeds": list(range(args.runs)),
                                    "output": str(work / "experiments")}))
    os.chdir(work)
    experiment = spec.load_experiment(path)
    started = time.perf_counter()
    runner.run_experiment(experiment, LocalLauncher())
    total = time.perf_counter() - started
    runs = json.loads((experiment.folder / "experiment.json").read_text())["runs"]
    inside = sum(record["wall_s"] for record in runs.values())
    print(f"{args.runs} runs: {total:.1f} s in all, {inside:.1f} s inside the runs; the runner's own time "
          f"{(total - inside) / args.runs:.2f} s per run (target under 2 s)")
    print(f"machine: {describe_machine()}")


if __name__ == "__main__":
    main()
