"""``asc classify``: label many files and folders with one bundle, and print the answers.

Batch work over user files must not stop at the first bad one: each unreadable file becomes one
:class:`Failure` line ("PATH: problem; fix") and the rest are still classified, so the caller can
print every answer and then exit non-zero. Torch-free, like :mod:`asc.runtime` underneath it.

With a bundle of device-specific models, every file is classified by one named device's model,
or (``device="auto"``) by the model of the device its TAU-style name ends with.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import soundfile as sf
from tqdm import tqdm

from asc.bundle_manifest import MANIFEST_NAME, BundleManifest
from asc.data.clips import UNKNOWN_DEVICE
from asc.data.tau import segment_and_device
from asc.errors import AscError, ConfigError
from asc.run_files import DIGEST_KEY, deployed_file, file_digest
from asc.runtime import Classifier, ClipResult, Prediction

OutputFormat = Literal["table", "json", "csv"]
FORMATS: tuple[str, ...] = ("table", "json", "csv")
AUTO_DEVICE = "auto"  #: ``device`` value that reads each file's device from its name

# Extensions searched for inside folders, keyed to the libsndfile container that reads them; only
# those this soundfile build can decode are used. A file named on the command line is always tried.
_EXTENSION_FORMATS = {
    ".wav": "WAV", ".wave": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".oga": "OGG", ".opus": "OGG",
    ".mp3": "MP3", ".aif": "AIFF", ".aiff": "AIFF", ".aifc": "AIFF", ".au": "AU", ".snd": "AU",
    ".caf": "CAF", ".w64": "W64", ".rf64": "RF64",
}
AUDIO_EXTENSIONS: frozenset[str] = frozenset(
    ext for ext, container in _EXTENSION_FORMATS.items() if container in sf.available_formats()
)


@dataclass(frozen=True)
class Failure:
    """A path that produced no result, with the one-line message to print for it."""

    path: str
    message: str  #: "PATH: problem; fix"

    def __str__(self) -> str:
        return self.message


def find_audio_files(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[Path], list[Failure]]:
    """Expand files and folders into audio files, in argument order, each folder sorted.

    Folders are searched recursively for :data:`AUDIO_EXTENSIONS` (case-insensitive), skipping
    hidden entries such as macOS ``._x.wav`` resource forks, which are not audio. A missing
    path or a folder without audio is a failure rather than silently nothing.
    """
    files: list[Path] = []
    failures: list[Failure] = []
    seen: set[Path] = set()

    def add(file: Path) -> None:
        key = file.resolve()
        if key not in seen:
            seen.add(key)
            files.append(file)

    for argument in paths:
        path = Path(argument)
        if path.is_dir():
            found = sorted(
                file for file in path.rglob("*")
                if file.suffix.lower() in AUDIO_EXTENSIONS and file.is_file()
                and not any(part.startswith(".") for part in file.relative_to(path).parts)
            )
            if not found:
                extensions = ", ".join(sorted(ext.lstrip(".") for ext in AUDIO_EXTENSIONS))
                failures.append(Failure(str(path), f"{path}: no audio files ({extensions}) in this folder; "
                                                   "point at a folder of recordings"))
            for file in found:
                add(file)
        elif path.exists():
            add(path)
        else:
            failures.append(Failure(str(path), f"{path}: no such file or folder; check the path"))
    return files, failures


def stale_bundle(run_dir: str | os.PathLike[str], bundle_dir: str | os.PathLike[str]) -> str | None:
    """Why ``bundle_dir``, exported from ``run_dir``, no longer holds the run's model; None while it does.

    The run's model changes when it is trained further or compressed (a ``finalized.pt2`` appears).
    With the digest the exporter records (:data:`DIGEST_KEY`) the answer is exact; a bundle without
    it is stale when the model file is newer than its ``bundle.json``, which the exporter writes after
    reading the model. A run whose model file is gone cannot be compared, so its bundle is kept.
    """
    bundle_dir = Path(bundle_dir)
    source = BundleManifest.read(bundle_dir).source
    checkpoint = deployed_file(run_dir, str(source.get("checkpoint") or "last"))
    if not checkpoint.is_file():
        return None
    recorded = source.get(DIGEST_KEY)
    if recorded is not None:
        if recorded == file_digest(checkpoint):
            return None
        return f"{bundle_dir} holds an older model than {checkpoint} (its digest changed since the export)"
    if checkpoint.stat().st_mtime > (bundle_dir / MANIFEST_NAME).stat().st_mtime:
        return f"{bundle_dir} holds an older model than {checkpoint} (written after the export)"
    return None


def file_device(path: str | os.PathLike[str]) -> str | None:
    """The recording device a TAU-style file name ends with (``...-a.wav`` → ``a``), None without one."""
    _, device = segment_and_device(Path(path).name)
    return None if device == UNKNOWN_DEVICE else device


def classify_paths(
    classifier: Classifier,
    paths: Iterable[str | os.PathLike[str]],
    *,
    windows: bool = False,
    top_k: int = 3,
    progress: bool = True,
    device: str | None = None,
) -> tuple[list[ClipResult], list[Failure]]:
    """Classify every audio file under ``paths``; bad files become failures, the rest go on.

    ``device`` names the recording device of every file (its model answers when the bundle has
    one, else the general model); :data:`AUTO_DEVICE` takes each file's from its name
    (:func:`file_device`). Per-window answers are kept only with ``windows``, so a run over
    thousands of long files does not hold every window in memory. The progress bar appears only
    once the work lasts a moment.
    """
    if top_k < 1:
        raise ConfigError(f"top_k={top_k} must be >= 1")
    files, failures = find_audio_files(paths)
    results: list[ClipResult] = []
    for file in tqdm(files, desc="classify", unit="file", disable=not progress, delay=1.0, leave=False):
        try:
            result = classifier.classify_file(
                file, top_k=top_k, device=file_device(file) if device == AUTO_DEVICE else device)
        except AscError as error:
            failures.append(Failure(str(file), str(error)))
            continue
        results.append(result if windows else replace(result, windows=()))
    return results, failures


def format_results(results: Sequence[ClipResult], fmt: OutputFormat = "table", *, windows: bool = False,
                   failures: Sequence[Failure] = (), model: bool = False) -> str:
    """Render results as an aligned text table, a JSON array, or CSV with a header row.

    Each format carries the same facts: file, seconds, top label and probability, the other
    top-k labels, warnings, and, with ``windows``, one extra row (or JSON object) per window;
    with ``model`` (for a bundle with device models) also the model that answered.
    Machine-readable formats also carry every failed path with its error, so a script reading
    them sees every input; the table shows results only (errors go to stderr) and is empty,
    header included, when there are none.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "json":
        records = [_json_record(result, windows, model) for result in results]
        records += [{"file": failure.path, "error": failure.message} for failure in failures]
        return json.dumps(records, indent=2) + "\n"
    k = max((len(result.top) for result in results), default=1)
    if fmt == "csv":
        return _csv(results, windows, k, failures, model)
    return _table(results, windows, k, model) if results else ""


