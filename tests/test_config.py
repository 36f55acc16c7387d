"""Config layering, --set parsing, validation of keys and types, the model section, saving and loading."""
import re
from pathlib import Path

import pytest
import yaml

import config
from config import ConfigError, load_config, resolve_config, save_config
from models.registry import list_models, register_model


def _net(in_channels=1, out_channels=2, roi_size=(32, 32, 32), width=8, ratio=0.5, dims=(1, 2), act=None):
    return (in_channels, out_channels, roi_size, width, ratio, dims, act)


def _needs_depth(depth, in_channels=1, out_channels=2):
    return depth


for _name, _builder in (("cfgtest-net", _net), ("cfgtest-needs-depth", _needs_depth)):
    if _name not in list_models():
        register_model(_name)(_builder)

DEFAULTS = yaml.safe_load(config.DEFAULTS_FILE.read_text())


def write(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.fixture
def files(tmp_path):
    """One YAML file per layer, each setting trainer.max_epochs (and one key of its own)."""
    data = write(tmp_path / "d.yaml", {"data": {"name": "toy"}, "trainer": {"max_epochs": 11, "seed": 11}})
    model = write(tmp_path / "m.yaml", {"model": {"name": "cfgtest-net", "width": 4}, "trainer": {"max_epochs": 12}})
    trainer = write(tmp_path / "t.yaml", {"trainer": {"max_epochs": 13, "lr": 0.5}})
    return str(data), str(model), str(trainer)


def error(**kwargs):
    with pytest.raises(ConfigError) as err:
        resolve_config(**kwargs)
    return str(err.value)


# ---------------------------------------------------------------------------------------------------- layering


def test_defaults_alone_are_the_defaults_file_plus_builder_defaults():
    cfg = resolve_config()
    for section in ("data", "trainer", "inference"):
        assert cfg[section] == DEFAULTS[section]
    assert {k: cfg["model"][k] for k in DEFAULTS["model"]} == DEFAULTS["model"]


def test_every_layer_overrides_the_one_below(files):
    data, model, trainer = files
    assert resolve_config(data)["trainer"]["max_epochs"] == 11
    assert resolve_config(data, model)["trainer"]["max_epochs"] == 12
    cfg = resolve_config(data, model, trainer)
    assert cfg["trainer"]["max_epochs"] == 13
    # keys set only in lower layers survive the upper ones (deep merge, not section replacement)
    assert cfg["trainer"]["seed"] == 11 and cfg["trainer"]["lr"] == 0.5
    assert cfg["trainer"]["optimizer"] == DEFAULTS["trainer"]["optimizer"]
    assert cfg["data"]["name"] == "toy" and cfg["model"]["width"] == 4
    cfg = resolve_config(data, model, trainer, overrides=["trainer.max_epochs=14", "trainer.max_epochs=15"])
    assert cfg["trainer"]["max_epochs"] == 15  # the last --set wins


def test_lists_are_replaced_not_merged(tmp_path):
    path = write(tmp_path / "d.yaml", {"data": {"spacing": [1.0, 1.0, 3.0]}})
    assert resolve_config(str(path), overrides=["data.spacing=[2, 2, 2]"])["data"]["spacing"] == [2.0, 2.0, 2.0]


@pytest.mark.parametrize(
    "text, value",
    [("3e-4", 3e-4), ("1E5", 1e5), ("0.1", 0.1), ("2", 2), ("true", True), ("[1,2,3]", [1, 2, 3]),
     ("null", None), ("", None), ("adamw", "adamw"), ("[1.5, 2]", [1.5, 2])],
)
def test_set_values_are_yaml(text, value):
    assert config.parse_override(f"trainer.lr={text}") == (("trainer", "lr"), value)


def test_set_values_reach_the_config_with_their_types():
    cfg = resolve_config(overrides=["trainer.lr=3e-4", "trainer.amp=false", "trainer.grad_clip=1",
                                    "model.roi_size=[64,64,32]", "inference.blend_mode=constant",
                                    "trainer.weight_decay=0"])
    assert cfg["trainer"]["lr"] == 3e-4 and cfg["trainer"]["amp"] is False
    assert cfg["trainer"]["grad_clip"] == 1 and cfg["model"]["roi_size"] == [64, 64, 32]
    assert cfg["inference"]["blend_mode"] == "constant"
    # an int given for a float default is stored as a float
    assert cfg["trainer"]["weight_decay"] == 0.0 and isinstance(cfg["trainer"]["weight_decay"], float)


@pytest.mark.parametrize("text", ["trainer.lr", "=3", "trainer..lr=1", "trainer.lr=[1,"])
def test_malformed_set_is_an_error(text):
    assert "--set" in error(overrides=[text])


# ---------------------------------------------------------------------------------------------------- files


def test_bare_names_resolve_under_configs_and_paths_are_taken_as_is(tmp_path, monkeypatch):
    root = tmp_path / "configs"
    write(root / "datasets" / "toy.yaml", {"data": {"name": "toy"}})
    write(root / "datasets" / "other.yaml", {"data": {"name": "other"}})
    monkeypatch.setattr(config.layering, "CONFIG_DIR", root)
    work = tmp_path / "work"
    write(work / "toy.yaml", {"data": {"name": "from-cwd"}})
    write(work / "sub" / "toy", {"data": {"name": "from-subdir"}})
    monkeypatch.chdir(work)
    assert resolve_config("toy")["data"]["name"] == "toy"  # the name, not ./toy.yaml
    assert resolve_config("toy.yaml")["data"]["name"] == "from-cwd"
    assert resolve_config("sub/toy")["data"]["name"] == "from-subdir"
    message = error(data_config="toyy")
    assert str(root / "datasets" / "toyy.yaml") in message
    assert "available datasets: other, toy" in message
    assert "missing.yaml" in error(data_config="missing.yaml")


def test_config_names_are_relative_to_the_repo_not_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config.config_path("models", "em_net") == config.ROOT / "configs" / "models" / "em_net.yaml"


def test_bad_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "trainer:\n  lr: 0.1\n  max_epochs: [1, 2\n")
    message = error(trainer_config=str(path))
    assert str(path) in message and re.search(r"line \d+", message)
    top = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    assert "expected a mapping" in error(trainer_config=str(top))


