"""The allowed values of every key in configs/defaults.yaml: ranges, lengths, choices and the checks
between keys. layering.py applies them once, after the types are checked, when a config is loaded."""
import math
import re

from core.errors import ConfigError

ORIENTATION_PAIRS = ("LR", "AP", "SI")
SCAN_BACKENDS = ("auto", "cuda", "triton", "numba", "torch")


def _at_least(low):
    return lambda v: None if v >= low else f"must be at least {low}"


def _above(low):
    return lambda v: None if v > low else f"must be above {low}"


def _in_range(low, high, low_open=False, high_open=False):
    def check(v):
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        return None if ok else f"must lie in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return check


def _one_of(*choices):
    return lambda v: None if v in choices else f"choose one of {', '.join(map(str, choices))}"


def _text(v):
    return None if isinstance(v, str) and v.strip() else "must be a non-empty text"


def _optional(rule):
    return lambda v: None if v is None else rule(v)


def _number(rule):
    """`rule` on a real number (bool excluded), for keys whose default is null and so has no type check."""
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return "must be a number"
        return rule(v)
    return check


def _items(count, rule):
    """A list of `count` values (any length if None), each passing `rule`."""
    def check(v):
        if count is not None and len(v) != count:
            return f"must have {count} values, got {len(v)}"
        if count is None and not v:
            return "must not be empty"
        reasons = [rule(item) for item in v]
        return next((f"each value {r}" for r in reasons if r), None)
    return check


def _orientation(v):
    letters = [next((pair for pair in ORIENTATION_PAIRS if c in pair), None) for c in str(v)]
    if len(v) != 3 or None in letters or sorted(letters) != sorted(ORIENTATION_PAIRS):
        return "must be 3 letters, one of L/R, one of A/P and one of S/I (e.g. RAS)"
    return None


def _device(v):
    if v.lower() in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", v.lower()):
        return None
    return "choose auto, cpu, cuda or cuda:N"


def _sha256(v):
    return None if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) else "must be 64 lower-case hex digits"


def _seed(v):
    return None if 0 <= v < 2**32 else "must lie in [0, 2^32)"


POSITIVE = _above(0)
NON_NEGATIVE = _at_least(0)
PROBABILITY = _in_range(0.0, 1.0)
OVERLAP = _in_range(0.0, 1.0, high_open=True)

RULES = {
    "data.name": _text, "data.data_dir": _text, "data.dataset_json": _text,
    "data.split_file": _optional(_text),
    "data.val_fraction": _optional(_number(_in_range(0.0, 1.0, low_open=True, high_open=True))),
    "data.spacing": _items(3, POSITIVE), "data.orientation": _orientation,
    "data.normalization": _one_of("window", "ct", "zscore"),
    "data.intensity_range": _items(2, lambda v: None), "data.intensity_mean": _optional(_number(lambda v: None)),
    "data.intensity_std": _optional(_number(POSITIVE)), "data.crop_foreground": None,
    "data.num_samples": _at_least(1), "data.crop_sampling": _one_of("posneg", "classes"),
    "data.pos": NON_NEGATIVE, "data.neg": NON_NEGATIVE,
    "data.flip_prob": PROBABILITY, "data.rot90_prob": PROBABILITY, "data.rot90_max_k": _in_range(1, 3),
    "data.intensity_scale": NON_NEGATIVE, "data.intensity_shift": NON_NEGATIVE, "data.intensity_prob": PROBABILITY,
    "data.cache_rate": PROBABILITY, "data.num_workers": NON_NEGATIVE, "data.check_intensities": None,
    "data.fingerprint": _optional(_text), "data.fingerprint_sha256": _optional(_sha256),
    "model.name": _text, "model.in_channels": _at_least(1), "model.out_channels": _at_least(2),
    "model.roi_size": _items(3, _at_least(1)),
    "trainer.optimizer": _one_of("adamw", "sgd"), "trainer.lr": POSITIVE, "trainer.weight_decay": NON_NEGATIVE,
    "trainer.momentum": _in_range(0.0, 1.0, high_open=True), "trainer.nesterov": None,
    "trainer.max_epochs": _at_least(1), "trainer.iters_per_epoch": _at_least(1),
    "trainer.warmup_epochs": NON_NEGATIVE, "trainer.batch_size": _at_least(1), "trainer.amp": None,
    "trainer.val_every": _at_least(1), "trainer.deep_supervision_weights": _items(None, NON_NEGATIVE),
    "trainer.grad_clip": _optional(_number(POSITIVE)), "trainer.max_nonfinite_steps": _at_least(1),
    "trainer.sync_batchnorm": None, "trainer.seed": _seed, "trainer.device": _device,
    "trainer.scan_backend": _one_of(*SCAN_BACKENDS),
    "inference.split": _one_of("test", "validation"), "inference.val_overlap": OVERLAP,
    "inference.overlap": OVERLAP, "inference.blend_mode": _one_of("gaussian", "constant"),
    "inference.sw_batch_size": _at_least(1), "inference.mirror": None, "inference.save_predictions": None,
    "inference.save_overlays": None,
}
# None above: the type check against the default (true or false) is the whole rule.


def _between_keys(cfg):
    """(keys, reason) for values that are fine alone but not together."""
    data, trainer = cfg["data"], cfg["trainer"]
    low, high = data["intensity_range"]
    if not low < high:
        yield ("data.intensity_range",), "must be [low, high] with low < high"
    if data["normalization"] == "ct":
        for key in ("intensity_mean", "intensity_std"):
            if data[key] is None:
                yield (f"data.{key}", "data.normalization"), "ct normalization needs the foreground mean and std"
    if data["pos"] + data["neg"] <= 0:
        yield ("data.pos", "data.neg"), "must not both be 0"
    if trainer["warmup_epochs"] > trainer["max_epochs"]:
        yield ("trainer.warmup_epochs", "trainer.max_epochs"), "the warmup must not be longer than the training"
    if sum(trainer["deep_supervision_weights"]) <= 0:
        yield ("trainer.deep_supervision_weights",), "give non-negative weights with a positive sum"
    if trainer["optimizer"] == "sgd" and trainer["nesterov"] and trainer["momentum"] == 0:
        yield ("trainer.nesterov", "trainer.momentum"), "Nesterov SGD needs a momentum above 0"


def check_values(cfg, source_of):
    """Raise a ConfigError for the first value outside its allowed range; `source_of(path)` names the file
    (or --set) that set a key, given as a tuple of its parts."""
    for key, rule in RULES.items():
        section, name = key.split(".")
        if rule is None or name not in cfg.get(section, {}):
            continue
        value = cfg[section][name]
        reason = rule(value)
        if reason:
            raise ConfigError(f"{source_of((section, name))}: {key} = {value!r}: {reason}")
    for keys, reason in _between_keys(cfg):
        parts = [key.split(".") for key in keys]
        if len(keys) == 1:
            (section, name), = parts
            raise ConfigError(f"{source_of((section, name))}: {keys[0]} = {cfg[section][name]!r}: {reason}")
        given = " and ".join(f"{key} = {cfg[s][n]!r} ({source_of((s, n))})" for key, (s, n) in zip(keys, parts))
        raise ConfigError(f"{given}: {reason}")
