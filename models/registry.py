"""One registry for every network: a name, its builder and, where the network has one, a converter for
checkpoints written by other code. `build_model(name, **kwargs)` builds any registered network."""
import difflib
import inspect

_BUILDERS = {}
_CONVERTERS = {}


def register_model(name, convert_state_dict=None):
    """Decorator registering a class or factory under `name` (lower-case; the paper's spelling).

    `convert_state_dict(state_dict)`, if given, maps a checkpoint's weights written by other code (e.g. the
    paper's reference implementation) to this network's names, and returns other state_dicts unchanged."""

    def decorator(builder):
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is registered twice")
        _BUILDERS[name] = builder
        if convert_state_dict is not None:
            _CONVERTERS[name] = convert_state_dict
        return builder

    return decorator


def list_models():
    return sorted(_BUILDERS)


def _builder(name):
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


def convert_state_dict(name, state_dict):
    """`state_dict` in the names of model `name`: its registered converter applied, if it has one."""
    converter = _CONVERTERS.get(name)
    return state_dict if converter is None else converter(state_dict)
