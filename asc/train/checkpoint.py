"""Checkpoints: plain state dicts written atomically and loaded with ``weights_only=True``.

A run can be killed at any moment (pre-emption, Ctrl-C, OOM) and resumed from the last completed
epoch; the temp-file-and-rename write guarantees the file on disk is always a whole checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from asc.errors import AscError
from asc.io import atomic_torch_save


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    atomic_torch_save(state, Path(path))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint of tensors and plain Python values; refuse anything else."""
    path = Path(path)
    if not path.is_file():
        raise AscError(f"{path}: checkpoint not found; train first or point at a run folder with checkpoints/")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise AscError(f"{path}: not a readable asc checkpoint ({reason}); re-run training or restore the file") \
            from None
