"""k-fold cross-validation: one ordinary training run per held-out fold, and one table of them all.

Collections such as ESC-50 (5 folds) and UrbanSound8K (10 folds) are reported as the mean ± std
over folds, each fold tested by a model that never trained on it. Every fold is a normal run folder
(``OUT/fold-N``) trained by the same :class:`~asc.train.loop.Trainer` as ``asc train``, so a killed
cross-validation resumes where it stopped: finished folds are skipped, a stopped one continues from
its last checkpoint. The folds are the collection's own (a table's fold column) or the seeded,
stratified folds a collection without a split is dealt into (``data.num_folds``).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax

from asc.config import RunConfig, load_config, save_yaml, to_dict
from asc.data.source import dataset_clips, detect_format
from asc.data.splits import fold_order
from asc.errors import AscError, ConfigError
from asc.io import atomic_write_json, atomic_write_text, make_dir
from asc.train.data import dataset_root, open_clipset
from asc.train.evaluate import Predictions, predict_run
from asc.train.loop import train_or_resume
from asc.train.metrics import Metrics

SUMMARY = ("accuracy", "macro_accuracy", "log_loss")


@dataclass
class FoldResult:
    fold: str
    run_dir: Path
    status: str  #: "trained", "resumed" or "finished" (skipped: it was already done)
    predictions: Predictions

    @property
    def metrics(self) -> Metrics:
        return self.predictions.metrics()


@dataclass
class CVResult:
    folds: list[FoldResult]
    labels: list[str]

    def to_dict(self) -> dict[str, Any]:
        per_fold = {r.fold: r.metrics for r in self.folds}
        summary = {key: _mean_std([getattr(m, key) for m in per_fold.values()]) for key in SUMMARY}
        per_class = {label: _mean_std([m.per_class[label].accuracy for m in per_fold.values()])
                     for label in self.labels}
        return {
            "folds": {fold: {"n": m.n, **{key: getattr(m, key) for key in SUMMARY},
                             "per_class": {label: m.per_class[label].accuracy for label in self.labels}}
                      for fold, m in per_fold.items()},
            "mean": {key: value[0] for key, value in summary.items()},
            "std": {key: value[1] for key, value in summary.items()},
            "per_class": {label: {"mean": m, "std": s} for label, (m, s) in per_class.items()},
            "runs": {r.fold: str(r.run_dir) for r in self.folds},
        }


def cv_folds(config: RunConfig) -> list[str]:
    """The folds to hold out in turn: every fold of the collection except ``data.test_folds``."""
    data = config.data
    root = dataset_root(data)
    kind = detect_format(root, data.format) if data.root is not None else "tau"
    if kind == "tau" or data.split_column is not None:
        raise ConfigError(f"{root}: asc cv needs folds: a table with data.fold_column, or a table or class-folder "
                          "tree without a split of its own (dealt into data.num_folds folds)")
    everything = replace(data, train_folds=None, eval_folds=None, test_folds=[])
    clips = dataset_clips(open_clipset(everything, progress=False))
    folds = fold_order({clip.fold for clip in clips if clip.fold is not None})
    if not folds:
        raise ConfigError(f"{root}: split folders are not folds; asc cv needs data.fold_column or a tree of "
                          "class folders without train/ and test/")
    if data.train_folds is not None:
        folds = [fold for fold in folds if fold in set(data.train_folds)]
    folds = [fold for fold in folds if fold not in set(data.test_folds)]
    if len(folds) < 2:
        raise ConfigError(f"{root}: cross-validation needs at least two folds, found {', '.join(folds) or 'none'}")
    return folds


def _check_destination(out_dir: Path, config: RunConfig) -> None:
    """Refuse a training run's folder, or a cross-validation of other settings (never overwritten)."""
    if (out_dir / "checkpoints").is_dir():
        raise AscError(f"{out_dir}: is a training run's folder; choose another --out for the cross-validation")
    saved = out_dir / "config.yaml"
    if saved.is_file() and to_dict(load_config(RunConfig, saved)) != to_dict(config):
        raise AscError(f"{out_dir}: holds a cross-validation with other settings; choose another --out, delete it, "
                       "or repeat the same settings")


