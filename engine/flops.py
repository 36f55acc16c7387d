"""`main.py flops`: parameters, FLOPs and MACs of configured models (models.complexity counts one forward
pass), alone or for every registered model in one table (flops.csv and flops.md)."""
import csv
import gc
import importlib.util
from pathlib import Path

import torch

import config
import models
from core import fileio
from core.distributed import resolve_device
from core.errors import ConfigError
from engine.network import build_network
from models import complexity

CALFLOPS_INSTALL = "pip install -r requirements-flops.txt"
# {version}: the torchvision pip chose for this torch. The +cpu label makes pip replace the installed build
# (for ==version alone it answers "already satisfied"); --no-deps keeps the torch that is there.
TORCHVISION_CPU_INSTALL = ("pip install torchvision=={version}+cpu --no-deps "
                           "--index-url https://download.pytorch.org/whl/cpu")

# Columns of the `flops --all` table: (key in a result row, heading, formatter of the raw number).
TABLE_COLUMNS = (
    ("params", "params", lambda v: f"{v:,}"),
    ("flops", "GFLOPs", lambda v: f"{v / 1e9:.2f}"),
    ("scan_flops", "of which scans", lambda v: f"{v / 1e9:.2f}"),
    ("macs", "GMACs", lambda v: f"{v / 1e9:.2f}"),
    ("calflops_flops", "calflops GFLOPs", lambda v: f"{v / 1e9:.2f}"),
    ("calflops_macs", "calflops GMACs", lambda v: f"{v / 1e9:.2f}"),
)


def count_flops(cfg, counter="ours"):
    """Parameters, forward FLOPs and MACs at (1, in_channels, *roi_size) on trainer.device
    (models.complexity says what is counted); with counter "calflops", calflops' FLOPs and MACs too."""
    device = resolve_device(cfg["trainer"]["device"])
    model = build_network(cfg).to(device).eval()
    x = torch.zeros(1, cfg["model"]["in_channels"], *cfg["model"]["roi_size"], device=device)
    result = complexity.count_flops(model, x)
    if counter == "calflops":
        result.update(complexity.calflops_counts(model, x))
    return result


def check_counter(counter):
    """A ConfigError saying how to install what `counter` needs, when it does not import here."""
    if counter != "calflops":
        return
    # calflops imports timm, which needs torchvision. pip's torchvision is built for the CUDA torch and fails
    # to import beside torch+cpu with a RuntimeError, which no reinstall of calflops mends.
    if importlib.util.find_spec("torchvision") is not None:
        try:
            import torchvision  # noqa: F401
        except Exception as err:  # noqa: BLE001  (a RuntimeError from its operator registrations)
            from importlib.metadata import version

            installed = version("torchvision").split("+")[0]  # no local build label (+cu128)
            raise ConfigError(f"--counter calflops: calflops imports timm, which needs torchvision, and torchvision "
                              f"{installed} does not load with torch {torch.__version__} ({type(err).__name__}: "
                              f"{err}); with a CPU-only torch, install torchvision's CPU build: "
                              f"{TORCHVISION_CPU_INSTALL.format(version=installed)}") from None
    try:
        import calflops  # noqa: F401
    except Exception as err:  # noqa: BLE001  (missing, or a broken dependency)
        raise ConfigError(f"--counter calflops needs calflops and transformers, which do not import here "
                          f"({type(err).__name__}: {err}); install them with: {CALFLOPS_INSTALL}") from None


def count_all(data_config, trainer_config, overrides, counter="ours"):
    """One row per registered model, each from configs/models/<name>.yaml ('-' read as '_') at the data
    config's window; a model that cannot be built or counted gets a row saying why instead of stopping."""
    rows = []
    for name in models.list_models():
        model_config = config.CONFIG_DIR / "models" / f"{name.replace('-', '_')}.yaml"
        row = {"model": name}
        if not model_config.is_file():
            row["note"] = f"no config {model_config.relative_to(config.ROOT)}"
        else:
            try:
                cfg = config.resolve_config(data_config, str(model_config), trainer_config, overrides)
                row.update(count_flops(cfg, counter))
            except Exception as err:  # noqa: BLE001  (the table reports any failure of one model and goes on)
                reason = (str(err).strip().splitlines() or [""])[0]
                row["note"] = f"{type(err).__name__}: {reason}"[:300]
        rows.append(row)
        gc.collect()  # the next model must not share memory with this one's leftovers
    return rows


def table_columns(rows):
    """The columns some row has a value for, in TABLE_COLUMNS order."""
    return [c for c in TABLE_COLUMNS if any(c[0] in row for row in rows)]


def format_markdown_table(rows):
    """A Markdown table of `rows` ({"model", numbers..., "note"}); a row without numbers shows its note."""
    columns = table_columns(rows)
    lines = ["| model | " + " | ".join(heading for _, heading, _ in columns) + " | note |",
             "|---|" + "---:|" * len(columns) + "---|"]
    for row in rows:
        cells = [fmt(row[key]) if key in row else "-" for key, _, fmt in columns]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + f" | {row.get('note', '')} |")
    return "\n".join(lines)


def write_tables(rows, out_dir, title):
    """flops.csv (raw integer counts, an empty cell where a model could not be counted) and flops.md."""
    out_dir = Path(out_dir)
    keys = ["model", *(key for key, _, _ in table_columns(rows)), "note"]
    with fileio.atomic_path(out_dir / "flops.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows({key: row.get(key, "") for key in keys} for row in rows)
    with fileio.atomic_path(out_dir / "flops.md") as tmp, open(tmp, "w") as f:
        f.write(f"{title}\n\n{format_markdown_table(rows)}\n")
    return out_dir / "flops.csv", out_dir / "flops.md"
