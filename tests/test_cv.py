"""``asc cv``: one run per held-out fold, resumable, with a per-fold table and out-of-fold predictions."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_datasets import CLASSES, write_esc, write_folders

from asc.cli import main
from asc.config import RunConfig, load_config, to_dict
from asc.cv import cross_validate
from asc.errors import AscError
from asc.train.loop import train_or_resume


@pytest.mark.slow
def test_esc50_layout_cross_validates_and_resumes(tmp_path: Path, tiny_overrides,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    table = write_esc(tmp_path / "esc", per_class_fold=1)
    options = [*tiny_overrides(1), f"data.cache_dir={tmp_path / 'cache'}", f"data.root={table}",
               f"data.audio_dir={tmp_path / 'esc' / 'audio'}", "data.label_column=category", "data.fold_column=fold"]
    out = tmp_path / "cv"
    code = main(["cv", "--out", str(out), "--quiet", *options])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "5 folds, accuracy" in stdout

    summary = json.loads((out / "cv.json").read_text())
    assert list(summary["folds"]) == ["1", "2", "3", "4", "5"]
    accuracies = [fold["accuracy"] for fold in summary["folds"].values()]
    assert all(fold["n"] == 3 for fold in summary["folds"].values())
    assert summary["mean"]["accuracy"] == pytest.approx(np.mean(accuracies))
    assert summary["std"]["accuracy"] == pytest.approx(np.std(accuracies, ddof=1))
    assert list(summary["per_class"]) == list(CLASSES)
    markdown = (out / "cv.md").read_text()
    assert "| mean ± std | 15 |" in markdown and "| 5 | 3 |" in markdown and "device" not in markdown
    for fold in "12345":  # each fold an ordinary run, trained on the four others
        config = load_config(RunConfig, out / f"fold-{fold}" / "config.yaml")
        assert config.data.eval_folds == [fold] and sorted(config.data.train_folds) == sorted(set("12345") - {fold})
        report = json.loads((out / f"fold-{fold}" / "report.json").read_text())
        assert report["metrics"]["per_device"] == {}

    with (out / "oof_predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["file", "fold", "label", "predicted", *(f"p_{c}" for c in CLASSES)]
    assert len(rows) == 15 and len({row["file"] for row in rows}) == 15
    for row in rows:  # ESC-50 file names start with their fold
        assert Path(row["file"]).name.split("-")[0] == row["fold"]
        assert row["label"] in CLASSES and row["predicted"] in CLASSES
        assert sum(float(row[f"p_{c}"]) for c in CLASSES) == pytest.approx(1.0, abs=1e-4)
        assert row["predicted"] == max(CLASSES, key=lambda c: float(row[f"p_{c}"]))
    oof = np.mean([row["label"] == row["predicted"] for row in rows if row["fold"] == "2"])
    assert oof == pytest.approx(summary["folds"]["2"]["accuracy"])

    # a kill during fold 4: fold 4 has its last checkpoint but no report, fold 5 never started
    (out / "fold-4" / "report.json").unlink()
    shutil.rmtree(out / "fold-5")
    config = load_config(RunConfig, out / "config.yaml")
    again = cross_validate(config, out, progress=False)
    assert [r.status for r in again.folds] == ["finished", "finished", "finished", "resumed", "trained"]
    assert again.to_dict()["folds"]["1"] == summary["folds"]["1"]

    # other settings into the same folder are refused, not answered with the old folds' table
    epochs = config.train.epochs + 1
    assert main(["cv", "--out", str(out), "--quiet", *options, f"train.epochs={epochs}"]) == 2
    assert capsys.readouterr().err.strip() == (f"asc: error: {out}: holds a cross-validation with other settings; "
                                               "choose another --out, delete it, or repeat the same settings")
    assert to_dict(load_config(RunConfig, out / "config.yaml")) == to_dict(config)  # untouched
    fold = load_config(RunConfig, out / "fold-1" / "config.yaml")
    assert train_or_resume(fold, out / "fold-1", progress=False) == "finished"
    with pytest.raises(AscError, match="fold-1: holds a finished run with other settings"):
        train_or_resume(replace(fold, train=replace(fold.train, epochs=epochs)), out / "fold-1", progress=False)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert main(["cv", "--out", str(tmp_path / "run"), "--quiet", *options]) == 2
    assert "is a training run's folder" in capsys.readouterr().err


@pytest.mark.slow
def test_folders_cross_validate_over_stratified_folds(tmp_path: Path, tiny_overrides,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    root = write_folders(tmp_path / "tree", splits=False, per_class=3)
    out = tmp_path / "cv"
    code = main(["cv", "--out", str(out), "--quiet", *tiny_overrides(1), f"data.cache_dir={tmp_path / 'cache'}",
                 f"data.root={root}", "data.num_folds=3", "train.batch_size=4"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "cv.json").read_text())
    assert list(summary["folds"]) == ["1", "2", "3"] and all(f["n"] == 3 for f in summary["folds"].values())
    with (out / "oof_predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    for fold in "123":  # stratified: every class once in every fold
        assert sorted(row["label"] for row in rows if row["fold"] == fold) == list(CLASSES)


def test_collections_without_folds_are_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_folders(tmp_path / "tree", splits=True)
    code = main(["cv", "--out", str(tmp_path / "cv"), f"data.root={root}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "asc cv needs data.fold_column" in err[0]
    code = main(["cv", "--out", str(tmp_path / "cv"), f"data.root={root}", "data.split_column=split"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "asc cv needs folds" in err[0]


def test_cv_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["cv", "--help"])
    assert info.value.code == 0 and "usage: asc cv" in capsys.readouterr().out
