"""A run folder: the one place that knows its file names, how one is created, when an existing folder may
be reused, and how a new run that failed before its first checkpoint is taken back.

    <run>/config.yaml  train.log  progress.png  events.out.tfevents.*  checkpoint_latest.pt  checkpoint_best.pt
    <run>/eval/<checkpoint>/...  <run>/eval/best_vs_latest.txt  <run>/predict/<checkpoint>/...
    <run>/run_record.json  console.log  (a run of an experiment: its state and provenance, its output)
"""
import contextlib
import datetime
import os
import shutil
from pathlib import Path

from core.errors import ConfigError, OutputError
from core.fileio import location_error


class RunDir:
    CONFIG = "config.yaml"
    LOG = "train.log"
    LATEST = "checkpoint_latest.pt"
    BEST = "checkpoint_best.pt"
    PROGRESS = "progress.png"
    EVENTS = "events.out.tfevents.*"
    EVAL = "eval"
    PREDICT = "predict"
    BEST_VS_LATEST = "best_vs_latest.txt"
    RECORD = "run_record.json"
    CONSOLE = "console.log"
    CHECKPOINTS = (BEST, LATEST)
    # What training writes, and what --overwrite sets aside (with the old evaluation, which it makes stale).
    TRAINING_FILES = (CONFIG, LOG, LATEST, BEST, PROGRESS, EVENTS)
    REPLACED = ".replaced"  # the previous run's files until --overwrite's new run saves its first checkpoint

    def __init__(self, path, overwrite=False):
        self.path = Path(path)
        self.overwrite = overwrite
        self._before = None  # names in the folder when this run began (None: not begun)
        self._made = False  # whether this run created the folder
        self.kept = False  # whether the new run saved a checkpoint (then nothing is taken back)
        self._stamped = False  # a timestamped folder of `new`: another suffix if the name is taken

    def __fspath__(self):
        return os.fspath(self.path)

    def __str__(self):
        return str(self.path)

    def __repr__(self):
        return f"RunDir({str(self.path)!r})"

    @property
    def config(self):
        return self.path / self.CONFIG

    @property
    def log(self):
        return self.path / self.LOG

    @property
    def latest(self):
        return self.path / self.LATEST

    @property
    def best(self):
        return self.path / self.BEST

    @property
    def progress(self):
        return self.path / self.PROGRESS

    def checkpoint(self, name):
        return self.path / name

    @property
    def record(self):
        return self.path / self.RECORD

    @property
    def console(self):
        return self.path / self.CONSOLE

    @property
    def eval_root(self):
        return self.path / self.EVAL

    def eval_dir(self, checkpoint):
        """Where the evaluation of `checkpoint` (a name or path of one of this run's checkpoints) goes."""
        return self.eval_root / Path(checkpoint).stem

    def predict_dir(self, checkpoint):
        return self.path / self.PREDICT / Path(checkpoint).stem

    def checkpoints(self):
        """This run's checkpoints that exist: best first, then latest."""
        return [path for path in (self.best, self.latest) if path.is_file()]

    def events(self):
        return sorted(self.path.glob(self.EVENTS))

    def training_files(self):
        """Names of the files training writes that are in the folder now."""
        return sorted(p.name for pattern in self.TRAINING_FILES for p in self.path.glob(pattern) if p.is_file())

    # ---- finding and creating -------------------------------------------------------------------------

    @classmethod
    def new(cls, model_name, data_name, root="runs"):
        """A new run folder root/<model>_<data>/<YYYYmmdd-HHMMSS>, made by `begin` (with -1, -2 ... when two
        runs start in the same second)."""
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run = cls(Path(root) / f"{model_name}_{data_name}" / stamp)
        run._stamped = True
        return run

    @classmethod
    def at(cls, logdir, overwrite=False):
        """The folder --logdir names, for a new run. One holding a checkpoint, or files a new run would
        replace (config.yaml, train.log, ...), is refused unless `overwrite`; nothing on disk changes here."""
        run = cls(logdir, overwrite=overwrite)
        if run.path.exists() and not run.path.is_dir():
            raise OutputError(f"--logdir {run.path} is not a folder")
        held = run.training_files() if run.path.is_dir() else []
        if held and not overwrite:
            if any(name in held for name in cls.CHECKPOINTS):
                raise ConfigError(f"--logdir {run.path} already holds a run "
                                  f"({', '.join(n for n in held if n in cls.CHECKPOINTS)}); continue it with "
                                  f"--resume {run.path}, or pass --overwrite to replace it")
            raise ConfigError(f"--logdir {run.path} holds {', '.join(held)}, which a new run would replace; "
                              "choose another folder, or pass --overwrite (they are put back if the new run "
                              "fails before its first checkpoint)")
        return run

    @classmethod
    def existing(cls, path, need=(CONFIG,), what="run folder"):
        """An existing run folder holding the files `need` (names); otherwise a ConfigError naming the first
        one missing."""
        run = cls(path)
        if not run.path.is_dir():
            raise ConfigError(f"{what} {run.path} not found")
        for name in need:
            if not (run.path / name).is_file():
                raise ConfigError(f"{what} {run.path}: no {name} there (not a run folder?)")
        return run

    @classmethod
    def of_checkpoint(cls, checkpoint):
        """The run folder a checkpoint file lies in (its config.yaml, eval/ and predict/ are beside it)."""
        return cls(Path(checkpoint).parent)

    # ---- a new training run's lifecycle (rank 0 only) --------------------------------------------------

    def begin(self):
        """Create the folder if needed and remember what was there; with `overwrite`, move the previous run's
        files and evaluation into REPLACED, where they stay until `keep` or go back with `abandon`."""
        try:
            if self._stamped:
                self._make_stamped()
            elif not self.path.is_dir():
                self.path.mkdir(parents=True)
                self._made = True
        except OSError as err:
            what = "run folder" if self._stamped else "--logdir"
            raise OutputError(f"{what} {self.path} cannot be created: {location_error(err) or err.strerror}") from None
        if self.overwrite:
            self._set_aside()
        self._before = set(os.listdir(self.path))

    def _make_stamped(self):
        stamp, parent = self.path.name, self.path.parent
        parent.mkdir(parents=True, exist_ok=True)
        for n in range(1000):
            path = parent / (stamp if n == 0 else f"{stamp}-{n}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            self.path, self._made = path, True
            return
        raise OutputError(f"could not create a new run folder under {parent}")

    def _set_aside(self):
        replaced = self.path / self.REPLACED
        if replaced.is_dir():
            if self.checkpoints():  # an earlier --overwrite got its checkpoint but was killed before keep()
                shutil.rmtree(replaced)
            else:  # it was killed before its first checkpoint: REPLACED holds the run to keep; drop its files
                for name in self.training_files():
                    (self.path / name).unlink()
                return
        moved = self.training_files() + ([self.EVAL] if self.eval_root.is_dir() else [])
        if moved:
            replaced.mkdir()
            for name in moved:
                os.replace(self.path / name, replaced / name)

    def keep(self):
        """The new run saved a checkpoint: the files it replaced are deleted."""
        if not self.kept:
            shutil.rmtree(self.path / self.REPLACED, ignore_errors=True)
            self.kept = True

    def abandon(self):
        """The new run failed before its first checkpoint: remove what it created, put back what it replaced,
        and remove the folder if it made it and nothing else is in it."""
        if self._before is None:
            if self._made:
                self._remove_if_empty()
            return
        for name in set(os.listdir(self.path)) - self._before:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
        replaced = self.path / self.REPLACED
        if replaced.is_dir():
            for entry in os.listdir(replaced):
                os.replace(replaced / entry, self.path / entry)
            replaced.rmdir()
        if self._made:
            self._remove_if_empty()

    def _remove_if_empty(self):
        with contextlib.suppress(OSError):  # not empty: files of the user's, kept
            self.path.rmdir()
