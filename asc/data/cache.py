"""Decode and resample a dataset once, into one memory-mapped array reused across runs.

One ``.npy`` of shape ``(n_clips, ...)`` per (audio content, rate, length) instead of one file per
clip: 230k tiny files are slow to open and to copy, while a memory map is shared by all loader
workers and paged in on demand.

Arrays are keyed by **content**, not by where the files are: the key is a digest of the ordered
per-file content digests (blake2b of the bytes) plus rate and length (plus the front-end spec for
features), so the same corpus copied to another folder, regenerated, or touched maps to the same
array and is never stored twice. Hashing a file is much cheaper than decoding it, and each file's
digest is memoised in a small index in the cache (``index.json``) by (resolved path, size,
mtime_ns), so large datasets are hashed once, not every run. A JSON manifest beside each array
holds the key it was built for; an array whose manifest does not match (another format version,
a corrupt or partial file) is rebuilt.

The index also remembers which array each list of source files resolved to last; when the files
change, the array of their old content is deleted unless another list of files still resolves to
it, so editing a dataset does not leave its previous decode behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from asc.audio import load_clip
from asc.data.clips import Clip
from asc.errors import AscError, AudioError
from asc.io import atomic_path, atomic_write_json

CACHE_ENV = "ASC_CACHE"  #: environment variable that moves the default cache
INDEX_NAME = "index.json"  #: per-file digests and the array each list of files resolved to
SYNTHETIC_DIR = "synthetic"  #: synthetic corpora generated on demand live here by default
_VERSION = 2  # bump when the layout or keying of cached arrays changes, so old caches are rebuilt
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """``$ASC_CACHE``, else ``~/.cache/asc``: where caches go when ``data.cache_dir`` is unset."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "asc").expanduser()


# ---------------------------------------------------------------------------------- content digests