def cross_validate(config: RunConfig, out_dir: Path, *, progress: bool = True) -> CVResult:
    """Train (or resume, or skip) one run per held-out fold into ``out_dir/fold-N`` and write
    ``cv.json``, ``cv.md`` and ``oof_predictions.csv`` (the fold each clip was tested in)."""
    out_dir = Path(out_dir)
    folds = cv_folds(config)
    _check_destination(out_dir, config)
    make_dir(out_dir)
    save_yaml(to_dict(config), out_dir / "config.yaml")
    results = []
    for fold in folds:
        others = [f for f in folds if f != fold]
        fold_config = replace(config, data=replace(config.data, train_folds=others, eval_folds=[fold]))
        run_dir = out_dir / f"fold-{fold}"
        if progress:
            print(f"fold {fold} ({len(results) + 1}/{len(folds)}): {run_dir}", flush=True)
        status = train_or_resume(fold_config, run_dir, progress=progress)
        results.append(FoldResult(fold, run_dir, status, predict_run(run_dir, progress=False)))
    result = CVResult(results, results[0].predictions.labels)
    atomic_write_json(out_dir / "cv.json", result.to_dict())
    atomic_write_text(out_dir / "cv.md", cv_markdown(result))
    atomic_write_text(out_dir / "oof_predictions.csv", oof_csv(result))
    return result


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1, the spread of a fold's score)."""
    array = np.asarray(values, dtype=float)
    if len(array) == 0:
        return math.nan, math.nan
    return float(np.nanmean(array)), float(np.nanstd(array, ddof=1)) if len(array) > 1 else 0.0


def _pct(value: float) -> str:
    return "–" if math.isnan(value) else f"{100 * value:.1f}"


def cv_markdown(result: CVResult) -> str:
    """Per-fold and mean ± std scores, then per-class accuracy per fold."""
    data = result.to_dict()
    lines = ["# Cross-validation", "",
             f"{len(result.folds)} folds, each tested by a run that did not train on it; mean ± sample std over folds.",
             "",
             "| fold | clips | accuracy % | macro accuracy % | log loss |", "|---|---:|---:|---:|---:|"]
    for fold, scores in data["folds"].items():
        lines.append(f"| {fold} | {scores['n']} | {_pct(scores['accuracy'])} | {_pct(scores['macro_accuracy'])} "
                     f"| {scores['log_loss']:.3f} |")
    mean, std = data["mean"], data["std"]
    lines.append(f"| mean ± std | {sum(s['n'] for s in data['folds'].values())} | "
                 f"{_pct(mean['accuracy'])} ± {_pct(std['accuracy'])} | "
                 f"{_pct(mean['macro_accuracy'])} ± {_pct(std['macro_accuracy'])} | "
                 f"{mean['log_loss']:.3f} ± {std['log_loss']:.3f} |")
    folds = list(data["folds"])
    lines += ["", "## Accuracy % per class", "", "| class | " + " | ".join(f"fold {f}" for f in folds)
              + " | mean ± std |", "|---|" + "---:|" * (len(folds) + 1)]
    for label, spread in data["per_class"].items():
        cells = [_pct(data["folds"][f]["per_class"][label]) for f in folds]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_pct(spread['mean'])} ± {_pct(spread['std'])} |")
    return "\n".join(lines) + "\n"


def oof_csv(result: CVResult) -> str:
    """One row per clip: the fold it was tested in, its label, the prediction and every probability."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "fold", "label", "predicted", *(f"p_{label}" for label in result.labels)])
    for fold in result.folds:
        preds = fold.predictions
        probabilities = softmax(preds.logits.astype(np.float64), axis=1)
        for clip, row in zip(preds.clips, probabilities, strict=True):
            writer.writerow([str(clip.path), fold.fold, clip.label or "", preds.labels[int(row.argmax())],
                             *(f"{p:.6f}" for p in row)])
    return buffer.getvalue()
