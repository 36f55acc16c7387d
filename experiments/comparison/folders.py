"""`main.py compare DIR...`: the tested runs of experiment folders or run folders as RunResults, with their
provenance, parameters and FLOPs, then `compare` into <first folder>/comparison (or --output)."""
import csv
import hashlib
import json
from pathlib import Path

import config
import data
from core.errors import ConfigError
from core.fileio import atomic_path
from core.rundir import RunDir
from engine.flops import count_flops

from .. import job, spec
from .compare import RunResult, compare

ENSEMBLE = "ensemble_{checkpoint}"  # <experiment>/<model>/ensemble_best/: a model's runs evaluated together


def read_rows(path):
    with open(path, newline="") as f:
        return [{"case": r["case"], "class_index": int(r["class_index"]), "class_name": r["class_name"],
                 "dice": float(r["dice"]), "hd95": float(r["hd95"])} for r in csv.DictReader(f)]


class Costs:
    """Parameters and FLOPs of each distinct model section, counted once (a paper-size model takes a while
    on a CPU) and kept in <output>/costs.json."""

    def __init__(self, path):
        self.path = Path(path)
        self.saved = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def __call__(self, cfg):
        key = hashlib.sha256(json.dumps(cfg["model"], sort_keys=True).encode()).hexdigest()[:16]
        if key not in self.saved:
            counted = count_flops({**cfg, "trainer": {**cfg["trainer"], "device": "cpu"}})
            self.saved[key] = {"params": counted["params"], "flops": counted["flops"], "model": cfg["model"]["name"]}
            with atomic_path(self.path, ".json") as tmp:
                Path(tmp).write_text(json.dumps(self.saved, indent=1))
        return self.saved[key]["params"], self.saved[key]["flops"]


def selected_on_test(cfg):
    """Whether the run chose its best checkpoint on its test cases (validation and test lists share images)."""
    lists = data.read_datalist(cfg["data"], cfg["model"]["out_channels"])
    return bool({e["image"] for e in lists["validation"]} & {e["image"] for e in lists["test"]})


def run_result(model, replicate, run, checkpoint, costs, extra=None):
    """The RunResult of one tested run folder, or None when its evaluation of `checkpoint` is missing."""
    metrics = run.eval_root / f"checkpoint_{checkpoint}" / "metrics.csv"
    if not metrics.is_file():
        return None
    cfg = config.load_config(run.config)
    params, flops = costs(cfg)
    record = job.read_record(run.path)
    provenance = {"commit": record.get("commit"), "wall_time_s": record.get("wall_s"), "host": record.get("host"),
                  "run_dir": str(run.path), "checkpoint": checkpoint, **(extra or {})}
    for name in ("best", "latest"):
        summary = run.eval_root / f"checkpoint_{name}" / "summary.json"
        if summary.is_file():
            provenance[f"{name}_epoch"] = json.loads(summary.read_text()).get("checkpoint", {}).get("epoch")
    return RunResult(model, replicate, read_rows(metrics), params, flops,
                     {k: v for k, v in provenance.items() if v is not None}, selected_on_test(cfg), cfg)


def from_experiment(folder, checkpoint, costs):
    """(results, missing) of an experiment folder: every run of its grid, then its models' ensembles."""
    experiment = spec.load_experiment(folder / "experiment.yaml", root=folder.parent)
    checkpoint = checkpoint or experiment.checkpoint
    results, missing = [], []
    for run in experiment.runs:
        found = run_result(run.model, run.replicate, RunDir(run.path), checkpoint, costs,
                           {"seed": run.seed, "fold": run.fold})
        if found is None:
            state = job.read_record(run.path).get("state", job.PENDING)
            missing.append(f"{run.key}: {state}, no evaluation of checkpoint_{checkpoint}")
        else:
            results.append(found)
    for model in experiment.models:
        ensemble = folder / model / ENSEMBLE.format(checkpoint=checkpoint)
        members = ensemble / "members.json"
        if members.is_file():
            listed = json.loads(members.read_text())
            summary = json.loads((ensemble / "summary.json").read_text())
            params, flops = costs(config.load_config(RunDir.of_checkpoint(listed[0]).config))
            results.append(RunResult(f"{model} (ensemble of {len(listed)})", "", read_rows(ensemble / "metrics.csv"),
                                     params * len(listed), flops * len(listed),
                                     {"members": len(listed), "run_dir": str(ensemble)}, False, summary))
    return results, missing


def compare_folders(folders, reference=None, checkpoint=None, output=None):
    """Compare the runs of `folders` (experiment folders or run folders); one-line errors for folders that
    are neither, and for runs that cannot be compared (other cases or classes)."""
    output = Path(output) if output else folders[0] / "comparison"
    costs = Costs(output / "costs.json")
    results, missing = [], []
    for folder in folders:
        if (folder / "experiment.yaml").is_file():
            found, absent = from_experiment(folder, checkpoint, costs)
            results, missing = results + found, missing + absent
        elif (folder / RunDir.CONFIG).is_file():
            found = run_result(folder.name, "", RunDir(folder), checkpoint or "best", costs)
            results += [found] if found else []
            missing += [] if found else [f"{folder}: no evaluation (run `main.py test --checkpoint {folder}`)"]
        else:
            raise ConfigError(f"{folder}: neither an experiment folder (experiment.yaml) nor a run folder "
                              "(config.yaml)")
    if not results:
        raise ConfigError(f"nothing to compare: {'; '.join(missing) or 'no tested runs'}")
    try:
        written = compare(results, output, reference, missing)
    except ValueError as err:
        raise ConfigError(f"compare: {err}") from None
    print(f"compared {written['n_runs']} runs of {written['n_models']} models on {written['n_cases']} cases "
          f"against {written['reference']}; {len(missing)} missing")
    for name, path in written["files"].items():
        print(f"  {name}: {path}")
    return written
