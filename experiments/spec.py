"""An experiment file: a grid of runs over models and seeds (or cross-validation folds), each run an ordinary
run folder under runs/experiments/<name>/<model>/<seed_s | fold_k>/.

    name: synapse_table1          # folder name (default: the file's name)
    data_config: synapse
    trainer_config: sgd
    set: [trainer.max_epochs=400] # --set overrides for every run
    models:
      - config: em_net            # a model config name or path
        name: EM-Net              # display name and folder name (default: the config name)
        set: [model.deep_supervision=true]
      - config: swin_unetr
    seeds: [0, 1, 2]              # or `folds: 5` (with `fold_seed: 0`)
    checkpoint: best              # what `compare` reports: best | latest
    slurm: {partition: gpu, gpus_per_node: 1, time_min: 1440}   # --launcher slurm
"""
import re
from dataclasses import dataclass, field
from pathlib import Path

import config
from core.errors import ConfigError

KEYS = ("name", "data_config", "trainer_config", "set", "models", "seeds", "folds", "fold_seed", "checkpoint",
        "slurm", "output")
MODEL_KEYS = ("config", "name", "set")
SLURM_KEYS = ("partition", "account", "nodes", "gpus_per_node", "processes_per_node", "cpus_per_task", "mem_gb",
              "time_min", "array_parallelism", "signal_delay_s", "max_requeues", "additional")
CHECKPOINTS = ("best", "latest")
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: its model, its seed or fold, its folder and the overrides that make its config."""
    model: str           # display name, also the model's folder name
    model_config: str
    replicate: str       # "seed_0", "fold_2"
    seed: int | None
    fold: int | None
    path: Path
    overrides: tuple

    @property
    def key(self):
        return f"{self.model}/{self.replicate}"

    @property
    def pool_overrides(self):
        """The overrides without the fold's split file (the last one): the data lists the folds are cut from."""
        return self.overrides[:-1] if self.fold is not None else self.overrides


@dataclass
class Experiment:
    name: str
    file: Path
    folder: Path
    data_config: str
    trainer_config: str
    runs: list
    seeds: list | None = None
    folds: int | None = None
    fold_seed: int = 0
    checkpoint: str = "best"
    slurm: dict = field(default_factory=dict)
    models: list = field(default_factory=list)  # display names, in the file's order

    def config(self, run, fold_split=True):
        """The resolved config of `run`, exactly as a single run would get it from the same flags; without its
        fold's split file where `fold_split` is false."""
        overrides = run.overrides if fold_split else run.pool_overrides
        return config.resolve_config(self.data_config, run.model_config, self.trainer_config, overrides)

    @property
    def splits_file(self):
        return self.folder / "splits.json"

    def fold_split_file(self, fold):
        return self.folder / "splits" / f"fold_{fold}.json"


def _fail(path, message):
    raise ConfigError(f"{path}: {message}")


def _overrides(path, value, where):
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        _fail(path, f"{where} must be a list of key=value overrides, e.g. [trainer.max_epochs=2], got {value!r}")
    for text in value:
        config.parse_override(text)  # a malformed one is an error here, not at the first run
    return tuple(value)


def _models(path, entries):
    if not isinstance(entries, list) or not entries:
        _fail(path, "models must be a non-empty list of {config, name, set} entries")
    models = []
    for i, entry in enumerate(entries):
        entry = {"config": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "config" not in entry:
            _fail(path, f"models[{i}] must be a config name or a mapping with 'config', got {entry!r}")
        unknown = sorted(set(entry) - set(MODEL_KEYS))
        if unknown:
            _fail(path, f"models[{i}] has unknown key {unknown[0]!r}; valid: {', '.join(MODEL_KEYS)}")
        model_config = str(entry["config"])
        config.config_path("models", model_config)  # exists, or a one-line error listing the names
        name = str(entry.get("name") or Path(model_config).stem)
        if not SAFE_NAME.fullmatch(name):
            _fail(path, f"models[{i}].name {name!r} must be a folder name (letters, digits, _ . + -)")
        models.append((name, model_config, _overrides(path, entry.get("set"), f"models[{i}].set")))
    names = [m[0] for m in models]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        _fail(path, f"two models are named {twice[0]!r}; give them different names")
    return models


def _replicates(path, content):
    seeds, folds = content.get("seeds"), content.get("folds")
    if (seeds is None) == (folds is None):
        _fail(path, "give either seeds: [0, 1, 2] or folds: K")
    if seeds is not None:
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                               and 0 <= s < 2**32 for s in seeds):
            _fail(path, f"seeds must be a non-empty list of integers in [0, 2^32), got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            _fail(path, f"seeds {seeds} repeat a seed")
        return [(f"seed_{s}", s, None) for s in seeds]
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        _fail(path, f"folds must be an integer of at least 2, got {folds!r}")
    return [(f"fold_{k}", None, k) for k in range(folds)]


def _slurm(path, section, overrides):
    section = dict(section or {})
    if not isinstance(section, dict):
        _fail(path, f"slurm must be a mapping, got {section!r}")
    for text in overrides:
        keys, value = config.parse_override(text)
        if len(keys) != 2 or keys[0] != "slurm":
            raise ConfigError(f"--set {text}: experiment takes slurm.<key>=value here (run settings belong in "
                              "the experiment file's set: list)")
        section[keys[1]] = value
    unknown = sorted(set(section) - set(SLURM_KEYS))
    if unknown:
        _fail(path, f"slurm has unknown key {unknown[0]!r}; valid: {', '.join(SLURM_KEYS)}")
    return section


def load_experiment(path, slurm_overrides=(), root=Path("runs") / "experiments"):
    """The experiment described by the YAML file `path`; every mistake is a one-line ConfigError naming
    the file and the key."""
    path = Path(path)
    content = config.read_yaml(path)
    unknown = sorted(set(content) - set(KEYS))
    if unknown:
        _fail(path, f"unknown key {unknown[0]!r}; valid: {', '.join(KEYS)}")
    for key in ("data_config", "trainer_config"):
        if not isinstance(content.get(key), str):
            _fail(path, f"{key} must name a config, got {content.get(key)!r}")
    config.config_path("datasets", content["data_config"])
    config.config_path("trainers", content["trainer_config"])
    name = str(content.get("name") or path.stem)
    if not SAFE_NAME.fullmatch(name):
        _fail(path, f"name {name!r} must be a folder name (letters, digits, _ . + -)")
    checkpoint = content.get("checkpoint", "best")
    if checkpoint not in CHECKPOINTS:
        _fail(path, f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
    fold_seed = content.get("fold_seed", 0)
    if not isinstance(fold_seed, int) or isinstance(fold_seed, bool) or fold_seed < 0:
        _fail(path, f"fold_seed must be a non-negative integer, got {fold_seed!r}")
    shared = _overrides(path, content.get("set"), "set")
    folder = Path(content.get("output") or root) / name
    experiment = Experiment(name, path, folder, content["data_config"], content["trainer_config"], [],
                            content.get("seeds"), content.get("folds"), fold_seed, checkpoint,
                            _slurm(path, content.get("slurm"), slurm_overrides))
    for model, model_config, own in _models(path, content["models"]):
        experiment.models.append(model)
        for replicate, seed, fold in _replicates(path, content):
            extra = (f"trainer.seed={seed}",) if seed is not None else (
                f"data.split_file={experiment.fold_split_file(fold)}",)
            experiment.runs.append(RunSpec(model, model_config, replicate, seed, fold, folder / model / replicate,
                                           (*shared, *own, *extra)))
    return experiment
