"""Datasets: TAU and table/folder readers, validation, the decode cache, and torch loaders.

The torch-based loader names are imported on first use, so reading or checking a dataset
(``asc data check``) does not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from asc.data.cache import FeatureCache, WaveformCache
from asc.data.clips import (
    DEVICE_GROUPS,
    TAU_SCENES,
    UNKNOWN_DEVICE,
    Clip,
    ClipSet,
    device_group,
    device_vocabulary,
    has_devices,
)
from asc.data.problems import Problem
from asc.data.source import check_dataset, detect_format, read_dataset
from asc.data.splits import assign_folds, split_by_folds
from asc.data.table import label_vocabulary, read_folder, read_table
from asc.data.tau import check_tau, describe, read_tau

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
    "assign_folds",
    "check_dataset",
    "check_tau",
    "describe",
    "detect_format",
    "device_group",
    "device_vocabulary",
    "has_devices",
    "label_vocabulary",
    "make_loader",
    "read_dataset",
    "read_folder",
    "read_table",
    "read_tau",
    "split_by_folds",
]


def __getattr__(name: str) -> Any:
    if name in _LOADER_NAMES:
        from asc.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'asc.data' has no attribute {name!r}")
