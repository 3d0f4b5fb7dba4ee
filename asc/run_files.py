"""Which file of a run folder holds which model, torch-free.

A compressed run deploys its finalized module (``finalized.pt2``) and keeps a float twin
(``checkpoints/float.pt``) to train or distil from; a trained run deploys ``checkpoints/last.pt``.
The rule lives here, without torch, because the training side (loading models) and the runtime
side (``asc classify RUN`` telling a stale bundle from a current one) must read it the same way.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

FINALIZED_NAME = "finalized.pt2"
"""The deployable module of a compressed run, as a ``torch.export`` program (no pickled code)."""
COMPRESS_PLAN_NAME = "compress.yaml"
"""A compressed run's source run and method settings, written by ``asc compress`` when it starts."""
FLOAT_CHECKPOINT = "float"
"""A compressed run's float twin of its finalized module (``checkpoints/float.pt``)."""
DIGEST_KEY = "checkpoint_sha256"
"""``bundle.json`` ``source`` key: SHA-256 of the run's deployed file as the exporter read it, which
tells a stale bundle from a current one exactly, whatever the file times say."""


def checkpoint_file(run_dir: str | os.PathLike[str], checkpoint: str) -> Path:
    """``checkpoints/<checkpoint>.pt`` of a run folder."""
    return Path(run_dir) / "checkpoints" / f"{checkpoint}.pt"


def is_compressed(run_dir: str | os.PathLike[str]) -> bool:
    """Whether the run was finalized by ``asc compress``."""
    return (Path(run_dir) / FINALIZED_NAME).is_file()


def deployed_file(run_dir: str | os.PathLike[str], checkpoint: str = "last") -> Path:
    """The file a run's ``checkpoint`` deploys: ``finalized.pt2`` for a compressed run's ``last``."""
    if checkpoint == "last" and is_compressed(run_dir):
        return Path(run_dir) / FINALIZED_NAME
    return checkpoint_file(run_dir, checkpoint)


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, hex: what the exporter records under :data:`DIGEST_KEY`."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def trainable_checkpoint(run_dir: str | os.PathLike[str], checkpoint: str = "last") -> str:
    """The checkpoint holding ``checkpoint``'s model as a trainable float module.

    A compressed run's ``last`` is its finalized program (inference-only, maybe int8): its float
    twin stands in for it.
    """
    return FLOAT_CHECKPOINT if checkpoint == "last" and is_compressed(run_dir) else checkpoint
