"""Train-only batch augmentations and the config that switches them on.

The training loop calls two pipelines per batch: ``wave_augment(x, devices)`` on waveforms
``(batch, samples)`` before the front end, and ``spec_augment(x, devices)`` on log-mels
``(batch, 1, F, T)`` after it (device translation may change device ids, so it returns them).
Mixup touches the labels, so the loop applies it separately (:func:`build_mixup`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

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
from asc.augment.spec import MixedBatch, Mixup, SpecAugment, TimeRoll, mix_targets, mixup_loss, sample_beta
from asc.errors import ConfigError

__all__ = [
    "AugmentConfig", "DeviceResponse", "DeviceTranslation", "DeviceTranslator", "FreqMixStyle",
    "ImpulseResponseAugment", "MixedBatch", "Mixup", "SpecAugment", "SpecPipeline", "TimeRoll",
    "WavePipeline", "align_pairs", "build_augmentations", "build_mixup", "fit_translator",
    "load_impulse_responses", "mix_frequency_statistics", "mix_targets", "mixup_loss",
    "pair_by_segment", "sample_beta",
]


@dataclass
class AugmentConfig:
    """What is on and how strongly. Everything is off by default; recipes turn on what they use."""

    source_device: str = "a"  # the majority device whose clips DIR and translation alter
    dir_p: float = 0.0  # probability of impulse-response convolution per source clip
    ir_dir: str | None = None  # folder of impulse responses (required when dir_p > 0)
    translation: Literal["none", "response", "translator"] = "none"
    translation_p: float = 0.5
    translation_targets: list[str] | None = None  # None: every device the model was fitted for
    mixstyle_p: float = 0.0  # Freq-MixStyle probability per batch
    mixstyle_alpha: float = 0.3
    mixup_alpha: float = 0.0  # 0 turns mixup off
    freq_masks: int = 0
    freq_mask_width: int = 0  # maximum width in mel bins
    time_masks: int = 0
    time_mask_width: int = 0  # maximum width in frames
    mask_fill: float | None = None  # None: each sample's mean
    roll_seconds: float = 0.0  # maximum circular shift of the waveform

    def __post_init__(self) -> None:
        for name in ("dir_p", "translation_p", "mixstyle_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"augment.{name}={value} must be between 0 and 1")
        for name in ("mixstyle_alpha", "mixup_alpha", "roll_seconds", "freq_masks", "freq_mask_width",
                     "time_masks", "time_mask_width"):
            value = getattr(self, name)
            if value < 0:
                raise ConfigError(f"augment.{name}={value} must be >= 0")
        if self.mixstyle_p > 0 and self.mixstyle_alpha == 0:
            raise ConfigError("augment.mixstyle_alpha must be > 0 when augment.mixstyle_p > 0")


@dataclass
class WavePipeline:
    """Waveform augmentations in order: impulse-response convolution, then time roll."""

    generator: torch.Generator
    impulse_response: ImpulseResponseAugment | None = None
    roll: TimeRoll | None = None

    def __call__(self, x: Tensor, devices: Tensor) -> Tensor:
        if self.impulse_response is not None:
            x = self.impulse_response(x, devices, self.generator)
        if self.roll is not None:
            x = self.roll(x, self.generator)
        return x


@dataclass
class SpecPipeline:
    """Log-mel augmentations in order: device translation (needs clean source clips), Freq-MixStyle,
    then masks (masking first would let MixStyle spread the fill value's statistics)."""

    generator: torch.Generator
    translation: DeviceTranslation | None = None
    mixstyle: FreqMixStyle | None = None
    masks: SpecAugment | None = None

    def __call__(self, x: Tensor, devices: Tensor) -> tuple[Tensor, Tensor]:
        if self.translation is not None:
            x, devices = self.translation(x, devices, self.generator)
        if self.mixstyle is not None:
            x = self.mixstyle(x, self.generator)
        if self.masks is not None:
            x = self.masks(x, self.generator)
        return x, devices


def build_augmentations(
    config: AugmentConfig,
    devices: Sequence[str],
    sample_rate: int,
    *,
    generator: torch.Generator,
    translation_model: DeviceResponse | DeviceTranslator | None = None,
) -> tuple[WavePipeline, SpecPipeline]:
    """The two per-batch pipelines for ``config``.

    ``devices`` is the device vocabulary the batch's device ids index. ``translation_model`` is the
    fitted response or translator (fit once by the recipe, then loaded). ``generator`` (CPU) is
    shared by both pipelines; pass the same one to mixup.
    """
    impulse_response = roll = translation = mixstyle = masks = None
    if config.dir_p > 0:
        if config.ir_dir is None:
            raise ConfigError("augment.dir_p > 0 needs augment.ir_dir, a folder of impulse responses")
        impulse_response = ImpulseResponseAugment.from_folder(
            config.ir_dir, sample_rate, devices, source=config.source_device, p=config.dir_p
        )
    if config.roll_seconds > 0:
        roll = TimeRoll(round(config.roll_seconds * sample_rate))
    if config.translation != "none":
        expected = DeviceResponse if config.translation == "response" else DeviceTranslator
        if not isinstance(translation_model, expected):
            raise ConfigError(
                f"augment.translation={config.translation} needs a fitted {expected.__name__}, "
                f"got {type(translation_model).__name__}; fit it on paired clips first"
            )
        translation = DeviceTranslation(
            translation_model, devices, config.translation_targets,
            source=config.source_device, p=config.translation_p,
        )
    if config.mixstyle_p > 0:
        mixstyle = FreqMixStyle(config.mixstyle_p, config.mixstyle_alpha)
    if config.freq_masks or config.time_masks:
        masks = SpecAugment(config.freq_masks, config.freq_mask_width, config.time_masks,
                            config.time_mask_width, fill=config.mask_fill)
    return (
        WavePipeline(generator, impulse_response, roll),
        SpecPipeline(generator, translation, mixstyle, masks),
    )


def build_mixup(config: AugmentConfig) -> Mixup | None:
    """Mixup if ``mixup_alpha`` > 0; the loop applies it to inputs and targets together."""
    return Mixup(config.mixup_alpha) if config.mixup_alpha > 0 else None
