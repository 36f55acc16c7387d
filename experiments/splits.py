"""K-fold cross-validation over a data set's training and validation cases (never its test cases), assigned
once from a seed and written to <experiment>/splits.json, with one split file per fold that the fold's
run reads as data.split_file."""
import json
import os
from pathlib import Path

import numpy as np

import data
from core.errors import ConfigError
from core.fileio import atomic_path


def _relative(entry, data_dir):
    """An entry of absolute paths as the data set's own lists hold them: relative to data_dir."""
    return {key: os.path.relpath(value, data_dir) for key, value in entry.items()}


def assign_folds(cases, k, seed):
    """Fold index of each case: a permutation seeded by `seed`, cut into k folds of sizes differing by 1."""
    if len(cases) < k:
        raise ConfigError(f"folds: {k} folds need at least {k} training and validation cases, got {len(cases)}")
    order = np.random.default_rng(seed).permutation(len(cases))
    folds = np.empty(len(cases), dtype=int)
    for fold, members in enumerate(np.array_split(order, k)):
        folds[members] = fold
    return folds.tolist()


def write_folds(experiment, cfg):
    """splits.json and splits/fold_<k>.json of `experiment` from the data set of `cfg`, unless splits.json
    exists: folds are assigned once, and a later run of the experiment must find the same ones."""
    path = experiment.splits_file
    if path.is_file():
        saved = json.loads(path.read_text())
        if (saved.get("folds"), saved.get("seed")) != (experiment.folds, experiment.fold_seed):
            raise ConfigError(f"{path} holds {saved.get('folds')} folds from seed {saved.get('seed')}, the experiment "
                              f"file asks for {experiment.folds} from seed {experiment.fold_seed}; a fold's cases "
                              "must not change under its run: use another experiment name")
        return saved
    lists = data.read_datalist(cfg["data"], cfg["model"]["out_channels"])
    data_dir = Path(cfg["data"]["data_dir"]).expanduser().resolve()
    cases = [_relative(e, data_dir) for e in lists["training"] + lists["validation"]]
    test = [_relative(e, data_dir) for e in lists["test"]]
    folds = assign_folds(cases, experiment.folds, experiment.fold_seed)
    record = {"folds": experiment.folds, "seed": experiment.fold_seed, "data_dir": str(data_dir),
              "test": test, "fold_of_case": [{**case, "fold": fold} for case, fold in zip(cases, folds)]}
    for k in range(experiment.folds):
        split = {"training": [c for c, f in zip(cases, folds) if f != k],
                 "validation": [c for c, f in zip(cases, folds) if f == k], "test": test}
        _write_json(experiment.fold_split_file(k), split)
    _write_json(path, record)
    return record


def _write_json(path, content):
    with atomic_path(path, ".json") as tmp, open(tmp, "w") as f:
        json.dump(content, f, indent=1)
        f.write("\n")