def test_empty_file_is_an_empty_layer(tmp_path):
    assert resolve_config(str(write(tmp_path / "e.yaml", "")))["trainer"] == DEFAULTS["trainer"]


# ---------------------------------------------------------------------------------------------------- validation


def test_unknown_key_names_its_file_and_the_closest_key(files, tmp_path):
    data, model, trainer = files
    path = write(tmp_path / "typo.yaml", {"trainer": {"max_epoch": 5}})
    message = error(data_config=data, trainer_config=str(path))
    assert message == f"{path}: unknown key 'trainer.max_epoch'; did you mean 'trainer.max_epochs'?"
    # the layer that introduced the key is named, even when it is a lower one
    path = write(tmp_path / "d2.yaml", {"inference": {"overlapp": 0.5}})
    assert error(data_config=str(path), trainer_config=trainer).startswith(f"{path}: unknown key 'inference.overlapp'")
    message = error(overrides=["trainer.lrr=1"])
    assert message == "--set: unknown key 'trainer.lrr'; did you mean 'trainer.lr'?"


def test_unknown_section_and_key_without_close_match_list_the_valid_ones(tmp_path):
    path = write(tmp_path / "s.yaml", {"trainr": {"lr": 1.0}})
    assert error(trainer_config=str(path)) == f"{path}: unknown section 'trainr'; did you mean 'trainer'?"
    message = error(overrides=["inference.zzz=1"])
    valid = ", ".join(f"inference.{k}" for k in DEFAULTS["inference"])
    assert message == f"--set: unknown key 'inference.zzz'; valid: {valid}"
    assert "section 'trainer' must be a mapping" in error(overrides=["trainer=3"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trainer.lr=abc", "trainer.lr = 'abc' (str), expected a number"),
        ("trainer.lr=true", "trainer.lr = True (bool), expected a number"),
        ("trainer.max_epochs=2.5", "trainer.max_epochs = 2.5 (float), expected an integer"),
        ("trainer.max_epochs=true", "trainer.max_epochs = True (bool), expected an integer"),
        ("trainer.amp=1", "trainer.amp = 1 (int), expected true or false"),
        ("trainer.optimizer=3", "trainer.optimizer = 3 (int), expected a string"),
        ("model.roi_size=[64,64.5,64]", "model.roi_size = [64, 64.5, 64] (list), expected a list of integers"),
        ("model.roi_size=64", "model.roi_size = 64 (int), expected a list of integers"),
        ("data.spacing=[1,a,2]", "data.spacing = [1, 'a', 2] (list), expected a list of numbers"),
        ("trainer.lr=null", "trainer.lr = null, expected a number (null is allowed only where the default is null)"),
        ("trainer.lr.x=1", "trainer.lr = {'x': 1} (dict), expected a number"),
    ],
)
def test_type_errors_name_key_value_expected_type_and_source(override, expected):
    assert error(overrides=[override]) == f"--set: {expected}"


