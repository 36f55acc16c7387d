"""Layered YAML files plus --set overrides, merged and validated into one plain nested dict.

Layers, lowest first: configs/defaults.yaml < dataset < model < trainer < overrides ("key.sub=value").
Every key must exist in defaults.yaml, except under `model:`, whose keys are `name` plus the registered
builder's arguments; the resolved config lists every effective value, builder defaults included. Every
value is checked once, here: its type against the default's, then its range, length or allowed values
(config/rules.py); an error names the key and the file (or --set) that gave it.
"""
import copy
import difflib
import inspect
import os
import re
from pathlib import Path

import yaml

from core.errors import ConfigError
from core.fileio import atomic_path

from .rules import check_values

ROOT = Path(__file__).resolve().parents[1]  # the project folder
CONFIG_DIR = ROOT / "configs"
DEFAULTS_FILE = CONFIG_DIR / "defaults.yaml"
KINDS = {"data": "datasets", "model": "models", "trainer": "trainers"}
SET_SOURCE = "--set"


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where 3e-4 (no dot) is a string; accept YAML 1.2 floats like 3e-4 and 1E5."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def available(kind):
    """Names of the config files of one kind ("datasets", "models", "trainers")."""
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))


def config_path(kind, name):
    """A bare name means configs/<kind>/<name>.yaml; anything with a slash or a .yaml suffix is a path."""
    name = str(name)
    if "/" in name or os.sep in name or name.endswith((".yaml", ".yml")):
        path = Path(name)
    else:
        path = CONFIG_DIR / kind / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(available(kind)) or "none"
        raise ConfigError(f"config file {_label(path)} not found; available {kind}: {names}")
    return path


def dataset_section(name):
    """The `data:` section of configs/datasets/<name>.yaml as written (not layered on the defaults)."""
    return read_yaml(config_path("datasets", name)).get("data", {})


