"""Run folders: names, creation, the refusal and overwrite rules, and taking back a run that failed before
its first checkpoint (RunDir); nothing of the user's is lost."""
import re
from pathlib import Path

import pytest

from core.errors import ConfigError, OutputError
from core.rundir import RunDir


def make_run(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text(f"old {name}")
    return folder


def test_file_names_live_in_one_place(tmp_path):
    run = RunDir(tmp_path / "r")
    assert (run.config, run.log, run.latest, run.best, run.progress) == tuple(
        tmp_path / "r" / n for n in ("config.yaml", "train.log", "checkpoint_latest.pt", "checkpoint_best.pt",
                                      "progress.png"))
    assert run.eval_dir(tmp_path / "r" / "checkpoint_best.pt") == tmp_path / "r" / "eval" / "checkpoint_best"
    assert run.predict_dir("checkpoint_latest.pt") == tmp_path / "r" / "predict" / "checkpoint_latest"
    make_run(tmp_path / "r", "checkpoint_latest.pt", "events.out.tfevents.1.host", "notes.txt")
    assert run.checkpoints() == [run.latest]
    assert run.training_files() == ["checkpoint_latest.pt", "events.out.tfevents.1.host"]
    assert RunDir.of_checkpoint(run.latest).path == run.path


def test_new_folders_are_timestamped_and_made_when_the_run_begins(tmp_path):
    first, second = RunDir.new("em-net", "toy", root=tmp_path), RunDir.new("em-net", "toy", root=tmp_path)
    assert not first.path.exists()  # nothing on disk until the run begins
    first.begin()
    second.begin()
    assert first.path.parent == tmp_path / "em-net_toy" and re.fullmatch(r"\d{8}-\d{6}", first.path.name)
    assert first.path != second.path and first.path.is_dir() and second.path.is_dir()


def test_a_logdir_holding_a_run_or_its_files_is_refused_without_touching_it(tmp_path):
    held = make_run(tmp_path / "held", "checkpoint_best.pt", "checkpoint_latest.pt")
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoint_best.pt, checkpoint_latest.pt\); "
                                          r"continue it with --resume .*, or pass --overwrite"):
        RunDir.at(held)
    mine = make_run(tmp_path / "mine", "config.yaml", "train.log", "notes.txt")
    with pytest.raises(ConfigError, match=r"holds config.yaml, train.log, which a new run would replace"):
        RunDir.at(mine)
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml", "notes.txt", "train.log"]
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(OutputError, match="is not a folder"):
        RunDir.at(a_file)
    assert RunDir.at(tmp_path / "fresh").path == tmp_path / "fresh" and not (tmp_path / "fresh").exists()


def test_a_failed_new_run_removes_only_what_it_created(tmp_path):
    folder = make_run(tmp_path / "logdir", "notes.txt")
    run = RunDir.at(folder)
    run.begin()
    (folder / "config.yaml").write_text("new")
    (folder / "train.log").write_text("new")
    run.abandon()
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]

    fresh = RunDir.at(tmp_path / "a" / "b")
    fresh.begin()
    (fresh.path / "config.yaml").write_text("new")
    fresh.abandon()
    assert not fresh.path.exists() and (tmp_path / "a").is_dir()


def test_overwrite_sets_the_old_run_aside_until_the_first_checkpoint(tmp_path):
    old = ("checkpoint_best.pt", "checkpoint_latest.pt", "config.yaml", "train.log", "notes.txt")
    folder = make_run(tmp_path / "run", *old)
    make_run(folder / "eval" / "checkpoint_best", "metrics.csv")

    failed = RunDir.at(folder, overwrite=True)
    failed.begin()
    assert sorted(p.name for p in folder.iterdir()) == [".replaced", "notes.txt"]
    (folder / "config.yaml").write_text("new")
    failed.abandon()  # failed before its first checkpoint: the old run comes back, as it was
    assert sorted(p.name for p in folder.iterdir()) == sorted([*old, "eval"])
    assert (folder / "config.yaml").read_text() == "old config.yaml"
    assert (folder / "eval" / "checkpoint_best" / "metrics.csv").read_text() == "old metrics.csv"

    kept = RunDir.at(folder, overwrite=True)
    kept.begin()
    (folder / "checkpoint_latest.pt").write_text("new")
    kept.keep()
    kept.abandon()  # nothing to take back once a checkpoint was saved... abandon is not called then; no effect
    assert not (folder / ".replaced").exists() and (folder / "notes.txt").read_text() == "old notes.txt"


def test_an_overwrite_killed_before_its_first_checkpoint_keeps_the_original_on_the_next_one(tmp_path):
    folder = make_run(tmp_path / "run", "checkpoint_latest.pt", "config.yaml")
    killed = RunDir.at(folder, overwrite=True)
    killed.begin()
    (folder / "config.yaml").write_text("from the killed attempt")  # then SIGKILL: no abandon
    again = RunDir.at(folder, overwrite=True)
    again.begin()
    again.abandon()
    assert (folder / "config.yaml").read_text() == "old config.yaml"
    assert (folder / "checkpoint_latest.pt").read_text() == "old checkpoint_latest.pt"


def test_existing_run_folders_name_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="--resume .*nowhere not found"):
        RunDir.existing(tmp_path / "nowhere", what="--resume")
    folder = make_run(tmp_path / "run", "config.yaml")
    with pytest.raises(ConfigError, match=r"no checkpoint_latest.pt there \(not a run folder\?\)"):
        RunDir.existing(folder, need=(RunDir.CONFIG, RunDir.LATEST))
    assert RunDir.existing(folder).path == Path(folder)
