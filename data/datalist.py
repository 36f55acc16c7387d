"""Dataset lists: the MSD/decathlon dataset.json (optionally overridden by a split file), checked up front."""
import json
from pathlib import Path

from config import ConfigError

SPLITS = ("training", "validation", "test")
SHOWN = 20  # problems listed before "... and N more" (here and in the pre-flight)
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class DataConfigError(ConfigError, ValueError):
    """A data set or its description is unusable; the message names the file, key or value at fault."""


def _load_json(path, what):
    if not path.is_file():
        raise DataConfigError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise DataConfigError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(content, dict):
        raise DataConfigError(f"{what} {path} must hold a JSON object, not {type(content).__name__}")
    return content


def _data_dir(cfg):
    data_dir = Path(cfg["data"]["data_dir"]).expanduser().resolve()
    if not data_dir.is_dir():
        raise DataConfigError(f"data.data_dir not found: {data_dir}")
    return data_dir


def _labels(content, json_path):
    if "labels" not in content:
        raise DataConfigError(f"{json_path}: missing key 'labels'")
    raw = content["labels"]
    if not isinstance(raw, dict) or not raw:
        raise DataConfigError(f"{json_path}: key 'labels' must be a non-empty object {{value: name}}")
    try:
        labels = {int(k): str(v) for k, v in raw.items()}
    except ValueError:
        raise DataConfigError(f"{json_path}: key 'labels' has a non-integer label value in {list(raw)}") from None
    if sorted(labels) != list(range(len(labels))):
        raise DataConfigError(f"{json_path}: key 'labels' must number the classes 0..{len(labels) - 1}, got {sorted(labels)}")
    return labels


def _hold_out_validation(lists, fraction, source):
    """Without a validation list, take the last `fraction` of the training list (e.g. MSD tasks)."""
    if "validation" in lists or fraction is None:
        return lists
    if not 0.0 < fraction < 1.0:
        raise DataConfigError(f"data.val_fraction must be in (0, 1), got {fraction}")
    training = lists.get("training")
    if not isinstance(training, list) or len(training) < 2:
        return lists  # the checks in read_datalist report the missing or too short training list
    n_val = min(max(1, round(fraction * len(training))), len(training) - 1)
    return {**lists, "training": training[:-n_val], "validation": training[-n_val:]}


def _entry(item, data_dir, source, split, index):
    """One list entry (dict or plain image path) -> dict of absolute, existing paths."""
    if isinstance(item, str):
        item = {"image": item}
    if not isinstance(item, dict) or "image" not in item:
        raise DataConfigError(f"{source}: {split}[{index}] must be a path or an object with key 'image', got {item!r}")
    entry = {}
    for key in ("image", "label"):
        if key not in item:
            continue
        path = Path(item[key])
        path = path if path.is_absolute() else data_dir / path
        if not path.is_file():
            raise DataConfigError(f"{source}: {split}[{index}].{key} file not found: {path}")
        entry[key] = str(path.resolve())
    return entry


def read_datalist(cfg):
    """Read and check the data set description.

    Returns {"training": [...], "validation": [...], "test": [...], "labels": {int: name}}, entries being
    dicts of absolute paths {"image", "label" (if any)}. With data.split_file set, its lists replace those
    of dataset.json (labels stay those of dataset.json).
    """
    dcfg = cfg["data"]
    if dcfg.get("name") == "synthetic":
        # The phantom set is generated on first use, so a fresh checkout trains without any download.
        from .synthetic import ensure_synthetic_dataset

        ensure_synthetic_dataset(dcfg["data_dir"])
    data_dir = _data_dir(cfg)
    json_path = data_dir / dcfg["dataset_json"]
    content = _load_json(json_path, "data.dataset_json")
    labels = _labels(content, json_path)
    out_channels = cfg["model"]["out_channels"]
    if len(labels) != out_channels:
        raise DataConfigError(
            f"{json_path}: 'labels' lists {len(labels)} classes but model.out_channels is {out_channels}"
        )

    lists, source = content, json_path
    if dcfg.get("split_file"):
        split_path = Path(dcfg["split_file"]).expanduser()
        if not split_path.is_absolute() and not split_path.exists() and (PROJECT_ROOT / split_path).exists():
            split_path = PROJECT_ROOT / split_path  # the shipped configs/splits/*.json, from any directory
        split_path = split_path.resolve()
        lists, source = _load_json(split_path, "data.split_file"), split_path
    lists = _hold_out_validation(lists, dcfg.get("val_fraction"), source)

    result, problems = {}, []
    for split in SPLITS:
        if split == "test" and split not in lists:
            items = []
        elif split not in lists:
            hint = " (set data.val_fraction or data.split_file)" if split == "validation" else ""
            raise DataConfigError(f"{source}: missing key {split!r}{hint}")
        else:
            items = lists[split]
        if not isinstance(items, list):
            raise DataConfigError(f"{source}: key {split!r} must be a list")
        result[split] = []
        for i, item in enumerate(items):
            try:
                result[split].append(_entry(item, data_dir, source, split, i))
            except DataConfigError as err:  # every missing file at once, not one per run
                problems.append(str(err))
    if len(problems) == 1:
        raise DataConfigError(problems[0])
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:SHOWN])
        more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise DataConfigError(f"{len(problems)} problems in the data lists:\n{shown}{more}")
    if not result["training"]:
        raise DataConfigError(f"{source}: key 'training' is an empty list")
    unlabelled = [i for i, e in enumerate(result["training"]) if "label" not in e]
    if unlabelled:
        raise DataConfigError(f"{source}: training[{unlabelled[0]}] has no 'label'")
    result["labels"] = labels
    return result


def class_names(cfg):
    """Class names indexed by label value (index 0 is the background)."""
    labels = read_datalist(cfg)["labels"]
    return [labels[i] for i in range(len(labels))]
