"""Command line: parse, build the config, dispatch to train.py / test.py. No training or evaluation logic here.

    python main.py                      # the main job: synthetic data, tiny EM-Net, train then test
    python main.py train --data_config synapse --model_config em_net --trainer_config sgd --set trainer.max_epochs=5
    python main.py train --resume runs/em-net_synapse/20240101-120000 --set trainer.max_epochs=400
    python main.py test --checkpoint runs/em-net_synapse/20240101-120000/checkpoint_best.pt
    python main.py test --checkpoint runs/em-net_synapse/20240101-120000   # best and latest, side by side
    python main.py predict --checkpoint CKPT --input scan.nii.gz --output preds/
    python main.py flops --model_config em_net
    python main.py prepare synapse --raw ~/Downloads/Abdomen     # the unpacked BTCV archive -> datasets/Synapse
"""
import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import config
import fileio
from config import ConfigError

# Config names used when a --*_config flag is left out (the main job's configs).
DEFAULT_CONFIGS = {"data_config": "synthetic", "model_config": "em_net_tiny", "trainer_config": "synthetic"}
CONFIG_FLAGS = tuple(DEFAULT_CONFIGS)


def _config_options():
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("configuration (layers: configs/defaults.yaml < data < model < trainer < --set)")
    group.add_argument("--data_config", metavar="NAME|PATH",
                       help=f"dataset config: a name in configs/datasets/ or a YAML path "
                            f"(default: {DEFAULT_CONFIGS['data_config']})")
    group.add_argument("--model_config", metavar="NAME|PATH",
                       help=f"model config: a name in configs/models/ or a YAML path "
                            f"(default: {DEFAULT_CONFIGS['model_config']})")
    group.add_argument("--trainer_config", metavar="NAME|PATH",
                       help=f"trainer config: a name in configs/trainers/ or a YAML path "
                            f"(default: {DEFAULT_CONFIGS['trainer_config']})")
    group.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one key, e.g. --set trainer.lr=1e-3 --set model.roi_size=[96,96,96]; "
                            "values are YAML (numbers, true/false, null, lists); repeatable")
    return parent


