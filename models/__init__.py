"""Every network by name: `models.build_model(name, **kwargs)` builds EM-Net or any baseline."""
from . import baselines, em_net  # noqa: F401  (they register their networks)
from .registry import build_model, convert_state_dict, list_models, model_defaults, register_model, window_rule

__all__ = ["build_model", "convert_state_dict", "list_models", "model_defaults", "register_model", "window_rule"]
