"""The configured network: built from the config's model section on a device (train, flops), or loaded
from a checkpoint for inference (test, predict), with the scan backend the config asks for. Builder and
scan-backend errors become one-line ConfigErrors naming the model."""
from pathlib import Path

import models
from blocks.selective_scan import set_scan_backend
from config import model_kwargs
from core.checkpoint import load_checkpoint, load_model_weights
from core.errors import CheckpointError, ConfigError

# Deep-supervision heads exist only in training; a model built without them has no such keys.
DEEP_SUPERVISION_PREFIX = "deep_supervision_heads."


def use_scan_backend(name):
    """Select trainer.scan_backend for every later scan; an unknown or unavailable one is a ConfigError."""
    try:
        set_scan_backend(name)
    except ValueError as err:
        raise ConfigError(f"trainer.scan_backend: {err}") from None


def build_network(cfg, **overrides):
    """cfg's network (on the CPU), its builder arguments from the model section with `overrides` on top."""
    name = cfg["model"]["name"]
    use_scan_backend(cfg["trainer"]["scan_backend"])
    try:
        return models.build_model(name, **{**model_kwargs(cfg), **overrides})
    except (ValueError, TypeError) as err:  # e.g. an EM-Net window not divisible by 32
        raise ConfigError(f"model {name!r} cannot be built from the model section: {err}") from None


def load_network(cfg, checkpoint_path, device):
    """(cfg's network without deep supervision, the checkpoint's weights loaded strictly (converted by the
    model's registered converter where they come from other code), in eval mode on `device`; the epoch and
    iteration the checkpoint was saved at, None where it does not say)."""
    checkpoint_path = Path(checkpoint_path)
    name = cfg["model"]["name"]
    overrides = {"deep_supervision": False} if "deep_supervision" in models.model_defaults(name) else {}
    model = build_network(cfg, **overrides)
    ckpt = load_checkpoint(checkpoint_path)
    state_dict = models.convert_state_dict(name, ckpt["state_dict"])
    state_dict = {k: v for k, v in state_dict.items()
                  if not k.removeprefix("module.").startswith(DEEP_SUPERVISION_PREFIX)}
    try:
        load_model_weights(model, state_dict, checkpoint_path)
    except CheckpointError as err:
        raise CheckpointError(f"{err}{_model_config_difference(ckpt.get('config'), cfg)}") from None
    return model.to(device).eval(), {"epoch": ckpt.get("epoch"), "iteration": ckpt.get("iteration")}


def _model_config_difference(saved_cfg, cfg):
    """'; the checkpoint was trained with model.x = ...' when its saved model section differs from cfg's."""
    saved = saved_cfg.get("model") if isinstance(saved_cfg, dict) else None
    if not isinstance(saved, dict):
        return ""
    ours = cfg["model"]
    keys = [k for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)]
    if not keys:
        return ""
    shown = ", ".join(f"model.{k} = {saved.get(k)!r} (here {ours.get(k)!r})" for k in keys[:5])
    return f"; the checkpoint was trained with {shown}"
