"""Command line: parse, build the config, call the command's module. No training or evaluation logic here.

    python main.py                      # the main job: synthetic data, tiny EM-Net, train then test
    python main.py train --data_config synapse --model_config em_net --trainer_config sgd --set trainer.max_epochs=5
    python main.py train --resume runs/em-net_synapse/20240101-120000 --set trainer.max_epochs=400
    python main.py test --checkpoint runs/em-net_synapse/20240101-120000/checkpoint_best.pt
    python main.py test --checkpoint runs/em-net_synapse/20240101-120000   # best and latest, side by side
    python main.py predict --checkpoint CKPT --input scan.nii.gz --output preds/
    python main.py flops --model_config em_net
    python main.py prepare synapse --raw ~/Downloads/Abdomen     # the unpacked BTCV archive -> datasets/Synapse
    python main.py plan datasets/MyTask     # fingerprint.json and plan.yaml: --data_config datasets/MyTask/plan.yaml
"""
import argparse
import os
import sys
from pathlib import Path

import config
from core import fileio
from core.errors import ConfigError, UserError
from core.rundir import RunDir

# Config names used when a --*_config flag is left out (the main job's configs).
DEFAULT_CONFIGS = {"data_config": "synthetic", "model_config": "em_net_tiny", "trainer_config": "synthetic"}
CONFIG_FLAGS = tuple(DEFAULT_CONFIGS)
DEFAULT_VAL_FRACTION = 0.2  # prepare msd, where no dataset config names the task's validation share
PLAN_MODEL = "em_net"  # the model config whose window plan.yaml fits, for prepare and plan


def _config_options():
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("configuration (layers: configs/defaults.yaml < data < model < trainer < --set)")
    for flag, kind in (("data_config", "dataset"), ("model_config", "model"), ("trainer_config", "trainer")):
        group.add_argument(f"--{flag}", metavar="NAME|PATH",
                           help=f"{kind} config: a name in configs/{config.KINDS[flag.split('_')[0]]}/ or a YAML "
                                f"path (default: {DEFAULT_CONFIGS[flag]})")
    group.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one key, e.g. --set trainer.lr=1e-3 --set model.roi_size=[96,96,96]; "
                            "values are YAML (numbers, true/false, null, lists); repeatable")
    return parent


def _add_run_commands(commands, shared):
    run = commands.add_parser("run", parents=[shared], help="the main job: train, then test the best checkpoint",
                              description="Train, then evaluate the best checkpoint on the test split. "
                                          "With the synthetic data set, it is generated first if missing.")
    train = commands.add_parser("train", parents=[shared], help="train a model",
                                description="Train a model; the run folder gets config.yaml, train.log, "
                                            "TensorBoard events and the checkpoints.")
    for parser in (run, train):
        parser.add_argument("--logdir", metavar="DIR",
                            help="run folder (default: runs/<model>_<data>/<timestamp>); one that holds a run "
                                 "is refused unless --overwrite")
        parser.add_argument("--overwrite", action="store_true",
                            help="replace the run in --logdir (its files are set aside, and deleted once the new "
                                 "run saves its first checkpoint)")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue the run in RUN_DIR from its checkpoint_latest.pt, with its config.yaml "
                            "(plus --set on top, e.g. --set trainer.max_epochs=400)")


def _add_inference_commands(commands, shared):
    test = commands.add_parser("test", parents=[shared], help="evaluate a checkpoint on the test split",
                               description="Evaluate a checkpoint on the test split: metrics.csv, summary.json, "
                                           "predictions and overlays. Without --*_config flags, the config.yaml "
                                           "next to the checkpoint is used (with --set on top).")
    test.add_argument("--checkpoint", metavar="PATH", required=True, nargs="+",
                      help="checkpoint to evaluate, or a run folder: then its checkpoint_best.pt and "
                           "checkpoint_latest.pt, printed side by side; several checkpoints of one model: an "
                           "ensemble (softmax averaged); an experiment folder with --ensemble MODEL")
    test.add_argument("--output", metavar="DIR",
                      help="output folder (default: <checkpoint folder>/eval/<checkpoint name>; for a run "
                           "folder <run folder>/eval, one subfolder per checkpoint)")
    predict = commands.add_parser("predict", parents=[shared], help="segment new images with a checkpoint",
                                  description="Segment images without labels. Without --*_config flags, the "
                                              "config.yaml next to the checkpoint is used (with --set on top).")
    predict.add_argument("--checkpoint", metavar="PATH", required=True, nargs="+",
                         help="checkpoint to use; several of one model: an ensemble (softmax averaged); an "
                              "experiment folder with --ensemble MODEL")
    predict.add_argument("--input", dest="inputs", action="append", required=True, metavar="PATH",
                         help="a NIfTI image, or a folder of them (*.nii, *.nii.gz); repeatable")
    predict.add_argument("--output", metavar="DIR",
                         help="output folder (default: <checkpoint folder>/predict/<checkpoint name>)")
    for parser in (test, predict):
        parser.add_argument("--ensemble", metavar="MODEL",
                            help="with --checkpoint EXPERIMENT_DIR: every run of MODEL (its seeds or folds) together")
        parser.add_argument("--ensemble-checkpoint", choices=("best", "latest"),
                            help="with --ensemble: each run's best or latest checkpoint (default: the experiment's)")