def read_yaml(path):
    """A YAML mapping from `path` ({} for an empty file); errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {_label(path)} not found") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{_label(path)}{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{_label(path)}: expected a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text):
    """'trainer.lr=3e-4' -> (("trainer", "lr"), 0.0003); the value is parsed as YAML."""
    key, sep, raw = str(text).partition("=")
    parts = tuple(key.strip().split("."))
    if not sep or not all(parts):
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. trainer.lr=3e-4")
    try:
        value = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError:
        raise ConfigError(f"--set {text!r}: value {raw!r} is not valid YAML") from None
    return parts, value


def resolve_config(data_config=None, model_config=None, trainer_config=None, overrides=()):
    """Merge defaults < dataset < model < trainer < overrides into a validated nested dict."""
    layers = []
    for kind, name in (("datasets", data_config), ("models", model_config), ("trainers", trainer_config)):
        if name is not None:
            path = config_path(kind, name)
            layers.append((_label(path), read_yaml(path)))
    return _resolve(layers, overrides)


def load_config(path, overrides=()):
    """A saved resolved config (e.g. a run folder's config.yaml), validated again, with overrides on top."""
    path = Path(path)
    return _resolve([(_label(path), read_yaml(path))], overrides)


def save_config(cfg, path):
    """Write `cfg` as YAML atomically (temp file in the same folder, then os.replace)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        yaml.safe_dump(_plain(cfg), f, sort_keys=False, default_flow_style=None)
    return Path(path)


def model_kwargs(cfg):
    """The builder's keyword arguments from cfg["model"] (keys the builder does not take are left out)."""
    model = cfg["model"]
    accepted = _model_arguments(model["name"], "model.name")
    return {k: v for k, v in model.items() if k in accepted}


# ---------------------------------------------------------------------------------------------------------


def _label(path):
    """How a file is named in messages: relative to the repo root when inside it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _resolve(layers, overrides):
    defaults = read_yaml(DEFAULTS_FILE)
    cfg, sources = {}, {}
    _merge(cfg, defaults, sources, _label(DEFAULTS_FILE))
    for label, layer in layers:
        _merge(cfg, layer, sources, label)
    for text in overrides:
        keys, value = parse_override(text)
        _merge(cfg, _nest(keys, value), sources, SET_SOURCE)
    _validate(cfg, defaults, sources)
    check_values(cfg, lambda path: _source(sources, path))
    return cfg


def _nest(keys, value):
    for key in reversed(keys):
        value = {key: value}
    return value


def _merge(dst, src, sources, label, prefix=()):
    """Deep-merge mappings (lists and scalars are replaced) and record which layer set each key."""
    for key, value in src.items():
        path = prefix + (key,)
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, sources, label, path)
        else:
            dst[key] = copy.deepcopy(value)
            for k in [k for k in sources if k[: len(path)] == path]:
                del sources[k]
            sources[path] = label


def _source(sources, path):
    """The layer that set `path` (or the nearest enclosing key)."""
    for n in range(len(path), 0, -1):
        if path[:n] in sources:
            return sources[path[:n]]
    return "?"


def _dotted(path):
    return ".".join(str(p) for p in path)


def _validate(cfg, defaults, sources):
    for section in list(cfg):
        if section not in defaults:
            _unknown((section,), list(defaults), sources)
        values = cfg[section]
        if not isinstance(values, dict):
            raise ConfigError(
                f"{_source(sources, (section,))}: section '{section}' must be a mapping of keys, got {values!r}"
            )
        if section == "model":
            _validate_model(values, defaults["model"], sources)
        else:
            _check_mapping((section,), values, defaults[section], sources)


def _check_mapping(prefix, values, spec, sources):
    for key in list(values):
        path = prefix + (key,)
        if key not in spec:
            _unknown(path, list(spec), sources)
        values[key] = _check_value(path, values[key], spec[key], sources)


def _unknown(path, valid, sources):
    name = _dotted(path)
    where = ".".join(str(p) for p in path[:-1])
    full = [f"{where}.{v}" if where else str(v) for v in valid]
    close = difflib.get_close_matches(str(path[-1]), [str(v) for v in valid], n=1)
    if close:
        hint = f"; did you mean '{f'{where}.' if where else ''}{close[0]}'?"
    else:
        hint = f"; valid: {', '.join(full)}"
    kind = "section" if len(path) == 1 else "key"
    raise ConfigError(f"{_source(sources, path)}: unknown {kind} '{name}'{hint}")


def _validate_model(values, base, sources):
    """Allowed keys: `name`, the keys defaults.yaml lists under model, and the builder's arguments.
    Builder defaults fill the keys not given; a required builder argument still missing is an error."""
    name = values.get("name")
    if not isinstance(name, str):
        raise ConfigError(f"{_source(sources, ('model', 'name'))}: model.name must be a string, got {name!r}")
    arguments = _model_arguments(name, _source(sources, ("model", "name")))
    spec = {k: (None if v is inspect.Parameter.empty else _plain(v)) for k, v in arguments.items()}
    spec.update(base)  # defaults.yaml's own model keys (in/out channels, roi_size) take their type from there
    _check_mapping(("model",), values, spec, sources)
    missing = [k for k, v in arguments.items() if v is inspect.Parameter.empty and k not in values]
    if missing:
        raise ConfigError(
            f"model '{name}' needs {', '.join(f'model.{k}' for k in missing)}, "
            f"which no config sets (model.name from {_source(sources, ('model', 'name'))})"
        )
    # Rebuild in a readable order: name, then the builder's arguments, then anything else.
    filled = {"name": name}
    for key, default in arguments.items():
        filled[key] = values[key] if key in values else _plain(default)
    filled.update({k: v for k, v in values.items() if k not in filled})
    values.clear()
    values.update(filled)


def _model_arguments(name, source):
    # Imported here so that a config error is reported before torch is loaded.
    import models

    try:
        return models.model_defaults(name)
    except KeyError as err:
        raise ConfigError(f"{source}: model.name = {name!r}: {err.args[0]}") from None


def _plain(value):
    """Tuples become lists so the config stays plain YAML."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _describe(default):
    if isinstance(default, bool):
        return "true or false"
    if _is_int(default):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, str):
        return "a string"
    if isinstance(default, list):
        if default and all(_is_int(v) for v in default):
            return "a list of integers"
        if default and all(_is_number(v) for v in default):
            return "a list of numbers"
        return "a list"
    if isinstance(default, dict):
        return "a mapping"
    return type(default).__name__


def _check_value(path, value, default, sources):
    """`value` checked against the type of `default`; ints given for floats become floats."""
    if default is None:
        return value
    expected = _describe(default)
    if value is None:
        raise ConfigError(
            f"{_source(sources, path)}: {_dotted(path)} = null, expected {expected} "
            "(null is allowed only where the default is null)"
        )
    bad = ConfigError(
        f"{_source(sources, path)}: {_dotted(path)} = {value!r} ({type(value).__name__}), expected {expected}"
    )
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif _is_int(default):
        ok = _is_int(value)
    elif isinstance(default, float):
        ok = _is_number(value)
        value = float(value) if ok else value
    elif isinstance(default, list):
        ok = isinstance(value, list)
        if ok and default and all(_is_int(v) for v in default):
            ok = all(_is_int(v) for v in value)
        elif ok and default and all(_is_number(v) for v in default):
            ok = all(_is_number(v) for v in value)
            value = [float(v) for v in value] if ok and any(isinstance(v, float) for v in default) else value
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
        if ok:
            _check_mapping(path, value, default, sources)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise bad
    return value
