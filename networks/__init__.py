"""Baselines of the paper's comparison, one module per family, each registering its names in
models.registry. Every module of this package is imported here, so a new family only needs its file."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