def _add_tool_commands(commands, shared):
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
                              f"(default: the matching dataset config's data.val_fraction, else "
                              f"{DEFAULT_VAL_FRACTION})")
    prepare.add_argument("--force", action="store_true", help="replace an existing output folder")
    _add_plan_model_argument(prepare)


def _add_plan_command(commands):
    plan = commands.add_parser("plan", help="fingerprint a data set folder and write its plan.yaml",
                               description="Measure the labelled cases of an MSD/decathlon folder (spacing, shape, "
                                           "body crop, class voxels, foreground intensities) into fingerprint.json "
                                           "and derive plan.yaml, a dataset config: --data_config DIR/plan.yaml. "
                                           "Nothing is copied; measurements are cached in DIR.")
    plan.add_argument("folder", metavar="DIR", help="the data set folder, holding dataset.json")
    plan.add_argument("--dataset_json", default="dataset.json", metavar="NAME",
                      help="its list of cases, relative to DIR (default: dataset.json)")
    _add_plan_model_argument(plan)


def _add_plan_model_argument(parser):
    parser.add_argument("--model_config", default=PLAN_MODEL, metavar="NAME|PATH",
                        help=f"the model whose window plan.yaml fits (default: {PLAN_MODEL})")


def _add_experiment_commands(commands):
    experiment = commands.add_parser("experiment", help="run an experiment's grid of runs (models x seeds or folds)",
                                     description="Run, continue or show an experiment (configs/experiments/): "
                                                 "every model of the file with every seed or fold, each an "
                                                 "ordinary run folder, trained then tested. Running it again "
                                                 "continues it.")
    experiment.add_argument("file", metavar="FILE.yaml", help="experiment file (a path, or a name in "
                                                              "configs/experiments/)")
    experiment.add_argument("--launcher", choices=("local", "slurm"), default="local",
                            help="local: on this machine; slurm: one SLURM job per run, as a job array (submitit)")
    experiment.add_argument("--jobs", type=int, default=1, metavar="N",
                            help="local: N runs at a time, each on one GPU (--devices) or its share of the cores")
    experiment.add_argument("--devices", metavar="0,1,...", help="local: the GPUs of the --jobs workers")
    experiment.add_argument("--dry-run", action="store_true", help="print the grid and what would run; run nothing")
    experiment.add_argument("--status", action="store_true", help="print every run's state")
    experiment.add_argument("--retry-failed", action="store_true", help="run the failed runs again")
    experiment.add_argument("--force", action="store_true",
                            help="continue runs whose resolved config differs from the config.yaml they saved")
    experiment.add_argument("--set", dest="overrides", action="append", default=[], metavar="slurm.KEY=VALUE",
                            help="override a key of the experiment file's slurm: section; repeatable")
    compare = commands.add_parser("compare", help="compare models: tables, statistics, figures, report.html",
                                  description="Compare the tested runs of experiment folders or run folders: "
                                              "Dice and HD95 tables, paired statistics against a reference "
                                              "model, figures and one self-contained report.html.")
    compare.add_argument("folders", nargs="+", metavar="DIR", help="experiment folders or run folders")
    compare.add_argument("--reference", metavar="NAME", help="the model the others are tested against "
                                                               "(default: the first)")
    compare.add_argument("--checkpoint", choices=("best", "latest"),
                         help="which checkpoint's evaluation to compare (default: the experiment's, else best)")
    compare.add_argument("--output", metavar="DIR",
                         help="output folder (default: <first folder>/comparison)")


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
    _add_run_commands(commands, shared)
    _add_inference_commands(commands, shared)
    _add_tool_commands(commands, shared)
    _add_plan_command(commands)
    _add_experiment_commands(commands)
    return parser