def build_parser():
    shared = _config_options()
    parser = argparse.ArgumentParser(
        prog="main.py",
        description="EM-Net 3D medical image segmentation. Without a command: the main job "
                    "(synthetic data, em_net_tiny, train, then evaluate the best checkpoint on the test split).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `main.py COMMAND --help` for the options of one command.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of every error (anywhere on the line, with any command)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", parents=[shared], help="the main job: train, then test the best checkpoint",
                              description="Train, then evaluate the best checkpoint on the test split. "
                                          "With the synthetic data set, it is generated first if missing.")
    run.add_argument("--logdir", metavar="DIR", help="run folder (default: runs/<model>_<data>/<timestamp>)")
    run.add_argument("--overwrite", action="store_true", help="replace the run already in --logdir")

    train = commands.add_parser("train", parents=[shared], help="train a model",
                                description="Train a model; the run folder gets config.yaml, train.log, "
                                            "TensorBoard events and the checkpoints.")
    train.add_argument("--logdir", metavar="DIR",
                       help="run folder (default: runs/<model>_<data>/<timestamp>); one that holds a checkpoint "
                            "is refused unless --overwrite")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --logdir (its checkpoints, log and events)")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue the run in RUN_DIR from its checkpoint_latest.pt, with its config.yaml "
                            "(plus --set on top, e.g. --set trainer.max_epochs=400)")

    test = commands.add_parser("test", parents=[shared], help="evaluate a checkpoint on the test split",
                               description="Evaluate a checkpoint on the test split: metrics.csv, summary.json, "
                                           "predictions and overlays. Without --*_config flags, the config.yaml "
                                           "next to the checkpoint is used (with --set on top).")
    test.add_argument("--checkpoint", metavar="PATH", required=True,
                      help="checkpoint to evaluate, or a run folder: then its checkpoint_best.pt and "
                           "checkpoint_latest.pt, printed side by side")
    test.add_argument("--output", metavar="DIR",
                      help="output folder (default: <checkpoint folder>/eval/<checkpoint name>; for a run "
                           "folder <run folder>/eval, one subfolder per checkpoint)")

    predict = commands.add_parser("predict", parents=[shared], help="segment new images with a checkpoint",
                                  description="Segment images without labels. Without --*_config flags, the "
                                              "config.yaml next to the checkpoint is used (with --set on top).")
    predict.add_argument("--checkpoint", metavar="PATH", required=True, help="checkpoint to use")
    predict.add_argument("--input", dest="inputs", action="append", required=True, metavar="PATH",
                         help="a NIfTI image, or a folder of them (*.nii, *.nii.gz); repeatable")
    predict.add_argument("--output", metavar="DIR",
                         help="output folder (default: <checkpoint folder>/predict/<checkpoint name>)")

    flops = commands.add_parser("flops", parents=[shared], help="count parameters, FLOPs and MACs of the model",
                                description="Build the model from the config and count parameters, FLOPs and "
                                            "MACs of one forward pass at (1, in_channels, *roi_size). With --all, "
                                            "every registered model, each from configs/models/<name>.yaml at the "
                                            "dataset config's window, in one table.")
    flops.add_argument("--all", dest="all_models", action="store_true",
                       help="count every registered model (configs/models/<name>.yaml, '-' read as '_'); "
                            "writes flops.csv and flops.md to --output")
    flops.add_argument("--counter", choices=("ours", "calflops"), default="ours",
                       help="ours: torch's FlopCounterMode plus the selective scans (models/complexity.py); "
                            "calflops: also calflops' figures beside ours (pip install -r requirements-flops.txt)")
    flops.add_argument("--output", metavar="DIR",
                       help="with --all: folder for flops.csv and flops.md "
                            "(default: runs/flops/<dataset>_<window>, e.g. runs/flops/synapse_128x128x128)")

    prepare = commands.add_parser("prepare", help="build a data set folder from a downloaded archive",
                                  description="Check every case of a downloaded archive and build the decathlon "
                                              "folder the dataset configs read: synapse and btcv from the BTCV "
                                              "abdomen archive (RawData.zip), msd from a Decathlon task folder.")
    prepare.add_argument("dataset", choices=("synapse", "btcv", "msd"), help="protocol to prepare")
    prepare.add_argument("--raw", metavar="DIR", required=True,
                         help="synapse/btcv: the unpacked archive (its root, RawData or RawData/Training); "
                              "msd: the task folder, e.g. Task09_Spleen")
    prepare.add_argument("--out", metavar="FOLDER",
                         help="output folder (default: data.data_dir of the dataset config, e.g. datasets/Synapse)")
    prepare.add_argument("--labels", choices=("standard", "btcv8"), default="standard",
                         help="synapse only: standard = the 8 organs of TransUNet and the paper's table "
                              "(pancreas); btcv8 = BTCV labels 1-8 as the reference's dataset.json (esophagus)")
    prepare.add_argument("--val_fraction", type=float, metavar="F",
                         help="msd only, without a validation list: hold out this fraction of the training cases "
                              "(default: the matching dataset config's data.val_fraction, else 0.2)")
    prepare.add_argument("--force", action="store_true", help="replace an existing output folder")
    return parser


