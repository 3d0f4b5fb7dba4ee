"""Output folders and atomic file writes: a crash or a kill never leaves a half-written checkpoint,
report or bundle, and an output path that cannot be a folder is one error naming it.

Files end up with the permissions any other new file of the user gets (0644 under the usual umask
022), not the private 0600 of a temporary file, so colleagues on a shared server can read runs.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from asc.errors import AscError


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (other threads may be
    creating files); elsewhere by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def default_mode(*, directory: bool = False) -> int:
    """The mode ``open``/``mkdir`` would give a new file or folder under the process's umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def make_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as a folder, made with its parents; one :class:`AscError` naming it when it cannot be
    (a file is in the way, no permission, a read-only disk)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AscError(f"{path}: cannot make this folder ({error.strerror or error}); "
                       "choose another output folder") from None
    return path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # a writer may have replaced the file, so set the mode on what is there
            tmp_path.chmod(default_mode())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` that never leaves a truncated file behind."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
