"""Networks and the registry: `models.build_model(name, **kwargs)` builds any registered network."""
from . import em_net  # noqa: F401  (registers "em-net")
from .registry import build_model, list_models, model_defaults, register_model

__all__ = ["build_model", "list_models", "model_defaults", "register_model"]
