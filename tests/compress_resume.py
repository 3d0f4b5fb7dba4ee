"""Kill a compression run after an epoch, resume it, and compare it with an uninterrupted one.

Shared by the resume tests of every method (test_stage, test_map, test_qkd): the stop is a
KeyboardInterrupt raised right after an epoch's checkpoint is written, which leaves the disk as
a SIGKILL at that moment would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from asc.compress.stage import compress_run
from asc.train.checkpoint import load_checkpoint
from asc.train.loop import Trainer


@dataclass
class Resumed:
    straight: Path  #: the uninterrupted run
    stopped: Path  #: the run killed after ``stop_after`` epochs, then resumed
    straight_state: dict[str, Any]  #: its checkpoints/last.pt
    resumed_state: dict[str, Any]

    def reports(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return tuple(json.loads((run / "report.json").read_text())["metrics"]  # type: ignore[return-value]
                     for run in (self.straight, self.stopped))


def kill_and_resume(source: Path, methods: list[str], overrides: list[str], stop_after: int,
                    monkeypatch: pytest.MonkeyPatch, name: str) -> Resumed:
    """Run ``methods`` straight through, then again killed after epoch ``stop_after`` and resumed."""
    straight, stopped = source.with_name(f"{name}-straight"), source.with_name(f"{name}-stopped")
    assert compress_run(source, straight, methods, overrides, progress=False) == "compressed"
    original = Trainer._write_epoch

    def write_then_die(self: Trainer, metrics: Any) -> None:
        original(self, metrics)
        if self.epoch == stop_after:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_write_epoch", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        compress_run(source, stopped, methods, overrides, progress=False)
    monkeypatch.undo()
    assert load_checkpoint(stopped / "checkpoints" / "last.pt")["epoch"] == stop_after
    assert compress_run(source, stopped, methods, overrides, progress=False) == "resumed"
    return Resumed(straight, stopped, load_checkpoint(straight / "checkpoints" / "last.pt"),
                   load_checkpoint(stopped / "checkpoints" / "last.pt"))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested state dicts as one ``{"a.b.c": tensor}`` mapping."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def assert_same_tensors(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Bit-identical tensors under identical names."""
    flat_a, flat_b = flatten(a), flatten(b)
    assert flat_a.keys() == flat_b.keys()
    for name in flat_a:
        torch.testing.assert_close(flat_a[name], flat_b[name], rtol=0, atol=0, msg=name)
