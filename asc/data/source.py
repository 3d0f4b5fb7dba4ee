"""One entry point from the ``data.*`` settings to a :class:`ClipSet`, for every dataset format.

Training, ``asc evaluate`` (on a run or, torch-free, on a bundle), ``asc cv`` and ``asc data check``
all read a collection here, so a TAU folder, a table and a folder tree are split, validated and
reported the same way everywhere.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import soundfile as sf

from asc.data.clips import Clip, ClipSet
from asc.data.problems import Problem, probe_files
from asc.data.splits import assign_folds, split_by_folds
from asc.data.table import read_folder, read_table
from asc.data.tau import check_tau, read_tau
from asc.errors import DatasetError

if TYPE_CHECKING:
    from asc.config import DataConfig

Format = Literal["tau", "table", "folders"]
TABLE_SUFFIXES = (".csv", ".tsv", ".txt")


def detect_format(root: Path, requested: str = "auto") -> Format:
    """``requested`` unless "auto": a file (or a missing .csv/.tsv/.txt) is a table, a folder with
    meta.csv or evaluation_setup/ is TAU, any other folder is a class-per-folder tree."""
    if root.is_file() and root.suffix[1:].upper() in sf.available_formats():
        raise DatasetError(root, "is an audio file, not a dataset", "point data.root at a dataset folder or a "
                           "CSV/TSV table (`asc classify` labels single recordings)")
    if requested != "auto":
        return requested  # type: ignore[return-value]
    if root.is_file() or (not root.exists() and root.suffix.lower() in TABLE_SUFFIXES):
        return "table"  # a missing table is then reported as "table not found", not as a missing folder
    if root.is_dir() and not ((root / "meta.csv").is_file() or (root / "evaluation_setup").is_dir()):
        return "folders"
    return "tau"  # also for a missing path: read_tau says what a dataset folder needs


def read_dataset(root: str | Path, config: DataConfig) -> ClipSet:
    """The splits of the collection at ``root`` read with ``config``'s format, columns and folds.

    A table or tree without a split of its own gets ``config.num_folds`` seeded, stratified folds;
    the last (or ``eval_folds``) is held out.
    """
    root = Path(root).expanduser()
    kind = detect_format(root, config.format)
    if kind == "tau":
        return read_tau(root, missing_audio=config.missing_audio)
    if kind == "table":
        has_split = config.fold_column is not None or config.split_column is not None
        clipset = read_table(
            root, audio_root=Path(config.audio_dir).expanduser() if config.audio_dir else None,
            path_column=config.path_column, path_template=config.path_template, label_column=config.label_column,
            device_column=config.device_column, device_pattern=config.device_pattern,
            fold_column=config.fold_column, split_column=config.split_column,
            train_folds=config.train_folds if has_split else None,
            eval_folds=config.eval_folds if config.fold_column else (),
            test_folds=config.test_folds if config.fold_column else (), sep=config.separator,
            missing_audio=config.missing_audio,
        )
        if has_split:
            return clipset
    else:
        clipset = read_folder(root)
        if set(clipset.splits) != {"train"}:
            return clipset
    return _fold_split(clipset, root, config)


def _fold_split(clipset: ClipSet, root: Path, config: DataConfig) -> ClipSet:
    """A collection without its own split, dealt into stratified folds and split by them."""
    clips = assign_folds(clipset.splits["train"], config.num_folds, config.split_seed)
    splits = split_by_folds(clips, root, train_folds=config.train_folds, eval_folds=config.eval_folds,
                            test_folds=config.test_folds)
    return replace(clipset, splits=splits)


def dataset_clips(clipset: ClipSet) -> list[Clip]:
    """Every clip of every split, once."""
    return list({clip.path: clip for clips in clipset.splits.values() for clip in clips}.values())


def check_dataset(root: str | Path, config: DataConfig, *, decode: bool = False,
                  progress: bool = False) -> list[Problem]:
    """Everything wrong with a collection, as one-line problems (errors first found, then audio)."""
    root = Path(root).expanduser()
    if detect_format(root, config.format) == "tau":
        return check_tau(root, decode=decode, progress=progress)
    try:
        clipset = read_dataset(root, config)
    except DatasetError as error:
        return [Problem.from_error(error)]
    clips = dataset_clips(clipset)
    problems: list[Problem] = []
    counts = Counter(clip.label for clip in clips if clip.label is not None)
    if single := sorted(label for label, n in counts.items() if n == 1):
        problems.append(Problem(root, f"{len(single)} label(s) with only one clip: {', '.join(single[:5])}",
                                "error", "add clips of these classes or remove their rows; a class with one "
                                "clip cannot be both trained on and evaluated"))
    if unlabelled := sum(clip.label is None for clip in clips):
        problems.append(Problem(root, f"{unlabelled} clip(s) without a label", "error",
                                "fill in the label column or remove those rows"))
    if skipped := clipset.extra.get("skipped_missing_audio"):
        problems.append(Problem(Path(clipset.extra["first_missing_audio"]),
                                f"{skipped} listed audio file(s) are missing and skipped", "warning",
                                "restore them to use every clip"))
    where = clipset.root or root
    problems.extend(probe_files([clip.path for clip in clips], where, decode=decode, progress=progress))
    return problems