def test_type_error_names_the_file(tmp_path):
    path = write(tmp_path / "t.yaml", "trainer:\n  lr: fast\n")
    assert error(trainer_config=str(path)) == f"{path}: trainer.lr = 'fast' (str), expected a number"


def test_numbers_lists_and_null_defaults():
    cfg = resolve_config(overrides=["data.spacing=[1, 2, 3]", "trainer.grad_clip=0.5", "data.split_file=s.json"])
    assert cfg["data"]["spacing"] == [1.0, 2.0, 3.0] and all(isinstance(v, float) for v in cfg["data"]["spacing"])
    assert cfg["trainer"]["grad_clip"] == 0.5 and cfg["data"]["split_file"] == "s.json"
    cfg = resolve_config(overrides=["trainer.grad_clip=null", "trainer.deep_supervision_weights=[1, 0]"])
    assert cfg["trainer"]["grad_clip"] is None and cfg["trainer"]["deep_supervision_weights"] == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------------- model section


def test_model_section_is_filled_with_builder_defaults_in_signature_order(files):
    data, model, trainer = files
    cfg = resolve_config(data, model, trainer, overrides=["model.ratio=1"])
    assert cfg["model"] == {
        "name": "cfgtest-net", "in_channels": 1, "out_channels": 9, "roi_size": [128, 128, 128],
        "width": 4, "ratio": 1.0, "dims": [1, 2], "act": None,
    }
    assert list(cfg["model"]) == ["name", "in_channels", "out_channels", "roi_size", "width", "ratio", "dims", "act"]
    assert config.model_kwargs(cfg) == {k: v for k, v in cfg["model"].items() if k != "name"}


def test_model_keys_are_checked_against_the_builder(files, tmp_path):
    data, model, trainer = files
    path = write(tmp_path / "typo.yaml", {"model": {"name": "cfgtest-net", "widht": 3}})
    assert error(model_config=str(path)) == f"{path}: unknown key 'model.widht'; did you mean 'model.width'?"
    # em-net's arguments are not valid for another model
    assert "unknown key 'model.depths'" in error(model_config=model, overrides=["model.depths=[1,1,1,1]"])
    assert error(model_config=model, overrides=["model.width=wide"]) == (
        "--set: model.width = 'wide' (str), expected an integer")
    assert "expected a list of integers" in error(model_config=model, overrides=["model.dims=[1.5]"])
    # a null builder default accepts any value
    assert resolve_config(model_config=model, overrides=["model.act=[relu, {}]"])["model"]["act"] == ["relu", {}]