# ----------------------------------------------------------------------------------- formats


def _rows(result: ClipResult, windows: bool) -> list[tuple[str, float, float, tuple[Prediction, ...]]]:
    """(scope, start, end, top) for the whole recording, then its windows when asked."""
    rows = [("clip", 0.0, result.duration, result.top)]
    if windows:
        rows += [("window", window.start, window.end, window.top) for window in result.windows]
    return rows


def _json_top(top: tuple[Prediction, ...]) -> list[dict[str, Any]]:
    return [{"label": p.label, "probability": round(p.probability, 6)} for p in top]


def _json_record(result: ClipResult, windows: bool, model: bool) -> dict[str, Any]:
    record: dict[str, Any] = {
        "file": result.source,
        **({"model": result.model} if model else {}),
        "duration": round(result.duration, 6),
        "label": result.label,
        "probability": round(result.probability, 6),
        "top_k": _json_top(result.top),
        "warnings": list(result.warnings),
    }
    if windows:
        record["windows"] = [
            {"start": round(w.start, 6), "end": round(w.end, 6), "label": w.label,
             "probability": round(w.probability, 6), "top_k": _json_top(w.top)}
            for w in result.windows
        ]
    return record


def _csv(results: Sequence[ClipResult], windows: bool, k: int, failures: Sequence[Failure], model: bool) -> str:
    """One row per clip (and window); a failed path is a row with only its file and error."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["file", "scope", "start", "end", *(["model"] if model else []), "label", "probability"]
    for rank in range(2, k + 1):
        header += [f"label_{rank}", f"probability_{rank}"]
    header += ["warning", "error"]
    writer.writerow(header)
    for result in results:
        for scope, start, end, top in _rows(result, windows):
            cells = [result.source, scope, f"{start:.3f}", f"{end:.3f}", *([result.model] if model else [])]
            for prediction in top:
                cells += [prediction.label, f"{prediction.probability:.6f}"]
            cells += [""] * (len(header) - 2 - len(cells))
            writer.writerow(cells + ["; ".join(result.warnings) if scope == "clip" else "", ""])
    for failure in failures:
        writer.writerow([failure.path, "error"] + [""] * (len(header) - 3) + [failure.message])
    return buffer.getvalue()


def _table(results: Sequence[ClipResult], windows: bool, k: int, model: bool) -> str:
    """Left-aligned columns separated by two spaces; window rows leave the file and model columns blank."""
    header = ["file", "seconds", *(["model"] if model else []), "label", "probability"] + (
        [f"top-{k}"] if k > 1 else [])
    lines = [header]
    for result in results:
        for scope, start, end, top in _rows(result, windows):
            file = result.source if scope == "clip" else ""
            seconds = f"{end:.2f}" if scope == "clip" else f"{start:.2f}-{end:.2f}"
            row = [file, seconds, *([result.model if scope == "clip" else ""] if model else []), top[0].label,
                   f"{top[0].probability:.3f}"]
            if k > 1:
                row.append(", ".join(f"{p.label} {p.probability:.3f}" for p in top))
            lines.append(row)
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() + "\n"
        for line in lines
    )
