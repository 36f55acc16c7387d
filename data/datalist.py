"""Dataset lists: the MSD/decathlon dataset.json (optionally overridden by a split file), checked up front."""
import json
from pathlib import Path

from core.errors import DataConfigError

SPLITS = ("training", "validation", "test")
SHOWN = 20  # problems listed before "... and N more" (here and in the pre-flight)
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def load_json(path, what):
    """The JSON object in `path`; a missing file, invalid JSON or another value is a DataConfigError naming `what`."""
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


def _data_dir(data):
    data_dir = Path(data["data_dir"]).expanduser().resolve()
    if not data_dir.is_dir():
        raise DataConfigError(f"data.data_dir not found: {data_dir}")
    return data_dir


def parse_labels(content, json_path):
    """{class value: name} from a dataset.json's 'labels', numbered 0..n-1."""
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
        raise DataConfigError(f"{json_path}: key 'labels' must number the classes 0..{len(labels) - 1}, "
                              f"got {sorted(labels)}")
    return labels


def hold_out_validation(lists, fraction):
    """Without a validation list, take the last `fraction` of the training list (e.g. MSD tasks)."""
    if "validation" in lists or fraction is None:
        return lists
    training = lists.get("training")
    if not isinstance(training, list) or len(training) < 2:
        return lists  # the checks in read_datalist report the missing or too short training list
    n_val = min(max(1, round(fraction * len(training))), len(training) - 1)
    return {**lists, "training": training[:-n_val], "validation": training[-n_val:]}


def _entry(item, data_dir, source, split, index, problems):
    """One list entry (dict or plain image path) -> dict of absolute paths; a missing file is added to
    `problems` (and its entry still returned, so that every other check can run)."""
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
            problems.append((f"{split}[{index}]", f"{key} file not found: {path}"))
        entry[key] = str(path.resolve())
    return entry


def _dataset_json(data, num_classes):
    """(path, content, labels) of the dataset.json; its class count must be num_classes."""
    json_path = _data_dir(data) / data["dataset_json"]
    content = load_json(json_path, "data.dataset_json")
    labels = parse_labels(content, json_path)
    if len(labels) != num_classes:
        raise DataConfigError(f"{json_path}: 'labels' lists {len(labels)} classes but model.out_channels is "
                              f"{num_classes}")
    return json_path, content, labels


def _lists(data, json_path, content):
    """(lists, source path): the split file's lists if one is set, else the dataset.json's."""
    lists, source = content, json_path
    if data["split_file"]:
        split_path = Path(data["split_file"]).expanduser()
        if not split_path.is_absolute() and not split_path.exists() and (PROJECT_ROOT / split_path).exists():
            split_path = PROJECT_ROOT / split_path  # the shipped configs/splits/*.json, from any directory
        split_path = split_path.resolve()
        lists, source = load_json(split_path, "data.split_file"), split_path
    return hold_out_validation(lists, data["val_fraction"]), source


def collect_datalist(data, num_classes):
    """(lists, problems, source): the data set description read and checked; `problems` are the missing
    files as (where, reason), listed rather than raised so that the pre-flight reports them with the rest.
    Structural faults (a missing key, a class count that differs from num_classes) raise DataConfigError."""
    json_path, content, labels = _dataset_json(data, num_classes)
    lists, source = _lists(data, json_path, content)
    result, problems = {}, []
    for split in SPLITS:
        if split not in lists and split != "test":
            hint = " (set data.val_fraction or data.split_file)" if split == "validation" else ""
            raise DataConfigError(f"{source}: missing key {split!r}{hint}")
        items = lists.get(split, [])
        if not isinstance(items, list):
            raise DataConfigError(f"{source}: key {split!r} must be a list")
        data_dir = json_path.parent
        result[split] = [_entry(item, data_dir, source, split, i, problems) for i, item in enumerate(items)]
    if not result["training"]:
        raise DataConfigError(f"{source}: key 'training' is an empty list")
    unlabelled = [i for i, e in enumerate(result["training"]) if "label" not in e]
    if unlabelled:
        raise DataConfigError(f"{source}: training[{unlabelled[0]}] has no 'label'")
    result["labels"] = labels
    return result, problems, source


def problem_report(problems, what):
    """One DataConfigError listing (where, reason) problems, up to SHOWN of them."""
    lines = [f"  {where}: {reason}" for where, reason in problems[:SHOWN]]
    if len(problems) > SHOWN:
        lines.append(f"  ... and {len(problems) - SHOWN} more")
    return DataConfigError(f"{what} found {len(problems)} problem(s):\n" + "\n".join(lines))


def read_datalist(data, num_classes):
    """Read and check the data set description of the `data` config section.

    Returns {"training": [...], "validation": [...], "test": [...], "labels": {int: name}}, entries being
    dicts of absolute paths {"image", "label" (if any)}. With data.split_file set, its lists replace those
    of dataset.json (labels stay those of dataset.json). Every missing file is reported at once.
    """
    result, problems, source = collect_datalist(data, num_classes)
    if problems:
        raise problem_report(problems, f"the data lists of {source}")
    return result


def class_names(data, num_classes):
    """Class names indexed by label value (index 0 is the background)."""
    labels = _dataset_json(data, num_classes)[2]
    return [labels[i] for i in range(len(labels))]