def test_unknown_model_name_names_the_source_and_a_suggestion(tmp_path):
    path = write(tmp_path / "m.yaml", {"model": {"name": "cfgtest-nett"}})
    message = error(model_config=str(path))
    assert message.startswith(f"{path}: model.name = 'cfgtest-nett': unknown model 'cfgtest-nett'; did you mean "
                              "'cfgtest-net'?")
    assert "model.name must be a string" in error(overrides=["model.name=3"])


def test_required_builder_argument(tmp_path):
    path = write(tmp_path / "m.yaml", {"model": {"name": "cfgtest-needs-depth"}})
    message = error(model_config=str(path))
    assert message == f"model 'cfgtest-needs-depth' needs model.depth, which no config sets (model.name from {path})"
    cfg = resolve_config(model_config=str(path), overrides=["model.depth=[2, 2]"])
    assert cfg["model"]["depth"] == [2, 2]
    # roi_size comes from defaults.yaml and stays in the config, but is not passed to a builder without it
    assert cfg["model"]["roi_size"] == DEFAULTS["model"]["roi_size"]
    assert config.model_kwargs(cfg) == {"depth": [2, 2], "in_channels": 1, "out_channels": 9}


def test_em_net_config_lists_every_effective_argument():
    cfg = resolve_config(model_config="em_net")
    assert cfg["model"]["name"] == "em-net"
    for key in ("feature_size", "depths", "fft_nums", "hidden_size", "roi_size", "deep_supervision"):
        assert key in cfg["model"]


# ---------------------------------------------------------------------------------- save / load / run dir