def file_digest(path: str | Path) -> str:
    """blake2b (128-bit) of a file's bytes: equal bytes, equal digest, wherever the file lives."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class DigestIndex:
    """Content digests of source files memoised by (resolved path, size, mtime_ns), in the cache.

    A file whose size or mtime changed is hashed again; an unchanged one costs one ``stat``.
    Written atomically; when two processes update it at once the last write wins, and what the
    other one added is only hashed again next time.
    """

    def __init__(self, cache_dir: str | Path) -> None:
        self.path = Path(cache_dir) / INDEX_NAME
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") != _VERSION:
                raise ValueError("other format")
            self.files: dict[str, list[Any]] = dict(data["files"])
            self.origins: dict[str, str] = dict(data["origins"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self.files, self.origins = {}, {}
        self._dirty = False

    def digests(self, paths: Sequence[str | Path], *, progress: bool = False) -> list[str]:
        """One content digest per path (in order); raises AudioError for a missing file."""
        stats = [_stat(path) for path in paths]
        resolved = [str(Path(path).resolve()) for path in paths]
        result: list[str | None] = []
        misses = []
        for i, (name, stat) in enumerate(zip(resolved, stats)):
            entry = self.files.get(name)
            hit = entry is not None and tuple(entry[:2]) == stat
            result.append(entry[2] if hit else None)
            if not hit:
                misses.append(i)
        for i in tqdm(misses, desc="hashing audio", unit="file", disable=not progress or not misses):
            result[i] = file_digest(paths[i])
            self.files[resolved[i]] = [*stats[i], result[i]]
            self._dirty = True
        return [digest for digest in result if digest is not None]

    def save(self) -> None:
        if self._dirty:
            atomic_write_json(self.path, {"version": _VERSION, "files": self.files, "origins": self.origins})
            self._dirty = False

    def resolve_origin(self, origin: str, name: str) -> str | None:
        """Record that ``origin`` (a list of source files) now maps to array ``name``.

        Returns the array it mapped to before when that array is now orphaned (no origin maps
        to it any more), so the caller can delete it; otherwise None.
        """
        previous = self.origins.get(origin)
        if previous == name:
            return None
        self.origins[origin] = name
        self._dirty = True
        if previous is None or previous in self.origins.values():
            return None
        return previous


# ---------------------------------------------------------------------------------- the arrays


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
        """The cache for these clips' contents, decoded now only if no valid cache exists."""
        cache_dir = Path(cache_dir)
        paths = [Path(clip.path) for clip in clips]
        index = DigestIndex(cache_dir)
        content = _digest(index.digests(paths, progress=progress))
        key = {
            "kind": "waveforms",
            "version": _VERSION,
            "sample_rate": sample_rate,
            "num_samples": num_samples,
            "n_clips": len(paths),
            "content": content,
        }
        path = cache_dir / f"waveforms-{sample_rate}hz-{num_samples}-{_digest(key)[:16]}.npy"
        origin = _digest(["waveforms", sample_rate, num_samples, [str(p.absolute()) for p in paths]])
        orphan = index.resolve_origin(origin, path.name)
        index.save()  # before decoding: a failed decode still keeps the digests
        if orphan is not None:
            _drop_array(cache_dir / orphan)
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
        front end: change it whenever the front end's output would change. The array is named
        after its waveforms, so it goes when they go.
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

    A stale array (wrong manifest, or any array of an older format version) is deleted first
    (it may be gigabytes and is useless), and the new one is written under a temporary name and
    renamed, so an interrupted or failed build never leaves a file that looks like a cache.
    """
    manifest = path.with_suffix(".json")
    manifest.unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    _drop_old_formats(path.parent)
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


def _drop_array(path: Path) -> None:
    """Delete a waveform array, its manifest and every feature array computed from it."""
    for victim in [path, *path.parent.glob(f"features-*-{path.stem}.npy")]:
        victim.with_suffix(".json").unlink(missing_ok=True)
        victim.unlink(missing_ok=True)


def _drop_old_formats(cache_dir: Path) -> None:
    """Delete arrays whose manifest names another format version: no current key can match them.

    Arrays without a readable manifest are left alone here: one may be a build of another
    process between its rename and its manifest write. ``asc cache clear`` removes them.
    """
    for entry in scan_cache(cache_dir):
        if entry.kind == "stale" and _manifest_version(entry.path) not in (None, _VERSION):
            entry.remove()


def _stat(path: str | Path) -> tuple[int, int]:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise AudioError(
            path, "file not found", "restore it, or re-read the dataset to drop missing files"
        ) from None
    return info.st_size, info.st_mtime_ns


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------- inspection


KINDS: tuple[str, ...] = ("waveforms", "features", "synthetic", "index", "stale", "partial", "other")
"""What a cache entry can be; ``other`` is anything asc did not write, which it never deletes."""


@dataclass(frozen=True)
class CacheEntry:
    """One top-level entry of the cache folder (an array with its manifest counts as one)."""

    path: Path
    kind: str
    bytes: int

    def remove(self) -> None:
        if self.path.is_dir() and not self.path.is_symlink():
            shutil.rmtree(self.path)
        else:
            self.path.unlink(missing_ok=True)
        if self.path.suffix == ".npy":
            self.path.with_suffix(".json").unlink(missing_ok=True)


@dataclass
class CacheUsage:
    """Where the cache is and what it holds, by kind."""

    root: Path
    entries: list[CacheEntry] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(entry.bytes for entry in self.entries)

    @property
    def arrays(self) -> int:
        return sum(entry.kind in ("waveforms", "features", "stale") for entry in self.entries)

    def by_kind(self) -> dict[str, tuple[int, int]]:
        """``{kind: (entries, bytes)}`` for every kind present, in :data:`KINDS` order."""
        totals = {kind: (0, 0) for kind in KINDS}
        for entry in self.entries:
            count, size = totals[entry.kind]
            totals[entry.kind] = (count + 1, size + entry.bytes)
        return {kind: value for kind, value in totals.items() if value[0]}


def scan_cache(cache_dir: str | Path) -> list[CacheEntry]:
    """Every top-level entry of ``cache_dir`` with its kind and size (empty if it does not exist)."""
    root = Path(cache_dir)
    if not root.exists():
        return []
    if not root.is_dir():
        raise AscError(f"{root}: the cache location is a file, not a folder; point the cache at a folder")
    entries = []
    for path in sorted(root.iterdir()):
        name = path.name
        if name.endswith(".json") and path.with_suffix(".npy").exists():
            continue  # a manifest counts with its array
        entries.append(CacheEntry(path, _kind(path), _size(path)))
    return entries


def cache_usage(cache_dir: str | Path) -> CacheUsage:
    return CacheUsage(Path(cache_dir), scan_cache(cache_dir))


def clear_cache(cache_dir: str | Path) -> CacheUsage:
    """Delete everything asc wrote in ``cache_dir``; returns what was deleted.

    Files asc did not write (kind ``other``) stay, so pointing the cache at a shared folder by
    mistake cannot wipe it.
    """
    removed = [entry for entry in scan_cache(cache_dir) if entry.kind != "other"]
    for entry in removed:
        entry.remove()
    return CacheUsage(Path(cache_dir), removed)


def _kind(path: Path) -> str:
    name = path.name
    if name == INDEX_NAME:
        return "index"
    if name == SYNTHETIC_DIR and path.is_dir():
        return "synthetic"
    if name.startswith((".waveforms-", ".features-", f".{INDEX_NAME}.")) and name.endswith(".tmp"):
        return "partial"  # left by a killed write (asc.io names temporary files so)
    for kind in ("waveforms", "features"):
        if name.startswith(f"{kind}-") and name.endswith(".json"):
            return "stale"  # a manifest whose array is gone (scan_cache counts the others with their array)
        if name.startswith(f"{kind}-") and name.endswith(".npy"):
            return kind if _manifest_version(path) == _VERSION else "stale"
    return "other"


def _manifest_version(path: Path) -> Any:
    """The format version in an array's manifest; None when it is missing or unreadable."""
    try:
        return json.loads(path.with_suffix(".json").read_text())["key"]["version"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        size = path.lstat().st_size
        if path.suffix == ".npy" and path.with_suffix(".json").exists():
            size += path.with_suffix(".json").stat().st_size
        return size
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir() or p.is_symlink())


def format_bytes(count: int) -> str:
    """``1.2 GB``-style sizes (powers of 1000, like ``du --si``)."""
    if count < 1000:
        return f"{count} B"
    size = float(count)
    for unit in ("kB", "MB", "GB", "TB"):
        size /= 1000
        if size < 1000 or unit == "TB":
            break
    return f"{size:.1f} {unit}"
