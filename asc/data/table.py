"""Datasets described by a CSV table or a class-per-folder tree, loaded without writing code.

Column names, separators and fold assignments are options, so a collection such as ESC-50 or a
user's own recordings becomes a :class:`ClipSet` with the same shape the TAU reader produces.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from string import Formatter
from typing import Literal

from asc.data.clips import TAU_SCENES, UNKNOWN_DEVICE, Clip, ClipSet
from asc.data.splits import split_by_folds
from asc.errors import ConfigError, DatasetError

SEPARATORS = ("\t", ",", ";")
_SEPARATOR_NAMES = {"\t": "tab", ",": "comma", ";": "semicolon"}


def separator_name(sep: str) -> str:
    return _SEPARATOR_NAMES.get(sep, repr(sep))


def sniff_separator(header: str) -> str | None:
    """The separator a header line uses, or None for a single-column table.

    Counting candidates in the header is more predictable than ``csv.Sniffer``, which guesses from
    the body and is fooled by commas inside file names.
    """
    counts = {sep: header.count(sep) for sep in SEPARATORS}
    best = max(SEPARATORS, key=lambda sep: counts[sep])
    return best if counts[best] else None


@dataclass(frozen=True)
class Rows:
    """A parsed table: body rows keep their line numbers so errors can point into the file."""

    header: list[str]
    rows: list[list[str]]
    lines: list[int]
    sep: str | None


def read_rows(path: Path, sep: str | None = None) -> Rows:
    """Parse a table, sniffing the separator unless given; blank lines are dropped.

    Reads with ``utf-8-sig`` and ``newline=""`` so BOMs and CRLF line ends (both occur in the TAU
    releases) never leak into column names or values.
    """
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise DatasetError(path, "table not found", "check the path") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(path, f"cannot read table ({error})", "save it as UTF-8 text") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        return Rows([], [], [], sep)
    if sep is None:
        sep = sniff_separator(lines[0])
    reader = csv.reader(lines, delimiter=sep or "\t")
    records = [
        ([cell.strip() for cell in row], reader.line_num)
        for row in reader
        if any(c.strip() for c in row)
    ]
    header = records[0][0]
    return Rows(header, [row for row, _ in records[1:]], [line for _, line in records[1:]], sep)


def label_vocabulary(labels: Iterable[str | None]) -> list[str]:
    """Distinct labels in the challenge order when they are TAU scenes, else alphabetically.

    A fixed order keeps class indices stable across runs and datasets, so checkpoints trained on
    one TAU release classify another without a label remapping.
    """
    distinct = {label for label in labels if label is not None}
    if distinct <= set(TAU_SCENES):
        return [scene for scene in TAU_SCENES if scene in distinct]
    return sorted(distinct)


def read_table(
    csv_path: str | Path,
    *,
    audio_root: str | Path | None = None,
    path_column: str = "filename",
    path_template: str | None = None,
    label_column: str | None = "scene_label",
    device_column: str | None = None,
    device_pattern: str | None = None,
    fold_column: str | None = None,
    split_column: str | None = None,
    train_folds: Sequence[object] | None = None,
    eval_folds: Sequence[object] | None = (),
    test_folds: Sequence[object] = (),
    sep: str | None = None,
    missing_audio: Literal["error", "skip"] = "error",
) -> ClipSet:
    """Clips listed in a CSV/TSV table, split by fold or by a split column.

    Rows whose fold is in ``eval_folds`` go to "evaluate", those in ``test_folds`` to "test", the
    rest (or those in ``train_folds``) to "train"; ``eval_folds=None`` holds out the last fold. A
    split column names each row's split directly; with neither, everything is "train".
    ``path_template`` builds the path from any columns (``"fold{fold}/{slice_file_name}"``); the
    device comes from a column, from ``device_pattern`` matched on the file name, or is unknown.
    ``label_column=None`` reads an unlabelled collection.
    """
    csv_path = Path(csv_path)
    root = Path(audio_root) if audio_root is not None else csv_path.parent
    if csv_path.is_dir():
        raise DatasetError(csv_path, "is a folder, not a table", "pass the CSV/TSV file, or data.format=folders")
    table = read_rows(csv_path, sep)
    columns = {
        "label_column": label_column, "device_column": device_column, "fold_column": fold_column,
        "split_column": split_column, "path_column": None if path_template else path_column,
    }
    _require_columns(table, csv_path, columns, _template_fields(path_template, csv_path) if path_template else [])
    if fold_column is None and (eval_folds or test_folds or train_folds):
        raise DatasetError(csv_path, "eval_folds/train_folds/test_folds given without a fold column",
                           "set data.fold_column=")
    device_regex = _device_regex(device_pattern)
    position = {name: index for index, name in enumerate(table.header)}
    clips: list[Clip] = []
    split_of: dict[Path, str] = {}
    first_line: dict[Path, int] = {}
    for line, row in zip(table.lines, table.rows, strict=True):
        if len(row) != len(table.header):
            raise DatasetError(
                csv_path,
                f"line {line} has {len(row)} fields but the header has {len(table.header)}",
                f"fix that line (separator: {separator_name(table.sep or ',')})",
            )
        cell = {name: row[index] for name, index in position.items()}
        relative = path_template.format_map(cell) if path_template else cell[path_column]
        path = (root / relative).absolute()
        if path in first_line:
            raise DatasetError(csv_path, f"line {line} lists {relative} again (first at line {first_line[path]})",
                               "keep one row per audio file")
        first_line[path] = line
        device, segment = UNKNOWN_DEVICE, None
        if device_column:
            device = cell[device_column] or UNKNOWN_DEVICE
        elif device_regex is not None:
            device, segment = _device_from_name(device_regex, path.name)
        label = (cell[label_column] or None) if label_column is not None else None
        fold = cell[fold_column] if fold_column else None
        clips.append(Clip(path=path, label=label, device=device, segment=segment, fold=fold))
        if split_column:
            split_of[path] = cell[split_column] or "train"
    if device_regex is not None and all(clip.device == UNKNOWN_DEVICE for clip in clips):
        raise DatasetError(csv_path, f"data.device_pattern '{device_pattern}' matches none of the file names "
                           f"(first: {clips[0].path.name})", "fix the pattern or leave it unset")
    clips, extra = _present_audio(clips, csv_path, missing_audio)
    splits: dict[str, list[Clip]] = {"train": clips}
    if split_column:
        splits = {}
        for clip in clips:
            splits.setdefault(split_of[clip.path], []).append(clip)
    elif fold_column and (eval_folds is None or eval_folds or test_folds or train_folds is not None):
        splits = split_by_folds(clips, csv_path, train_folds=train_folds, eval_folds=eval_folds,
                                test_folds=test_folds)
    labels = label_vocabulary(clip.label for clip in clips)
    return ClipSet(splits=splits, labels=labels, root=root.absolute(), extra=extra)


def _require_columns(table: Rows, path: Path, options: dict[str, str | None], template_fields: list[str]) -> None:
    """A table with rows and every column the options name; the error lists the columns found."""
    if not table.header:
        raise DatasetError(path, "table is empty", "write a header row and one row per clip")
    if not table.rows:
        raise DatasetError(path, "table has a header but no rows", "add one row per clip")
    wanted = [(option, column) for option, column in options.items() if column is not None]
    wanted += [("path_template", field) for field in template_fields]
    layout = f"{separator_name(table.sep)}-separated " if table.sep else ""
    for option, column in wanted:
        if column not in table.header:
            raise DatasetError(
                path,
                f"no column {column!r} ({layout}columns found: {', '.join(table.header)})",
                f"set data.{option}= to one of the columns found"
                + ("" if table.sep else ", or data.separator if the columns are not separated by tab, comma or ;"),
            )


def _template_fields(template: str, table: Path) -> list[str]:
    try:
        fields = [field for _, field, _, _ in Formatter().parse(template) if field is not None]
    except ValueError as error:
        raise DatasetError(table, f"data.path_template {template!r} is not a valid template ({error})",
                           "write columns in braces, e.g. fold{fold}/{slice_file_name}") from None
    if not fields or "" in fields:
        raise DatasetError(table, f"data.path_template {template!r} names no column",
                           "write columns in braces, e.g. fold{fold}/{slice_file_name}")
    return fields


def _device_regex(pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ConfigError(f"data.device_pattern '{pattern}' is not a regular expression ({error}); "
                          r"e.g. data.device_pattern='-(\w+)\.wav$' for a device after the last '-'") from None


def _device_from_name(regex: re.Pattern[str], name: str) -> tuple[str, str | None]:
    """(device, segment): the pattern's "device" group, else group 1, else the whole match; the
    segment is the file name without the whole match (and its extension), so the recordings of one
    segment by several devices pair up for device translation."""
    match = regex.search(name)
    if match is None:
        return UNKNOWN_DEVICE, None
    group: int | str = "device" if "device" in regex.groupindex else 1 if regex.groups else 0
    rest = name[:match.start()] + name[match.end():]
    return match.group(group) or UNKNOWN_DEVICE, PurePosixPath(rest).stem or None


def read_folder(
    root: str | Path,
    *,
    extensions: Sequence[str] = (".wav", ".flac", ".ogg"),
) -> ClipSet:
    """A class-per-subfolder tree (searched recursively per class), or split folders above them.

    ``root/train/<class>/…`` and ``root/test/<class>/…`` (any of :data:`SPLIT_FOLDERS`, as long as
    every subfolder of ``root`` is one) become splits named after the folders; a plain
    ``root/<class>/…`` tree becomes one "train" split that the caller may divide into folds.
    """
    root = Path(root)
    if not root.is_dir():
        problem = "folder not found" if not root.exists() else "not a folder"
        raise DatasetError(
            root, problem, "pass a folder with one subfolder of audio files per class"
        )
    suffixes = {ext.lower() for ext in extensions}
    subfolders = _subfolders(root)
    names = {folder.name.lower() for folder in subfolders}
    if names and names <= SPLIT_FOLDERS and "train" in names:
        splits = {folder.name: _class_clips(folder, suffixes) for folder in subfolders}
    else:
        splits = {"train": _class_clips(root, suffixes)}
    return ClipSet(
        splits=splits,
        labels=label_vocabulary(c.label for clips in splits.values() for c in clips),
        root=root.absolute(),
    )


#: Folder names that mark a split level above the class folders.
SPLIT_FOLDERS = frozenset({"train", "training", "evaluate", "evaluation", "eval", "val", "valid",
                           "validation", "dev", "development", "test", "testing"})


def _subfolders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_clips(root: Path, suffixes: set[str]) -> list[Clip]:
    class_dirs = _subfolders(root)
    clips: list[Clip] = []
    for class_dir in class_dirs:
        files = sorted(
            p
            for p in class_dir.rglob("*")
            if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".")
        )
        clips.extend(Clip(path=p.absolute(), label=class_dir.name) for p in files)
    if not clips:
        loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in suffixes]
        if class_dirs:
            problem = (
                f"no {'/'.join(sorted(suffixes))} files in any of the {len(class_dirs)} subfolders"
            )
        elif loose:
            problem = f"{len(loose)} audio files lie directly in the folder, in no class subfolder"
        else:
            problem = "folder is empty" if not any(root.iterdir()) else "no class subfolders"
        raise DatasetError(
            root, problem, "put each class's audio files in a subfolder named after the class"
        )
    return clips


def _present_audio(clips: list[Clip], table: Path, missing_audio: str) -> tuple[list[Clip], dict[str, str]]:
    """The clips whose audio exists; a missing file is an error unless ``missing_audio="skip"``."""
    missing = [clip.path for clip in clips if not clip.path.is_file()]
    if not missing:
        return clips, {}
    if missing_audio == "error" or len(missing) == len(clips):
        fix = (f"check that data.audio_dir (and data.path_template) point at the files {table.name} lists"
               + (", or set data.missing_audio=skip to use the files present" if missing_audio == "error" else ""))
        raise DatasetError(
            missing[0],
            f"audio file not found ({len(missing)} of {len(clips)} files listed in {table.name} are missing)",
            fix,
        )
    absent = set(missing)
    present = [clip for clip in clips if clip.path not in absent]
    return present, {"skipped_missing_audio": str(len(missing)), "first_missing_audio": str(missing[0])}