def test_save_load_round_trip(files, tmp_path):
    cfg = resolve_config(*files, overrides=["trainer.lr=3e-4", "model.act=gelu"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]  # no temp file left behind
    assert yaml.safe_load(path.read_text()) == cfg
    assert "roi_size: [128, 128, 128]" in path.read_text()  # short lists stay on one line
    assert load_config(path) == cfg
    more = load_config(path, ["trainer.max_epochs=19"])
    assert more["trainer"]["max_epochs"] == 19 and more["model"] == cfg["model"]
    save_config(more, path)  # overwriting in place
    assert load_config(path)["trainer"]["max_epochs"] == 19


def test_load_config_validates_again(tmp_path):
    path = write(tmp_path / "config.yaml", {"trainer": {"lr": 0.1, "epochs": 3}})
    with pytest.raises(ConfigError, match=re.escape(f"{path}: unknown key 'trainer.epochs'")):
        load_config(path)
    path = write(tmp_path / "broken.yaml", "trainer: {lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml, line \d+: invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="nothere.yaml not found"):
        load_config(tmp_path / "nothere.yaml")


# ---------------------------------------------------------------------------------------------------- value rules

# One value outside its allowed range, length or choices for every key of configs/defaults.yaml.
BAD_VALUES = {
    "data.name": "''", "data.data_dir": "''", "data.dataset_json": "' '", "data.split_file": "5",
    "data.val_fraction": "abc", "data.spacing": "[2.0, 2.0]", "data.orientation": "XYZ",
    "data.normalization": "minmax", "data.intensity_range": "[250.0, -175.0]", "data.intensity_mean": "'mid'",
    "data.intensity_std": "0.0", "data.crop_foreground": "maybe", "data.num_samples": "0",
    "data.crop_sampling": "random", "data.pos": "-1.0", "data.neg": "-0.5", "data.flip_prob": "1.5",
    "data.rot90_prob": "-0.1", "data.rot90_max_k": "4", "data.intensity_scale": "-0.1",
    "data.intensity_shift": "-1.0", "data.intensity_prob": "2.0", "data.cache_rate": "1.1",
    "data.num_workers": "-1", "data.check_intensities": "1", "data.fingerprint": "''",
    "data.fingerprint_sha256": "'abc'",
    "model.name": "''", "model.in_channels": "0", "model.out_channels": "1", "model.roi_size": "[32, 32]",
    "trainer.optimizer": "adam", "trainer.lr": "0.0", "trainer.weight_decay": "-0.01", "trainer.momentum": "1.0",
    "trainer.nesterov": "'yes'", "trainer.max_epochs": "0", "trainer.iters_per_epoch": "0",
    "trainer.warmup_epochs": "-1", "trainer.batch_size": "0", "trainer.amp": "2", "trainer.val_every": "0",
    "trainer.deep_supervision_weights": "[1.0, -1.0]", "trainer.grad_clip": "0.0",
    "trainer.max_nonfinite_steps": "0", "trainer.sync_batchnorm": "null", "trainer.seed": "-1",
    "trainer.device": "tpu", "trainer.scan_backend": "warp",
    "inference.split": "train", "inference.val_overlap": "1.0", "inference.overlap": "-0.1",
    "inference.blend_mode": "linear", "inference.sw_batch_size": "0", "inference.mirror": "'no'",
    "inference.save_predictions": "[]", "inference.save_overlays": "0",
}


def test_every_default_key_has_a_bad_value_here():
    keys = {f"{section}.{key}" for section, values in DEFAULTS.items() for key in values}
    assert keys == set(BAD_VALUES)


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_a_bad_value_of_any_key_is_one_line_naming_the_key_and_its_source(key):
    message = error(overrides=[f"{key}={BAD_VALUES[key]}"])
    assert "\n" not in message and message.startswith("--set: ") and f"{key} = " in message, message


@pytest.mark.parametrize("value, reason", [
    ("data.spacing: [2.0, 2.0]", "data.spacing = [2.0, 2.0]: must have 3 values, got 2"),
    ("data.intensity_range: [250, -175]",
     "data.intensity_range = [250.0, -175.0]: must be [low, high] with low < high"),
    ("data.orientation: XYZ", "data.orientation = 'XYZ': must be 3 letters, one of L/R, one of A/P and one of S/I"),
    ("data.num_samples: 0", "data.num_samples = 0: must be at least 1"),
    ("data.split_file: 5", "data.split_file = 5: must be a non-empty text"),
    ("data.val_fraction: abc", "data.val_fraction = 'abc': must be a number"),
    ("data.num_workers: -1", "data.num_workers = -1: must be at least 0"),
])
def test_the_reported_values_are_refused_when_the_config_is_loaded_naming_the_file(tmp_path, value, reason):
    section, rest = value.split(".", 1)
    path = write(tmp_path / "d.yaml", f"{section}:\n  {rest}\n")
    assert error(data_config=str(path)).startswith(f"{path}: {reason}")


def test_every_scan_backend_is_a_valid_setting_and_nothing_else():
    from blocks.selective_scan import BACKENDS
    from config.rules import SCAN_BACKENDS

    assert ("auto", *BACKENDS) == SCAN_BACKENDS


def test_ct_normalization_needs_the_foreground_mean_and_std():
    message = error(overrides=["data.normalization=ct", "data.intensity_mean=40.0"])
    assert message == ("data.intensity_std = None (configs/defaults.yaml) and data.normalization = 'ct' (--set): ct "
                       "normalization needs the foreground mean and std")
    cfg = resolve_config(overrides=["data.normalization=ct", "data.intensity_mean=40", "data.intensity_std=25"])
    assert cfg["data"]["intensity_mean"] == 40 and cfg["data"]["normalization"] == "ct"


def test_values_that_clash_name_both_keys_and_their_files(files):
    data, model, trainer = files
    message = error(data_config=data, trainer_config=trainer, overrides=["trainer.warmup_epochs=20"])
    assert message == (f"trainer.warmup_epochs = 20 (--set) and trainer.max_epochs = 13 ({trainer}): the warmup "
                       "must not be longer than the training")