def cli(argv=None, default_command="run"):
    """Parse `argv` and run the command; without a command `default_command` runs. A UserError (config, data,
    checkpoint, device, output location, a stop asked for) prints one line to stderr and exits with its
    exit_code (2 for mistakes, 128 + signal for a stop, 1 for a diverged run); so does an OSError of a full,
    read-only or forbidden location (2); Ctrl-C before training exits 130. Genuine bugs keep their traceback;
    --debug (anywhere on the line) shows it for every error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] not in {*COMMANDS, "-h", "--help"}:
        argv = [default_command, *argv]
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (UserError, KeyboardInterrupt) as err:
        if debug:
            raise
        if isinstance(err, UserError):
            _exit(str(err) or type(err).__name__, err.exit_code)
        _exit("interrupted", 130)
    except OSError as err:
        # A write outside fileio.atomic_path (a label file of prepare, TensorBoard's events) that found the disk
        # full or the folder read-only: the location's fault, not a bug.
        reason = fileio.location_error(err)
        if debug or reason is None:
            raise
        _exit(f"{reason}: {err.filename2 or err.filename or err}", 2)  # filename2: a copy's or rename's target


def _exit(message, code):
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one message for the job
        print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code) from None


# --------------------------------------------------------------------------------------------------------- commands


def _flags_given(args):
    return any(getattr(args, flag) is not None for flag in CONFIG_FLAGS)


def _resolve(args):
    names = {flag: getattr(args, flag) or DEFAULT_CONFIGS[flag] for flag in CONFIG_FLAGS}
    return config.resolve_config(**names, overrides=args.overrides)


def _saved_or_flags_config(args, run):
    """Config for test/predict: the flags if any, else the config.yaml of the run folder `run`."""
    if _flags_given(args):
        return _resolve(args)
    if not run.config.is_file():
        raise ConfigError(f"{run.config} not found; pass --data_config/--model_config/--trainer_config")
    return config.load_config(run.config, args.overrides)


def _new_run(args, cfg):
    """The run folder of a new training run: --logdir (checked against its rules) or a timestamped one."""
    if args.logdir is not None:
        return RunDir.at(args.logdir, overwrite=args.overwrite)
    if args.overwrite:
        raise ConfigError("--overwrite replaces the run in --logdir; give --logdir")
    return RunDir.new(cfg["model"]["name"], cfg["data"]["name"])


def cmd_train(args):
    import data
    import train

    if args.resume is None:
        cfg = _resolve(args)
        run, resume = _new_run(args, cfg), None  # checked, not yet created
        data.ensure_for(cfg["data"])
    else:
        if _flags_given(args):
            raise ConfigError("--resume uses RUN_DIR/config.yaml; change it with --set, not --*_config flags")
        if args.logdir is not None or args.overwrite:
            raise ConfigError("--resume continues in RUN_DIR: leave out --logdir and --overwrite")
        run = RunDir.existing(args.resume, need=(RunDir.CONFIG, RunDir.LATEST), what="--resume")
        cfg, resume = config.load_config(run.config, args.overrides), run.path
    result = train.run(cfg, run, resume=resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary for the job
        if result["best_checkpoint"] is not None:
            print(f"best checkpoint:   {result['best_checkpoint']} (validation metric {result['best_metric']:.4f})")
        print(f"latest checkpoint: {result['latest_checkpoint']}")
    return result


def cmd_test(args):
    import test

    members, out_dir = _ensemble(args, "eval")
    if members:
        return test.evaluate_ensemble(members, out_dir)
    if Path(args.checkpoint[0]).is_dir():  # a run folder: its best and latest checkpoints, side by side
        run = RunDir(args.checkpoint[0])
        return test.evaluate_run(_saved_or_flags_config(args, run), run, args.output)
    checkpoint = _checkpoint_file(args.checkpoint[0])
    cfg = _saved_or_flags_config(args, RunDir.of_checkpoint(checkpoint))
    out_dir = Path(args.output) if args.output else RunDir.of_checkpoint(checkpoint).eval_dir(checkpoint)
    fileio.check_writable(out_dir)  # before inference, not after it
    return test.evaluate(cfg, checkpoint, out_dir)


def cmd_predict(args):
    import test

    members, out_dir = _ensemble(args, "predict")
    if members:
        written = test.predict_ensemble(members, [Path(p) for p in args.inputs], out_dir)
    else:
        checkpoint = _checkpoint_file(args.checkpoint[0])
        cfg = _saved_or_flags_config(args, RunDir.of_checkpoint(checkpoint))
        out_dir = Path(args.output) if args.output else RunDir.of_checkpoint(checkpoint).predict_dir(checkpoint)
        fileio.check_writable(out_dir)
        written = test.predict(cfg, checkpoint, [Path(p) for p in args.inputs], out_dir)
    for path in written:
        print(path)
    return written


def _checkpoint_file(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} not found")
    return path


def _ensemble(args, kind):
    """([(cfg, checkpoint)], output folder) of an ensemble (several --checkpoint, or --ensemble MODEL of an
    experiment folder), else ([], None)."""
    if args.ensemble is None:
        if args.ensemble_checkpoint is not None:
            raise ConfigError("--ensemble-checkpoint goes with --ensemble MODEL")
        if len(args.checkpoint) == 1:
            return [], None
        checkpoints = [_checkpoint_file(c) for c in args.checkpoint]
        default = RunDir.of_checkpoint(checkpoints[0]).path / kind / f"ensemble_of_{len(checkpoints)}"
    else:
        from experiments.spec import load_experiment

        folder = Path(args.checkpoint[0])
        if len(args.checkpoint) != 1 or not (folder / "experiment.yaml").is_file():
            raise ConfigError("--ensemble MODEL takes one --checkpoint: an experiment folder (with experiment.yaml)")
        experiment = load_experiment(folder / "experiment.yaml", root=folder.parent)
        if args.ensemble not in experiment.models:
            raise ConfigError(f"--ensemble {args.ensemble}: the experiment's models are {', '.join(experiment.models)}")
        which = args.ensemble_checkpoint or experiment.checkpoint
        checkpoints = [_checkpoint_file(RunDir(run.path).checkpoint(f"checkpoint_{which}.pt"))
                       for run in experiment.runs if run.model == args.ensemble]
        default = folder / args.ensemble / (f"ensemble_{which}" if kind == "eval" else f"ensemble_{which}_predict")
    members = [(_saved_or_flags_config(args, RunDir.of_checkpoint(c)), c) for c in checkpoints]
    out_dir = Path(args.output) if args.output else default
    fileio.check_writable(out_dir)
    return members, out_dir


def cmd_flops(args):
    from engine import flops

    flops.check_counter(args.counter)
    if args.all_models:
        return _flops_all(args, flops)
    cfg = _resolve(args)
    result = flops.count_flops(cfg, args.counter)
    print(f"model {cfg['model']['name']} at input {(1, cfg['model']['in_channels'], *cfg['model']['roi_size'])}")
    print(f"params: {result['params']:,} ({result['params'] / 1e6:.2f} M)")
    print(f"GFLOPs: {result['flops'] / 1e9:.2f} (of which selective scans {result['scan_flops'] / 1e9:.2f})")
    print(f"GMACs:  {result['macs'] / 1e9:.2f} (convolutions and matrix products)")
    if args.counter == "calflops":
        print(f"calflops: {result['calflops_flops'] / 1e9:.2f} GFLOPs, {result['calflops_macs'] / 1e9:.2f} GMACs "
              "(no selective scans; norms and activations included)")
    return result


def _flops_all(args, flops):
    if args.model_config is not None:
        raise ConfigError("flops --all builds every model from configs/models/<name>.yaml; leave out --model_config")
    data_config = args.data_config or DEFAULT_CONFIGS["data_config"]
    trainer_config = args.trainer_config or DEFAULT_CONFIGS["trainer_config"]
    window = config.resolve_config(data_config, None, trainer_config, args.overrides)["model"]["roi_size"]
    window_text = "x".join(str(s) for s in window)
    out_dir = Path(args.output or Path("runs") / "flops" / f"{Path(data_config).stem}_{window_text}")
    fileio.check_writable(out_dir)
    rows = flops.count_all(data_config, trainer_config, args.overrides, args.counter)
    title = f"Forward pass of batch 1 at {window_text}, data config {data_config}"
    written = flops.write_tables(rows, out_dir, title)
    print(title)
    print(flops.format_markdown_table(rows))
    print(f"written: {', '.join(map(str, written))}")
    return rows


def cmd_run(args):
    import data
    import test
    import train

    cfg = _resolve(args)
    run = _new_run(args, cfg)  # checked, not yet created
    data.ensure_for(cfg["data"])
    result = train.run(cfg, run)
    # No best checkpoint means no validation ran (e.g. max_epochs < val_every): test the latest one.
    tested = Path(result["best_checkpoint"] or result["latest_checkpoint"])
    out_dir = run.eval_dir(tested)
    test.evaluate(cfg, tested, out_dir)
    print()
    print("Outputs")
    print(f"  run folder:   {run}")
    if result["best_checkpoint"] is not None:
        print(f"  checkpoints:  {result['best_checkpoint']} (best, validation metric {result['best_metric']:.4f})")
        print(f"                {result['latest_checkpoint']} (latest)")
    else:
        print(f"  checkpoint:   {result['latest_checkpoint']} (latest; no validation ran, so no best)")
    print(f"  config:       {run.config}")
    print(f"  log:          {run.log}")
    print(f"  TensorBoard:  tensorboard --logdir {run}")
    print(f"  evaluation:   {out_dir} (metrics.csv, summary.json, predictions/, overlays/)")
    return result


def cmd_prepare(args):
    from data.prepare import prepare

    out, json_name, val_fraction = _prepare_defaults(args)
    rule = _window_rule(args.model_config)
    out = prepare(args.dataset, args.raw, out, labels=args.labels, force=args.force, val_fraction=val_fraction,
                  json_name=json_name, window_rule=rule)
    config.resolve_config(str(out.resolve() / "plan.yaml"), args.model_config)  # usable as it is
    return out


def cmd_plan(args):
    from data.plan import plan_folder

    path = plan_folder(args.folder, _window_rule(args.model_config), args.dataset_json)
    config.resolve_config(str(path), args.model_config)  # usable as it is, checked like any dataset config
    return path


def _window_rule(model_config):
    """The windows the model of `model_config` accepts, for the planner (the data room knows no models)."""
    import models
    from data.plan import WindowRule

    cfg = config.resolve_config(model_config=model_config)
    multiples, coarsest = models.window_rule(cfg["model"]["name"], **config.model_kwargs(cfg))
    return WindowRule(cfg["model"]["name"], str(model_config), multiples, coarsest)


def _prepare_defaults(args):
    """(output folder, list file name, validation share) for `prepare`: the flags, else the dataset config
    the protocol feeds (its data_dir, dataset_json and val_fraction)."""
    if args.dataset == "msd":
        task = Path(args.raw).expanduser().resolve().name
        sections = [config.dataset_section(name) for name in config.available("datasets")]
        data = next((d for d in sections if Path(str(d.get("data_dir", ""))).name == task), {})
        val_fraction = args.val_fraction or data.get("val_fraction") or DEFAULT_VAL_FRACTION
        return Path(args.out or Path("datasets") / task), "dataset.json", val_fraction
    name = "synapse_btcv8" if args.dataset == "synapse" and args.labels == "btcv8" else args.dataset
    data = config.dataset_section(name)
    return Path(args.out or data["data_dir"]), data.get("dataset_json", "dataset.json"), DEFAULT_VAL_FRACTION


def cmd_experiment(args):
    from experiments import local, runner, slurm, spec

    experiment = spec.load_experiment(_experiment_file(args.file), args.overrides)
    if args.launcher == "slurm":
        launcher = slurm.SlurmLauncher(experiment.slurm)
    else:
        launcher = local.LocalLauncher(args.jobs, args.devices)
    return runner.run_experiment(experiment, launcher, retry_failed=args.retry_failed, force=args.force,
                                 dry_run=args.dry_run, status=args.status)


def _experiment_file(name):
    path = Path(name)
    if path.is_file() or "/" in name or name.endswith((".yaml", ".yml")):
        return path
    return config.config_path("experiments", name)


def cmd_compare(args):
    from experiments.comparison import folders

    return folders.compare_folders([Path(f) for f in args.folders], reference=args.reference,
                                   checkpoint=args.checkpoint, output=args.output)


COMMANDS = {"run": cmd_run, "train": cmd_train, "test": cmd_test, "predict": cmd_predict, "flops": cmd_flops,
            "prepare": cmd_prepare, "plan": cmd_plan, "experiment": cmd_experiment, "compare": cmd_compare}


if __name__ == "__main__":
    cli(sys.argv[1:], default_command="run")
