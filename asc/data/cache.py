"""Decode and resample a dataset once, into one memory-mapped array reused across runs.

One ``.npy`` of shape ``(n_clips, ...)`` per (dataset, rate, length) instead of one file per clip:
230k tiny files are slow to open and to copy, while a memory map is shared by all loader workers
and paged in on demand. A JSON manifest beside the array holds the key it was built for (source
files' sizes and mtimes, rate, length, front end); when the key changes the array is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from asc.audio import load_clip
from asc.data.clips import Clip
from asc.errors import AudioError
from asc.io import atomic_path, atomic_write_json

_VERSION = 1  # bump when the layout of cached arrays changes, so old caches are rebuilt


class _ArrayCache:
    """A read-only memory-mapped array whose rows are items; pickles as its path, not its data."""

    def __init__(self, path: Path, key: dict[str, Any], array: np.ndarray) -> None:
        self.path = path
        self.key = key
        self._array = array

    @property
    def shape(self) -> tuple[int, ...]:
        return self._array.shape

    def __len__(self) -> int:
        return self._array.shape[0]

    def __getitem__(self, index: int | slice) -> np.ndarray:
        return self._array[index]

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started with "spawn" receive the dataset pickled; sending the path
        # lets each worker map the same file instead of copying gigabytes through a pipe.
        return {"path": self.path, "key": self.key}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self.key = state["key"]
        self._array = np.load(self.path, mmap_mode="r")


class WaveformCache(_ArrayCache):
    """Mono float32 waveforms of shape ``(n_clips, num_samples)`` at one sample rate."""

    @classmethod
    def open(
        cls,
        clips: Sequence[Clip],
        sample_rate: int,
        num_samples: int,
        cache_dir: str | Path,
        *,
        progress: bool = True,
    ) -> WaveformCache:
        """The cache for these clips, decoded now only if no valid cache exists."""
        paths = [str(Path(clip.path).absolute()) for clip in clips]
        key = {
            "kind": "waveforms",
            "version": _VERSION,
            "sample_rate": sample_rate,
            "num_samples": num_samples,
            "n_clips": len(paths),
            "sources": _digest([[path, *_stat(path)] for path in paths]),
        }
        path = (
            Path(cache_dir) / f"waveforms-{sample_rate}hz-{num_samples}-{_digest(paths)[:16]}.npy"
        )
        array = _open_array(path, key)
        if array is None:
            batches = (
                (i, load_clip(p, sample_rate, num_samples)[np.newaxis]) for i, p in enumerate(paths)
            )
            shape = (len(paths), num_samples)
            array = _build_array(
                path, key, shape, np.float32, batches, progress=progress, desc="decoding audio"
            )
        return cls(path, key, array)


class FeatureCache(_ArrayCache):
    """Front-end outputs (e.g. log-mels ``(n_clips, 1, n_mels, frames)``) of a waveform cache."""

    @classmethod
    def open(
        cls,
        waveforms: WaveformCache,
        frontend: Callable[[np.ndarray], np.ndarray],
        frontend_key: dict[str, Any],
        cache_dir: str | Path,
        *,
        batch_size: int = 32,
        progress: bool = True,
    ) -> FeatureCache:
        """``frontend`` maps a waveform batch ``(B, samples)`` to features ``(B, ...)``.

        ``frontend_key`` (JSON-serialisable, e.g. the front end's config) stands for the
        front end: change it whenever the front end's output would change.
        """
        # Round-trip through JSON so the key compares equal to the manifest's (tuples → lists).
        frontend_key = json.loads(json.dumps(frontend_key))
        key = {
            "kind": "features",
            "version": _VERSION,
            "waveforms": waveforms.key,
            "frontend": frontend_key,
        }
        path = Path(cache_dir) / f"features-{_digest(frontend_key)[:12]}-{waveforms.path.stem}.npy"
        array = _open_array(path, key)
        if array is None:
            n = len(waveforms)

            def compute(rows: np.ndarray) -> np.ndarray:
                return np.asarray(frontend(np.asarray(rows, dtype=np.float32)), dtype=np.float32)

            # One row through the front end gives the feature shape before the array is allocated.
            probe = compute(waveforms[:1] if n else np.zeros((1, *waveforms.shape[1:]), np.float32))
            batches = ((s, compute(waveforms[s : s + batch_size])) for s in range(0, n, batch_size))
            shape = (n, *probe.shape[1:])
            array = _build_array(
                path, key, shape, np.float32, batches, progress=progress, desc="computing features"
            )
        return cls(path, key, array)


def _open_array(path: Path, key: dict[str, Any]) -> np.ndarray | None:
    """The array at ``path`` if its manifest holds exactly ``key``, else None."""
    try:
        manifest = json.loads(path.with_suffix(".json").read_text())
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    stored = (manifest.get("key"), manifest.get("shape"), manifest.get("dtype"))
    return array if stored == (key, list(array.shape), array.dtype.name) else None


def _build_array(
    path: Path,
    key: dict[str, Any],
    shape: tuple[int, ...],
    dtype: type[np.generic],
    fill_batches: Iterable[tuple[int, np.ndarray]],
    *,
    progress: bool,
    desc: str,
) -> np.ndarray:
    """Write ``(start_row, rows)`` batches into a new array; only a complete array gets a manifest.

    A stale array is deleted first (it may be gigabytes and is useless), and the new one is
    written under a temporary name and renamed, so an interrupted or failed build never leaves a
    file that looks like a cache.
    """
    manifest = path.with_suffix(".json")
    manifest.unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    with atomic_path(path) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        filled = 0
        try:
            with tqdm(total=shape[0], desc=desc, unit="clip", disable=not progress) as bar:
                for start, rows in fill_batches:
                    if (got := rows.shape[1:]) != shape[1:]:
                        raise ValueError(f"{desc}: rows of shape {got} do not fit {shape[1:]}")
                    array[start : start + len(rows)] = rows
                    filled += len(rows)
                    bar.update(len(rows))
            if filled != shape[0]:
                raise ValueError(f"{desc}: filled {filled} of {shape[0]} rows")
            array.flush()
        finally:
            del array
    atomic_write_json(manifest, {"key": key, "shape": list(shape), "dtype": np.dtype(dtype).name})
    return np.load(path, mmap_mode="r")


def _stat(path: str) -> tuple[int, int]:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise AudioError(
            path, "file not found", "restore it, or re-read the dataset to drop missing files"
        ) from None
    return info.st_size, info.st_mtime_ns


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
