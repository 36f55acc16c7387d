"""Command line: parse, build the config, dispatch to train.py / test.py. No training or evaluation logic here.

    python main.py                      # the main job: synthetic data, tiny EM-Net, train then test
    python main.py train --data_config synapse --model_config em_net --trainer_config sgd --set trainer.max_epochs=5
    python main.py train --resume runs/em-net_synapse/20240101-120000 --set trainer.max_epochs=400
    python main.py test --checkpoint runs/em-net_synapse/20240101-120000/checkpoint_best.pt
    python main.py predict --checkpoint CKPT --input scan.nii.gz --output preds/
    python main.py flops --model_config em_net
"""
import argparse
import importlib
import sys
from pathlib import Path

import config
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
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", parents=[shared], help="the main job: train, then test the best checkpoint",
                              description="Train, then evaluate the best checkpoint on the test split. "
                                          "With the synthetic data set, it is generated first if missing.")
    run.add_argument("--logdir", metavar="DIR", help="run folder (default: runs/<model>_<data>/<timestamp>)")

    train = commands.add_parser("train", parents=[shared], help="train a model",
                                description="Train a model; the run folder gets config.yaml, train.log, "
                                            "TensorBoard events and the checkpoints.")
    train.add_argument("--logdir", metavar="DIR", help="run folder (default: runs/<model>_<data>/<timestamp>)")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue the run in RUN_DIR from its checkpoint_latest.pt, with its config.yaml "
                            "(plus --set on top, e.g. --set trainer.max_epochs=400)")

    test = commands.add_parser("test", parents=[shared], help="evaluate a checkpoint on the test split",
                               description="Evaluate a checkpoint on the test split: metrics.csv, summary.json, "
                                           "predictions and overlays. Without --*_config flags, the config.yaml "
                                           "next to the checkpoint is used (with --set on top).")
    test.add_argument("--checkpoint", metavar="PATH", required=True, help="checkpoint to evaluate")
    test.add_argument("--output", metavar="DIR",
                      help="output folder (default: <checkpoint folder>/eval/<checkpoint name>)")

    predict = commands.add_parser("predict", parents=[shared], help="segment new images with a checkpoint",
                                  description="Segment images without labels. Without --*_config flags, the "
                                              "config.yaml next to the checkpoint is used (with --set on top).")
    predict.add_argument("--checkpoint", metavar="PATH", required=True, help="checkpoint to use")
    predict.add_argument("--input", dest="inputs", action="append", required=True, metavar="PATH",
                         help="a NIfTI image, or a folder of them (*.nii, *.nii.gz); repeatable")
    predict.add_argument("--output", metavar="DIR",
                         help="output folder (default: <checkpoint folder>/predict/<checkpoint name>)")

    commands.add_parser("flops", parents=[shared], help="count parameters, FLOPs and MACs of the model",
                        description="Build the model from the config and count parameters, FLOPs and MACs of "
                                    "one forward pass at (1, in_channels, *roi_size).")
    return parser


def cli(argv=None, default_command="run"):
    """Parse `argv` and run the command; without a command `default_command` runs. User errors (ConfigError)
    print one line to stderr and exit with status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    known = {"run", "train", "test", "predict", "flops", "-h", "--help"}
    if not argv or argv[0] not in known:
        argv = [default_command, *argv]
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


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
        cfg, resume = config.load_config(folder / "config.yaml", args.overrides), folder
    else:
        cfg, resume = _resolve(args), None
        folder = config.run_dir(cfg, args.logdir)
    # train.run saves the effective config as <folder>/config.yaml (with a resume: the one with --set applied)
    result = importlib.import_module("train").run(cfg, folder, resume=resume)
    _print_checkpoints(result)
    return result


def _print_checkpoints(result):
    if result["best_checkpoint"] is not None:
        print(f"best checkpoint:   {result['best_checkpoint']} (validation metric {result['best_metric']:.4f})")
    print(f"latest checkpoint: {result['latest_checkpoint']}")


def _eval_dir(checkpoint, output, kind):
    return Path(output) if output else checkpoint.parent / kind / checkpoint.stem


def cmd_test(args):
    cfg, checkpoint = _checkpoint_config(args)
    out_dir = _eval_dir(checkpoint, args.output, "eval")
    return importlib.import_module("test").evaluate(cfg, checkpoint, out_dir)


def cmd_predict(args):
    cfg, checkpoint = _checkpoint_config(args)
    out_dir = _eval_dir(checkpoint, args.output, "predict")
    written = importlib.import_module("test").predict(cfg, checkpoint, [Path(p) for p in args.inputs], out_dir)
    for path in written:
        print(path)
    return written


def count_flops(cfg):
    """Parameters, forward FLOPs and MACs at (1, in_channels, *roi_size) on trainer.device
    (models.complexity says what is counted)."""
    import torch

    import models
    from models import selective_scan
    from models.complexity import count_flops as count_model_flops

    device = cfg["trainer"]["device"]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    try:
        selective_scan.set_scan_backend(cfg["trainer"]["scan_backend"])
        torch_device = torch.device(device)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"flops: {err}") from None
    model = models.build_model(cfg["model"]["name"], **config.model_kwargs(cfg)).to(torch_device).eval()
    x = torch.zeros(1, cfg["model"]["in_channels"], *cfg["model"]["roi_size"], device=torch_device)
    return count_model_flops(model, x)


def cmd_flops(args):
    cfg = _resolve(args)
    result = count_flops(cfg)
    shape = (1, cfg["model"]["in_channels"], *cfg["model"]["roi_size"])
    print(f"model {cfg['model']['name']} at input {tuple(shape)}")
    print(f"params: {result['params']:,} ({result['params'] / 1e6:.2f} M)")
    print(f"GFLOPs: {result['flops'] / 1e9:.2f} (of which selective scans {result['scan_flops'] / 1e9:.2f})")
    print(f"GMACs:  {result['macs'] / 1e9:.2f} (convolutions and matrix products)")
    return result


def cmd_run(args):
    cfg = _resolve(args)
    if cfg["data"]["name"] == "synthetic":
        importlib.import_module("data").ensure_synthetic_dataset(cfg["data"]["data_dir"])
    folder = config.run_dir(cfg, args.logdir)
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


COMMANDS = {"run": cmd_run, "train": cmd_train, "test": cmd_test, "predict": cmd_predict, "flops": cmd_flops}


if __name__ == "__main__":
    cli(sys.argv[1:], default_command="run")
