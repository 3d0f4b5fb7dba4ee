"""Train the tiny run that a test module's compression tests start from.

Shared by the module-scoped source-run fixtures of the compression tests (test_compress, test_dcil,
test_afd, test_ffl, test_ppp), which differ only in folder names and epochs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from asc.config import RunConfig, load_config
from asc.train.loop import train_or_resume


def train_source_run(tmp_path_factory: pytest.TempPathFactory, tiny_overrides: Callable[..., list[str]],
                     group: str, name: str = "base", epochs: int = 1) -> Path:
    """Train a tiny run of ``epochs`` into a fresh ``<group>/<name>`` folder and return that folder."""
    run = tmp_path_factory.mktemp(group) / name
    train_or_resume(load_config(RunConfig, None, tiny_overrides(epochs=epochs)), run, progress=False)
    return run
