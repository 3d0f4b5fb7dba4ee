"""The two per-batch augmentation pipelines a training run applies, built from an AugmentConfig."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from asc.augment.config import AugmentConfig
from asc.augment.device import DeviceResponse, DeviceTranslation, DeviceTranslator, FreqMixStyle, ImpulseResponseAugment
from asc.augment.spec import Mixup, SpecAugment, TimeRoll
from asc.errors import ConfigError


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
