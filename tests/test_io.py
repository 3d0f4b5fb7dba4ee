"""Atomic writes: whole files or none, with the permissions of any other new file of the user."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from asc.io import atomic_path, atomic_torch_save, atomic_write_json, default_mode


@pytest.fixture(params=[0o022, 0o027, 0o077])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_follow_the_umask_not_the_private_temp_mode(tmp_path: Path, umask: int) -> None:
    atomic_write_json(tmp_path / "report.json", {"a": 1})
    atomic_torch_save({"x": 1}, tmp_path / "last.pt")
    with atomic_path(tmp_path / "audio.npy") as tmp:
        np.save(open(tmp, "wb"), np.zeros(3))
    expected = {0o022: 0o644, 0o027: 0o640, 0o077: 0o600}[umask]
    assert default_mode() == expected and default_mode(directory=True) == 0o777 & ~umask
    assert {p.name: _mode(p) for p in tmp_path.iterdir()} == dict.fromkeys(
        ["report.json", "last.pt", "audio.npy"], expected)


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    atomic_write_json(target, {"version": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == '{\n  "version": 1\n}\n' and [p.name for p in tmp_path.iterdir()] == ["report.json"]