def cli(argv=None, default_command="run"):
    """Parse `argv` and run the command; without a command `default_command` runs. User errors (config, data,
    checkpoint, device, unwritable or full output locations) print one line to stderr and exit with status 2;
    a run stopped by SIGINT/SIGTERM exits 128 + the signal, one diverged (non-finite) 1. Genuine bugs keep
    their traceback; --debug (anywhere on the line) shows it for every error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    known = {"run", "train", "test", "predict", "flops", "prepare", "-h", "--help"}
    if not argv or argv[0] not in known:
        argv = [default_command, *argv]
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except BaseException as err:
        code = None if debug else _user_error_exit_code(err)
        if code is None:
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one message for the job
            print(f"error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(code) from None


def _one_line(err):
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    reason = fileio.location_error(err)
    if isinstance(err, OSError) and not isinstance(err, fileio.OutputError) and reason:
        return f"{reason}: {err.filename or err}"
    return str(err) or type(err).__name__


def _user_error_exit_code(err):
    """The exit status of an error the user can fix (printed as one line), or None for a bug."""
    if isinstance(err, ConfigError):
        return 2
    if isinstance(err, KeyboardInterrupt):
        return 130
    code = getattr(err, "exit_code", None)  # CheckpointError, OutputError, train's interruptions
    if isinstance(code, int):
        return code
    if isinstance(err, OSError) and fileio.location_error(err):  # e.g. disk full while writing results
        return 2
    return None


# --------------------------------------------------------------------------------------------------------- commands


def _flags_given(args):
    return any(getattr(args, flag) is not None for flag in CONFIG_FLAGS)


def _resolve(args):
    names = {flag: getattr(args, flag) or DEFAULT_CONFIGS[flag] for flag in CONFIG_FLAGS}
    return config.resolve_config(**names, overrides=args.overrides)


def _checkpoint_config(args):
    """Config for test/predict: the flags if any, else the config.yaml saved next to the checkpoint."""
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise ConfigError(f"checkpoint {checkpoint} not found")
    if _flags_given(args):
        return _resolve(args), checkpoint
    saved = checkpoint.parent / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"{saved} not found; pass --data_config/--model_config/--trainer_config for {checkpoint}")
    return config.load_config(saved, args.overrides), checkpoint


def cmd_train(args):
    if args.resume is not None:
        if _flags_given(args):
            raise ConfigError("--resume uses RUN_DIR/config.yaml; change it with --set, not --*_config flags")
        folder = Path(args.resume)
        if not (folder / "config.yaml").is_file():
            raise ConfigError(f"--resume {folder}: no config.yaml there (not a run folder?)")
        if not (folder / "checkpoint_latest.pt").is_file():
            raise ConfigError(f"--resume {folder}: no checkpoint_latest.pt there")
        if args.logdir is not None:
            raise ConfigError("--resume continues in RUN_DIR; leave out --logdir")
        if args.overwrite:
            raise ConfigError("--overwrite starts a run afresh; it cannot go with --resume")
        cfg, resume = config.load_config(folder / "config.yaml", args.overrides), folder
    else:
        cfg, resume = _resolve(args), None
        folder = config.run_dir(cfg, args.logdir, overwrite=args.overwrite)
    # train.run saves the effective config as <folder>/config.yaml (with a resume: the one with --set applied)
    result = importlib.import_module("train").run(cfg, folder, resume=resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary for the job
        _print_checkpoints(result)
    return result


def _print_checkpoints(result):
    if result["best_checkpoint"] is not None:
        print(f"best checkpoint:   {result['best_checkpoint']} (validation metric {result['best_metric']:.4f})")
    print(f"latest checkpoint: {result['latest_checkpoint']}")


def _eval_dir(checkpoint, output, kind):
    return Path(output) if output else checkpoint.parent / kind / checkpoint.stem


def cmd_test(args):
    if Path(args.checkpoint).is_dir():
        return _test_run_folder(args)
    cfg, checkpoint = _checkpoint_config(args)
    out_dir = _eval_dir(checkpoint, args.output, "eval")
    fileio.check_writable(out_dir)  # before inference, not after it
    return importlib.import_module("test").evaluate(cfg, checkpoint, out_dir)


def _test_run_folder(args):
    """test --checkpoint RUN_DIR: its best and latest checkpoints, side by side."""
    folder = Path(args.checkpoint)
    if _flags_given(args):
        cfg = _resolve(args)
    elif (folder / "config.yaml").is_file():
        cfg = config.load_config(folder / "config.yaml", args.overrides)
    else:
        raise ConfigError(f"{folder / 'config.yaml'} not found; pass --data_config/--model_config/--trainer_config")
    return importlib.import_module("test").evaluate_run(cfg, folder, args.output)


def cmd_predict(args):
    cfg, checkpoint = _checkpoint_config(args)
    out_dir = _eval_dir(checkpoint, args.output, "predict")
    fileio.check_writable(out_dir)
    written = importlib.import_module("test").predict(cfg, checkpoint, [Path(p) for p in args.inputs], out_dir)
    for path in written:
        print(path)
    return written


def count_flops(cfg, counter="ours"):
    """Parameters, forward FLOPs and MACs at (1, in_channels, *roi_size) on trainer.device
    (models.complexity says what is counted); with counter "calflops", calflops' FLOPs and MACs too."""
    import torch

    import models
    from models import complexity, selective_scan

    device = cfg["trainer"]["device"]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    try:
        selective_scan.set_scan_backend(cfg["trainer"]["scan_backend"])
        torch_device = torch.device(device)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"flops: {err}") from None
    model = models.build_model(cfg["model"]["name"], **config.model_kwargs(cfg)).to(torch_device).eval()
    x = torch.zeros(1, cfg["model"]["in_channels"], *cfg["model"]["roi_size"], device=torch_device)
    result = complexity.count_flops(model, x)
    if counter == "calflops":
        result.update(complexity.calflops_counts(model, x))
    return result


def _check_counter(counter):
    if counter != "calflops":
        return
    from models.complexity import CALFLOPS_INSTALL, TORCHVISION_CPU_INSTALL

    # calflops imports timm, which needs torchvision. pip's torchvision is built for the CUDA torch and fails
    # to import beside torch+cpu with a RuntimeError, which no reinstall of calflops mends.
    if importlib.util.find_spec("torchvision") is not None:
        try:
            import torchvision  # noqa: F401
        except Exception as err:  # noqa: BLE001  (a RuntimeError from its operator registrations)
            from importlib.metadata import version

            import torch

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


