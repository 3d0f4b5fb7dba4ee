"""What augmentation is on and how strongly: a plain dataclass, importable without torch.

It lives apart from the augmentations so that ``asc.config`` (and with it the torch-free
deployment commands that read run configs) does not pay for importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from asc.errors import ConfigError


@dataclass
class AugmentConfig:
    """What is on and how strongly. Everything is off by default; recipes turn on what they use."""

    #: the device whose clips DIR and translation alter (TAU: "a"). None (collections without devices):
    #: DIR alters every clip; translation, which needs devices, starts from the device with the most
    #: paired recordings and alters the first device that is not one of its targets
    source_device: str | None = None
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
