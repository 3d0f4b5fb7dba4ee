"""TAU Urban Acoustic Scenes 2019 / 2020 Mobile / 2022 Mobile: reading and validating the layout.

A TAU folder holds ``meta.csv`` (tab-separated ``filename scene_label identifier source_label``),
``evaluation_setup/fold1_{train,evaluate,test}.csv`` and ``audio/``; evaluation sets ship only the
unlabelled ``evaluation_setup/{fold1_test,test}.csv``. TAU 2022 Mobile names its 1-s files
``scene-city-location-segment-index-device.wav``; the DCASE 2024 training subsets
``split{5,10,25,50,100}.csv`` (in ``split_setup/`` or ``evaluation_setup/``) become splits of the
same name, so ``data.train_split=split25`` trains on the 25 % subset. Real downloads are often
partial, so every check reports what is wrong and how to fix it instead of failing on the first
missing file.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from asc.data.clips import UNKNOWN_DEVICE, Clip, ClipSet, device_vocabulary, has_devices
from asc.data.problems import Problem, probe_files
from asc.data.table import label_vocabulary, read_rows, separator_name
from asc.errors import DatasetError

META_COLUMNS = ("filename", "scene_label", "identifier", "source_label")
FOLD_COLUMNS = ("filename", "scene_label")
SUBSET_FOLDERS = ("split_setup", "evaluation_setup")  #: where DCASE 2024 subset files are looked for
_SUBSET_NAME = re.compile(r"split(\d+)\.csv")
_SHOWN = 3  # file names quoted in a problem message


@dataclass(frozen=True)
class _Row:
    filename: str
    label: str | None
    identifier: str | None = None
    source: str | None = None


@dataclass
class _Layout:
    root: Path
    meta: dict[str, _Row] | None
    splits: dict[str, list[_Row]]


def read_tau(
    root: str | Path, *, missing_audio: Literal["error", "skip"] = "error", fold: int = 1
) -> ClipSet:
    """The splits ("train", "evaluate", "test", or "all" without fold files) of a TAU folder.

    ``missing_audio="skip"`` reads a partial download: listed clips without an audio file are
    dropped and counted in ``ClipSet.extra["skipped_missing_audio"]``.
    """
    if missing_audio not in ("error", "skip"):
        raise ValueError(f"missing_audio must be 'error' or 'skip', not {missing_audio!r}")
    root = Path(root).absolute()
    layout, problems = _scan(root, fold)
    errors = [problem for problem in problems if problem.severity == "error"]
    if errors or layout is None:  # _scan records an error whenever it returns no layout
        raise errors[0].to_error()
    meta = layout.meta or {}
    splits = {
        name: [_clip(root, row, meta.get(row.filename)) for row in rows]
        for name, rows in layout.splits.items()
    }
    listed = dict.fromkeys(clip.path for clips in splits.values() for clip in clips)
    missing = [path for path in listed if not path.is_file()]
    extra: dict[str, str] = {}
    if missing:
        counted = f"{len(missing)} of {len(listed)} listed audio files are missing"
        if missing_audio == "error" or len(missing) == len(listed):
            fix = f"download and extract every audio archive into {root / 'audio'}"
            if missing_audio == "error":
                fix += ", or set data.missing_audio=skip (asc evaluate --skip-missing) to use the files present"
            raise DatasetError(missing[0], f"audio file not found ({counted})", fix)
        absent = set(missing)
        splits = {
            name: [clip for clip in clips if clip.path not in absent]
            for name, clips in splits.items()
        }
        extra = {"skipped_missing_audio": str(len(missing)), "first_missing_audio": str(missing[0])}
    if layout.meta is not None:
        labels = label_vocabulary(row.label for row in layout.meta.values())
    else:
        labels = label_vocabulary(row.label for rows in layout.splits.values() for row in rows)
    return ClipSet(splits=splits, labels=labels, root=root, extra=extra)


def check_tau(
    root: str | Path, *, decode: bool = False, fold: int = 1, progress: bool = False
) -> list[Problem]:
    """Everything wrong with a TAU folder: layout, tables, missing and unreadable audio.

    Every present audio file is probed (header only); ``decode=True`` also decodes it, which finds
    truncated data the header does not reveal.
    """
    root = Path(root).absolute()
    layout, problems = _scan(root, fold)
    if layout is None:
        return problems
    listed = (row.filename for rows in layout.splits.values() for row in rows)
    filenames = list(dict.fromkeys([*(layout.meta or {}), *listed]))
    paths = [root / name for name in filenames]
    present = [path for path in paths if path.is_file()]
    if len(present) < len(paths):
        missing = [name for name, path in zip(filenames, paths, strict=True) if not path.is_file()]
        first = ", ".join(missing[:_SHOWN])
        message = f"{len(missing)} of {len(paths)} listed audio files are missing (first: {first})"
        fix = (
            f"download and extract every audio archive into {root / 'audio'}, or set "
            "data.missing_audio=skip (asc evaluate --skip-missing) to use only the files present"
        )
        problems.append(_error(root / "audio", message, fix))
    problems.extend(probe_files(present, root / "audio", decode=decode, progress=progress))
    return problems


def describe(clipset: ClipSet) -> str:
    """Per-split clip counts by device and by class, as two plain-text tables."""
    clips = [clip for split in clipset.splits.values() for clip in split]
    devices: list[str | None] = [*device_vocabulary(clip.device for clip in clips)]
    unlisted = {clip.label for clip in clips if clip.label is not None} - set(clipset.labels)
    classes: list[str | None] = [*clipset.labels, *sorted(unlisted)]
    if any(clip.label is None for clip in clips):
        classes.append(None)
    splits = clipset.splits.items()
    by_device: dict[str, Counter[str | None]] = {
        name: Counter(clip.device for clip in split) for name, split in splits
    }
    by_class = {name: Counter(clip.label for clip in split) for name, split in splits}
    class_lines = _count_table("class", classes, by_class)
    if not has_devices(clips):  # one "unknown" row would only repeat the totals
        return "\n".join(class_lines)
    return "\n".join([*_count_table("device", devices, by_device), "", *class_lines])


def _count_table(
    title: str, keys: list[str | None], counts: dict[str, Counter[str | None]]
) -> list[str]:
    """Rows ``keys`` (None → "(unlabelled)") plus a total, one right-aligned column per split."""
    rows = [[title, *counts]]
    for key in keys:
        rows.append([key or "(unlabelled)", *(str(count[key]) for count in counts.values())])
    rows.append(["total", *(str(count.total()) for count in counts.values())])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            [
                row[0].ljust(widths[0]),
                *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)),
            ]
        )
        for row in rows
    ]


def segment_and_device(filename: str) -> tuple[str | None, str]:
    """``scene-city-location-segment[-index]-device`` → (everything before the device, device)."""
    stem = PurePosixPath(filename).stem
    if "-" not in stem:
        return None, UNKNOWN_DEVICE
    segment, device = stem.rsplit("-", 1)
    return segment, device


def _clip(root: Path, row: _Row, meta: _Row | None) -> Clip:
    segment, device = segment_and_device(row.filename)
    identifier = meta.identifier if meta is not None else row.identifier
    label = row.label if row.label is not None else (meta.label if meta is not None else None)
    return Clip(
        path=root / row.filename,
        label=label,
        device=device,
        city=identifier.split("-")[0] if identifier else None,
        segment=segment,
    )


def _scan(root: Path, fold: int) -> tuple[_Layout | None, list[Problem]]:
    """Parse and cross-check the tables; the layout is None when it cannot be read at all."""
    problems: list[Problem] = []
    if not root.is_dir():
        problem = "dataset folder not found" if not root.exists() else "not a folder"
        problems.append(
            _error(root, problem, "pass the folder holding meta.csv and evaluation_setup/")
        )
        return None, problems
    setup = root / "evaluation_setup"
    candidates = {
        "train": [setup / f"fold{fold}_train.csv"],
        "evaluate": [setup / f"fold{fold}_evaluate.csv"],
        "test": [setup / f"fold{fold}_test.csv", setup / "test.csv"],
    }
    fold_files = {
        split: next(path for path in paths if path.is_file())
        for split, paths in candidates.items()
        if any(path.is_file() for path in paths)
    }
    evaluation_set = set(fold_files) == {"test"}
    meta_path = root / "meta.csv"
    meta: dict[str, _Row] | None = None
    if meta_path.is_file():
        required = FOLD_COLUMNS[:1] if evaluation_set else FOLD_COLUMNS
        meta = _load_table(meta_path, META_COLUMNS, required, problems)
    elif not evaluation_set:
        problems.append(_missing_meta(root, meta_path, bool(fold_files)))
        return None, problems
    splits: dict[str, list[_Row]] = {}
    for split, path in fold_files.items():
        required = FOLD_COLUMNS[:1] if split == "test" else FOLD_COLUMNS
        rows = _load_table(path, FOLD_COLUMNS, required, problems)
        if rows is not None:
            splits[split] = list(rows.values())
            if meta is not None:
                _cross_check(path, rows, meta, problems)
    for name, path in _subset_files(root).items():
        rows = _load_table(path, FOLD_COLUMNS, FOLD_COLUMNS[:1], problems)
        if rows is not None:
            splits[name] = list(rows.values())
            if meta is not None:
                _cross_check(path, rows, meta, problems)
            _check_subset(path, rows, splits, problems)
    if not fold_files and meta is not None:
        splits["all"] = list(meta.values())
    if meta is not None:
        _check_devices(meta_path, meta, problems)
    return _Layout(root=root, meta=meta, splits=splits), problems


def _subset_files(root: Path) -> dict[str, Path]:
    """``{"split5": path, …}`` in percentage order; split_setup/ wins over evaluation_setup/."""
    found: dict[int, Path] = {}
    for folder in reversed(SUBSET_FOLDERS):
        if (root / folder).is_dir():
            for path in (root / folder).iterdir():
                if (match := _SUBSET_NAME.fullmatch(path.name)) and path.is_file():
                    found[int(match[1])] = path
    return {f"split{percent}": found[percent] for percent in sorted(found)}


def _check_subset(path: Path, rows: dict[str, _Row], splits: dict[str, list[_Row]],
                  problems: list[Problem]) -> None:
    """A training subset must lie inside the training split: anything else trains on test clips."""
    if "train" not in splits:
        return
    train = {row.filename for row in splits["train"]}
    if outside := [name for name in rows if name not in train]:
        first = ", ".join(outside[:_SHOWN])
        message = f"{len(outside)} of {len(rows)} files are not in the training split (first: {first})"
        fix = "use the subset files made for this dataset's fold1_train.csv (DCASE 2024 split_setup/)"
        problems.append(_error(path, message, fix))


def _missing_meta(root: Path, meta_path: Path, has_folds: bool) -> Problem:
    nested = sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and ((p / "meta.csv").is_file() or (p / "evaluation_setup").is_dir())
    )
    if nested:
        fix = f"pass the dataset folder itself, e.g. {root / nested[0]}"
        if len(nested) > 1:
            fix += f" (candidates: {', '.join(nested)})"
    else:
        fix = "extract the dataset's meta archive into this folder"
    problem = (
        "meta.csv not found"
        if has_folds
        else "not a TAU dataset folder: no meta.csv and no evaluation_setup/"
    )
    problem += f" (expected a tab-separated table with columns {' '.join(META_COLUMNS)})"
    return Problem(meta_path, problem, "error", fix)


def _load_table(
    path: Path, expected: tuple[str, ...], required: tuple[str, ...], problems: list[Problem]
) -> dict[str, _Row] | None:
    """Rows by file name (duplicates dropped), or None after recording why the table is unusable."""
    table = read_rows(path)
    header, rows = table.header, table.rows
    columns = f"expected: {' '.join(expected)}; found: {' '.join(header)}"
    restore = "restore it from the dataset's meta archive"
    if not header:
        problems.append(_error(path, "table is empty", restore))
        return None
    if table.sep not in (None, "\t"):
        sep = separator_name(table.sep)
        message = f"wrong separator: {sep}-separated, but TAU tables are tab-separated"
        problems.append(_error(path, message, "save it with tabs between the columns"))
        return None
    if absent := [column for column in required if column not in header]:
        message = f"missing column(s) {', '.join(absent)} ({columns})"
        problems.append(_error(path, message, "rename the header columns to the expected names"))
        return None
    absent = [column for column in expected if column not in header]
    if absent and path.name == "meta.csv":
        message = f"missing column(s) {', '.join(absent)} ({columns})"
        problems.append(_warning(path, message, "cities are unknown without 'identifier'"))
    if not rows:
        problems.append(_error(path, "table has a header but no rows", restore))
        return None
    ragged = [line for line, row in zip(table.lines, rows, strict=True) if len(row) != len(header)]
    if ragged:
        message = (
            f"{len(ragged)} row(s) do not have {len(header)} fields (first at line {ragged[0]})"
        )
        problems.append(_error(path, message, "separate the columns by single tabs"))
        return None
    position = {name: header.index(name) for name in expected if name in header}

    def cell(row: list[str], name: str) -> str | None:
        return (row[position[name]] or None) if name in position else None

    by_name: dict[str, _Row] = {}
    duplicates: list[str] = []
    conflicts: list[str] = []
    for row in rows:
        fields = (cell(row, name) for name in ("scene_label", "identifier", "source_label"))
        record = _Row(cell(row, "filename") or "", *fields)
        previous = by_name.setdefault(record.filename, record)
        if previous is record:
            continue
        if previous.label != record.label:
            conflicts.append(f"{record.filename} ({previous.label} vs {record.label})")
        else:
            duplicates.append(record.filename)
    if conflicts:
        message = f"{len(conflicts)} file(s) listed more than once with different labels"
        problems.append(_error(path, f"{message} (first: {conflicts[0]})", "keep one row per file"))
        return None
    if duplicates:
        message = f"{len(duplicates)} duplicate row(s) ignored (first: {duplicates[0]})"
        problems.append(_warning(path, message, "remove the repeated rows"))
    return by_name


def _cross_check(
    path: Path, rows: dict[str, _Row], meta: dict[str, _Row], problems: list[Problem]
) -> None:
    same_archive = "extract meta.csv and evaluation_setup/ from the same meta archive"
    if unknown := [name for name in rows if name not in meta]:
        first = ", ".join(unknown[:_SHOWN])
        message = f"{len(unknown)} of {len(rows)} files are not in meta.csv (first: {first})"
        problems.append(_error(path, message, same_archive))
    disagree = [
        f"{name} ({row.label} here, {meta[name].label} in meta.csv)"
        for name, row in rows.items()
        if name in meta and row.label is not None and row.label != meta[name].label
    ]
    if disagree:
        message = f"{len(disagree)} label(s) disagree with meta.csv (first: {disagree[0]})"
        problems.append(_error(path, message, same_archive))


def _check_devices(path: Path, meta: dict[str, _Row], problems: list[Problem]) -> None:
    """Devices come from file names; a source_label saying otherwise means renamed files."""
    disagree = [
        f"{row.filename} (source_label {row.source})"
        for row in meta.values()
        if row.source is not None
        and segment_and_device(row.filename)[1] not in (row.source, UNKNOWN_DEVICE)
    ]
    if disagree:
        message = f"{len(disagree)} file name device(s) disagree with source_label"
        fix = "devices are taken from the file names; check the files were not renamed"
        problems.append(_warning(path, f"{message} (first: {disagree[0]})", fix))


def _error(path: Path, message: str, fix: str) -> Problem:
    return Problem(path, message, "error", fix)


def _warning(path: Path, message: str, fix: str) -> Problem:
    return Problem(path, message, "warning", fix)
