"""One registry for every network: EM-Net registers here, and so does every baseline under networks/.

The baselines package is imported on the first lookup (as timm imports its model modules), so that
`models.build_model("unet", ...)` works without the caller knowing where a network lives, while models/
itself never imports networks/ at import time.
"""
import difflib
import importlib
import inspect

_BUILDERS = {}
_PLUGIN_PACKAGES = ("networks",)
_plugins_loaded = False


def register_model(name):
    """Decorator registering a class or factory under `name` (lower-case; the paper's spelling)."""

    def decorator(builder):
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is registered twice")
        _BUILDERS[name] = builder
        return builder

    return decorator


def _load_plugins():
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        for package in _PLUGIN_PACKAGES:
            importlib.import_module(package)


def list_models():
    _load_plugins()
    return sorted(_BUILDERS)


def _builder(name):
    _load_plugins()
    try:
        return _BUILDERS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_BUILDERS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown model {name!r}{hint} (known: {', '.join(list_models())})") from None


def model_defaults(name):
    """The builder's keyword arguments and their defaults (`inspect.Parameter.empty` when required)."""
    params = inspect.signature(_builder(name)).parameters
    return {k: p.default for k, p in params.items() if k != "self" and p.kind is not p.VAR_KEYWORD}


def build_model(name, **kwargs):
    allowed = model_defaults(name)
    for key in kwargs:
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"model {name!r} has no argument {key!r}{hint}")
    return _builder(name)(**kwargs)
