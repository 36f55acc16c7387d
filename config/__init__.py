"""Configuration: layered YAML files plus --set overrides, validated into one plain nested dict
(layering.py: layers, keys and types; rules.py: the allowed values of every key)."""
from core.errors import ConfigError

from .layering import (
    CONFIG_DIR,
    DEFAULTS_FILE,
    KINDS,
    ROOT,
    SET_SOURCE,
    available,
    config_path,
    dataset_section,
    load_config,
    model_kwargs,
    parse_override,
    read_yaml,
    resolve_config,
    save_config,
)

__all__ = ["CONFIG_DIR", "DEFAULTS_FILE", "KINDS", "ROOT", "SET_SOURCE", "ConfigError", "available", "config_path",
           "dataset_section", "load_config", "model_kwargs", "parse_override", "read_yaml", "resolve_config",
           "save_config"]
