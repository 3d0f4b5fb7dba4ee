"""Checkpoints: plain state dicts written atomically and loaded with ``weights_only=True``.

A run can be killed at any moment (pre-emption, Ctrl-C, OOM) and resumed from the last completed
epoch; the temp-file-and-rename write guarantees the file on disk is always a whole checkpoint.
"""

from __future__ import annotations

import copy
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asc.errors import AscError
from asc.io import atomic_path, atomic_torch_save


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    atomic_torch_save(state, Path(path))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint of tensors and plain Python values; refuse anything else."""
    path = Path(path)
    if not path.is_file():
        saved = sorted(p.stem for p in path.parent.glob("*.pt")) if path.parent.is_dir() else []
        if saved:
            raise AscError(f"{path}: checkpoint not found; this run has {', '.join(saved)}")
        raise AscError(f"{path}: checkpoint not found; train first or point at a run folder with checkpoints/")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # torch's own text advises weights_only=False: unsafe for a file of unknown origin
        raise AscError(f"{path}: not a readable asc checkpoint (not a torch file, or one holding more than tensors "
                       "and plain values); re-run training or restore the file") from None
    except Exception as error:  # torch raises many types for truncated or foreign files
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise AscError(f"{path}: not a readable asc checkpoint ({reason}); re-run training or restore the file") \
            from None


def save_finalized(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Write ``model`` as an exported program with a dynamic batch, atomically.

    Any module a method finalizes (a masked float net, a channel-pruned one, an int8 QDQ graph)
    is stored the same way, so loading and exporting it needs no knowledge of the method.
    """
    if example.device.type != "cpu":  # a CUDA module adds a batch <= 65535 guard that the dynamic dimension refuses
        model, example = copy.deepcopy(model).cpu(), example.cpu()
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as handle:
        torch.export.save(program, handle)


def load_finalized(path: Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """The deployable module of :func:`save_finalized`, inference-only, module names kept.

    ``train()``/``eval()`` are made harmless (an exported graph refuses them otherwise), so code
    that switches modes, such as evaluation and export, treats it like any module.
    """
    from asc.pt2e import allow_exported_model_train_eval  # also registers the ops of int8 programs

    path = Path(path)
    export_log = logging.getLogger("torch.export")  # logs a whole traceback of a foreign archive before raising
    level = export_log.level
    export_log.setLevel(logging.ERROR)
    try:
        program = torch.export.load(path)
    except Exception as error:  # torch raises many types for truncated or foreign archives
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise AscError(f"{path}: not a readable finalized model ({reason}); re-run `asc compress`") from None
    finally:
        export_log.setLevel(level)
    return allow_exported_model_train_eval(program.module()).to(map_location)
