"""Datasets: TAU and table/folder readers, validation, the decode cache, and torch loaders.

The torch-based loader names are imported on first use, so reading or checking a dataset
(``asc data check``) does not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from asc.data.cache import FeatureCache, WaveformCache
from asc.data.clips import DEVICE_GROUPS, TAU_SCENES, UNKNOWN_DEVICE, Clip, ClipSet, device_group
from asc.data.table import label_vocabulary, read_folder, read_table
from asc.data.clips import device_vocabulary
from asc.data.tau import Problem, check_tau, describe, read_tau

if TYPE_CHECKING:
    from asc.data.loader import ClipDataset, DeviceBalancedSampler, make_loader

_LOADER_NAMES = ("ClipDataset", "DeviceBalancedSampler", "make_loader")

__all__ = [
    "DEVICE_GROUPS",
    "TAU_SCENES",
    "UNKNOWN_DEVICE",
    "Clip",
    "ClipDataset",
    "ClipSet",
    "DeviceBalancedSampler",
    "FeatureCache",
    "Problem",
    "WaveformCache",
    "check_tau",
    "describe",
    "device_group",
    "device_vocabulary",
    "label_vocabulary",
    "make_loader",
    "read_folder",
    "read_table",
    "read_tau",
]


def __getattr__(name: str) -> Any:
    if name in _LOADER_NAMES:
        from asc.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'asc.data' has no attribute {name!r}")
