"""Datasets described by a CSV table or a class-per-folder tree, loaded without writing code.

Column names, separators and fold assignments are options, so a collection such as ESC-50 or a
user's own recordings becomes a :class:`ClipSet` with the same shape the TAU reader produces.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from asc.data.clips import TAU_SCENES, UNKNOWN_DEVICE, Clip, ClipSet
from asc.errors import DatasetError

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
    label_column: str | None = "scene_label",
    device_column: str | None = None,
    fold_column: str | None = None,
    eval_folds: Sequence[object] = (),
    test_folds: Sequence[object] = (),
    sep: str | None = None,
) -> ClipSet:
    """Clips listed in a CSV/TSV table, split by fold.

    Rows whose fold is in ``eval_folds`` go to "evaluate", those in ``test_folds`` to "test", the
    rest to "train"; without a fold column everything is "train". ``label_column=None`` reads an
    unlabelled collection.
    """
    csv_path = Path(csv_path)
    root = Path(audio_root) if audio_root is not None else csv_path.parent
    table = read_rows(csv_path, sep)
    header, rows, sep = table.header, table.rows, table.sep
    if not header:
        raise DatasetError(csv_path, "table is empty", "write a header row and one row per clip")
    if not rows:
        raise DatasetError(csv_path, "table has a header but no rows", "add one row per clip")
    options = {
        "path_column": path_column,
        "label_column": label_column,
        "device_column": device_column,
        "fold_column": fold_column,
    }
    for option, column in options.items():
        if column is not None and column not in header:
            layout = f"{separator_name(sep)}-separated " if sep else ""
            raise DatasetError(
                csv_path,
                f"no column {column!r} ({layout}columns found: {', '.join(header)})",
                f"pass {option}= naming one of the columns found",
            )
    eval_keys = {str(fold) for fold in eval_folds}
    test_keys = {str(fold) for fold in test_folds}
    if eval_keys & test_keys:
        raise DatasetError(
            csv_path,
            f"folds {sorted(eval_keys & test_keys)} are both evaluation and test folds",
            "give each fold to at most one of eval_folds and test_folds",
        )
    if (eval_keys or test_keys) and fold_column is None:
        raise DatasetError(
            csv_path, "eval_folds/test_folds given without a fold column", "pass fold_column="
        )
    position = {name: index for index, name in enumerate(header)}
    splits: dict[str, list[Clip]] = {}
    for line, row in zip(table.lines, rows, strict=True):
        if len(row) != len(header):
            raise DatasetError(
                csv_path,
                f"line {line} has {len(row)} fields but the header has {len(header)}",
                f"fix that line (separator: {separator_name(sep or ',')})",
            )
        cell = {name: row[index] for name, index in position.items()}
        split = "train"
        if fold_column is not None:
            fold = cell[fold_column]
            split = "evaluate" if fold in eval_keys else "test" if fold in test_keys else "train"
        label = (cell[label_column] or None) if label_column is not None else None
        device = (cell[device_column] or UNKNOWN_DEVICE) if device_column else UNKNOWN_DEVICE
        clip = Clip(path=(root / cell[path_column]).absolute(), label=label, device=device)
        splits.setdefault(split, []).append(clip)
    _require_audio([clip for clips in splits.values() for clip in clips], csv_path, "audio_root")
    labels = label_vocabulary(clip.label for clips in splits.values() for clip in clips)
    return ClipSet(splits=splits, labels=labels, root=root.absolute())


def read_folder(
    root: str | Path, *, extensions: Sequence[str] = (".wav", ".flac", ".ogg")
) -> ClipSet:
    """A class-per-subfolder tree (searched recursively per class) as one "train" split."""
    root = Path(root)
    if not root.is_dir():
        problem = "folder not found" if not root.exists() else "not a folder"
        raise DatasetError(
            root, problem, "pass a folder with one subfolder of audio files per class"
        )
    suffixes = {ext.lower() for ext in extensions}
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
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
    return ClipSet(
        splits={"train": clips},
        labels=label_vocabulary(c.label for c in clips),
        root=root.absolute(),
    )


def _require_audio(clips: Sequence[Clip], table: Path, option: str) -> None:
    missing = [clip.path for clip in clips if not clip.path.is_file()]
    if missing:
        raise DatasetError(
            missing[0],
            f"audio file not found ({len(missing)} of {len(clips)} files listed in {table.name} "
            "are missing)",
            f"check that {option} points at the folder the paths in {table.name} are relative to",
        )