def cmd_flops(args):
    _check_counter(args.counter)
    if args.all_models:
        return _flops_all(args)
    cfg = _resolve(args)
    result = count_flops(cfg, args.counter)
    shape = (1, cfg["model"]["in_channels"], *cfg["model"]["roi_size"])
    print(f"model {cfg['model']['name']} at input {tuple(shape)}")
    print(f"params: {result['params']:,} ({result['params'] / 1e6:.2f} M)")
    print(f"GFLOPs: {result['flops'] / 1e9:.2f} (of which selective scans {result['scan_flops'] / 1e9:.2f})")
    print(f"GMACs:  {result['macs'] / 1e9:.2f} (convolutions and matrix products)")
    if args.counter == "calflops":
        print(f"calflops: {result['calflops_flops'] / 1e9:.2f} GFLOPs, {result['calflops_macs'] / 1e9:.2f} GMACs "
              "(no selective scans; norms and activations included)")
    return result


def _flops_all(args):
    """Count every registered model from its own config at the dataset's window; a model that cannot be
    built or counted gets a row saying why instead of stopping the table."""
    import csv
    import gc

    import models
    from models import complexity

    if args.model_config is not None:
        raise ConfigError("flops --all builds every model from configs/models/<name>.yaml; leave out --model_config")
    data_config = args.data_config or DEFAULT_CONFIGS["data_config"]
    trainer_config = args.trainer_config or DEFAULT_CONFIGS["trainer_config"]
    window = config.resolve_config(data_config, None, trainer_config, args.overrides)["model"]["roi_size"]
    window_text = "x".join(str(s) for s in window)
    out_dir = Path(args.output or Path("runs") / "flops" / f"{Path(data_config).stem}_{window_text}")
    fileio.check_writable(out_dir)
    rows = []
    for name in models.list_models():
        model_config = config.CONFIG_DIR / "models" / f"{name.replace('-', '_')}.yaml"
        row = {"model": name}
        if not model_config.is_file():
            row["note"] = f"no config {model_config.relative_to(config.ROOT)}"
        else:
            try:
                cfg = config.resolve_config(data_config, str(model_config), trainer_config, args.overrides)
                row.update(count_flops(cfg, args.counter))
            except Exception as err:  # noqa: BLE001  (the table reports any failure of one model and goes on)
                reason = (str(err).strip().splitlines() or [""])[0]
                row["note"] = f"{type(err).__name__}: {reason}"[:300]
        rows.append(row)
        gc.collect()  # the next model must not share memory with this one's leftovers
    table = complexity.format_markdown_table(rows)
    keys, records = complexity.csv_records(rows)
    with fileio.atomic_path(out_dir / "flops.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(records)
    with fileio.atomic_path(out_dir / "flops.md") as tmp, open(tmp, "w") as f:
        f.write(f"Forward pass of batch 1 at {window_text}, data config {data_config}\n\n{table}\n")
    print(f"Forward pass of batch 1 at {window_text} (data config {data_config})")
    print(table)
    print(f"written: {out_dir / 'flops.csv'}, {out_dir / 'flops.md'}")
    return rows


def cmd_run(args):
    cfg = _resolve(args)
    if cfg["data"]["name"] == "synthetic":
        importlib.import_module("data").ensure_synthetic_dataset(cfg["data"]["data_dir"])
    folder = config.run_dir(cfg, args.logdir, overwrite=args.overwrite)
    result = importlib.import_module("train").run(cfg, folder)
    # No best checkpoint means no validation ran (e.g. max_epochs < val_every): test the latest one.
    tested = Path(result["best_checkpoint"] or result["latest_checkpoint"])
    out_dir = _eval_dir(tested, None, "eval")
    importlib.import_module("test").evaluate(cfg, tested, out_dir)
    print()
    print("Outputs")
    print(f"  run folder:   {folder}")
    if result["best_checkpoint"] is not None:
        print(f"  checkpoints:  {result['best_checkpoint']} (best, validation metric {result['best_metric']:.4f})")
        print(f"                {result['latest_checkpoint']} (latest)")
    else:
        print(f"  checkpoint:   {result['latest_checkpoint']} (latest; no validation ran, so no best)")
    print(f"  config:       {folder / 'config.yaml'}")
    print(f"  log:          {folder / 'train.log'}")
    print(f"  TensorBoard:  tensorboard --logdir {folder}")
    print(f"  evaluation:   {out_dir} (metrics.csv, summary.json, predictions/, overlays/)")
    return result


def cmd_prepare(args):
    return importlib.import_module("data.prepare").prepare(args.dataset, args.raw, args.out, labels=args.labels,
                                                           force=args.force, val_fraction=args.val_fraction)


COMMANDS = {"run": cmd_run, "train": cmd_train, "test": cmd_test, "predict": cmd_predict, "flops": cmd_flops,
            "prepare": cmd_prepare}


if __name__ == "__main__":
    cli(sys.argv[1:], default_command="run")
