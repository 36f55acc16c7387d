"""One registry for every network: a name, its builder, the sizes its window (roi_size) may take and, where
the network has one, a converter for checkpoints written by other code. `build_model(name, **kwargs)` builds
any registered network; `window_rule(name, **kwargs)` says which windows it accepts, without building it."""
import difflib
import inspect

_BUILDERS = {}
_CONVERTERS = {}
_WINDOWS = {}


def register_model(name, convert_state_dict=None, window_multiple=1, coarsest_voxels=1):
    """Decorator registering a class or factory under `name` (lower-case; the paper's spelling).

    `convert_state_dict(state_dict)`, if given, maps a checkpoint's weights written by other code (e.g. the
    paper's reference implementation) to this network's names, and returns other state_dicts unchanged.
    `window_multiple` is what each side of roi_size must be divisible by (the network's total downsampling,
    as its builder checks it): an int, 3 ints (one per side), or a function of the builder's keyword
    arguments returning either; `coarsest_voxels` the fewest voxels the coarsest feature map may hold."""

    def decorator(builder):
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is registered twice")
        _BUILDERS[name] = builder
        _WINDOWS[name] = (window_multiple, coarsest_voxels)
        if convert_state_dict is not None:
            _CONVERTERS[name] = convert_state_dict
        return builder

    return decorator


def window_rule(name, **kwargs):
    """(multiple per side as 3 ints, fewest voxels on the coarsest map) of the windows model `name` accepts
    when built with `kwargs` (the builder's defaults fill the rest)."""
    multiple, coarsest = _WINDOWS[_builder_name(name)]
    if callable(multiple):
        arguments = {k: v for k, v in model_defaults(name).items() if v is not inspect.Parameter.empty}
        multiple = multiple({**arguments, **kwargs})
    sides = (multiple,) * 3 if isinstance(multiple, int) else tuple(multiple)
    return sides, coarsest


def list_models():
    return sorted(_BUILDERS)


def _builder(name):
    return _BUILDERS[_builder_name(name)]


def _builder_name(name):
    """`name` itself when registered; otherwise a KeyError with the closest registered name."""
    if name in _BUILDERS:
        return name
    close = difflib.get_close_matches(str(name), list(_BUILDERS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise KeyError(f"unknown model {name!r}{hint} (known: {', '.join(list_models())})")


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


def convert_state_dict(name, state_dict):
    """`state_dict` in the names of model `name`: its registered converter applied, if it has one."""
    converter = _CONVERTERS.get(name)
    return state_dict if converter is None else converter(state_dict)
