"""Train-only batch augmentations and the config that switches them on.

The training loop calls two pipelines per batch: ``wave_augment(x, devices)`` on waveforms
``(batch, samples)`` before the front end, and ``spec_augment(x, devices)`` on log-mels
``(batch, 1, F, T)`` after it (device translation may change device ids, so it returns them).
Mixup touches the labels, so the loop applies it separately (:func:`build_mixup`).

Only :class:`AugmentConfig` is imported eagerly; the torch-based names load on first use, so
reading a run's config (as the torch-free deployment commands do) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from asc.augment.config import AugmentConfig

if TYPE_CHECKING:
    from asc.augment.device import (
        DeviceResponse,
        DeviceTranslation,
        DeviceTranslator,
        FreqMixStyle,
        ImpulseResponseAugment,
        align_pairs,
        fit_translator,
        load_impulse_responses,
        mix_frequency_statistics,
        pair_by_segment,
    )
    from asc.augment.pipeline import SpecPipeline, WavePipeline, build_augmentations, build_mixup
    from asc.augment.spec import MixedBatch, Mixup, SpecAugment, TimeRoll, mix_targets, mixup_loss, sample_beta

_LAZY = {
    "asc.augment.device": ("DeviceResponse", "DeviceTranslation", "DeviceTranslator", "FreqMixStyle",
                           "ImpulseResponseAugment", "align_pairs", "fit_translator", "load_impulse_responses",
                           "mix_frequency_statistics", "pair_by_segment"),
    "asc.augment.pipeline": ("SpecPipeline", "WavePipeline", "build_augmentations", "build_mixup"),
    "asc.augment.spec": ("MixedBatch", "Mixup", "SpecAugment", "TimeRoll", "mix_targets", "mixup_loss",
                         "sample_beta"),
}
_HOME = {name: module for module, names in _LAZY.items() for name in names}

__all__ = [
    "AugmentConfig", "DeviceResponse", "DeviceTranslation", "DeviceTranslator", "FreqMixStyle",
    "ImpulseResponseAugment", "MixedBatch", "Mixup", "SpecAugment", "SpecPipeline", "TimeRoll",
    "WavePipeline", "align_pairs", "build_augmentations", "build_mixup", "fit_translator",
    "load_impulse_responses", "mix_frequency_statistics", "mix_targets", "mixup_loss",
    "pair_by_segment", "sample_beta",
]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'asc.augment' has no attribute {name!r}")
