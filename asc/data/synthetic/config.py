"""The knobs of the synthetic corpus and its named presets."""

from __future__ import annotations

import numbers
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from asc.data.synthetic.devices import ALL_DEVICES
from asc.errors import ConfigError

PRESETS: tuple[str, ...] = ("tiny", "quick", "standard", "tau2022-tiny", "tau2022-quick", "tau2022")

#: Percentages of the training recordings in the DCASE 2024 data-efficiency subsets (split5.csv …).
SUBSET_PERCENTS: tuple[int, ...] = (5, 10, 25, 50, 100)

_PRESET_VALUES: dict[str, dict[str, Any]] = {
    # unit tests of other modules: a corpus in well under a second
    "tiny": dict(sample_rate=16000, clip_seconds=1.0, train_segments_per_scene=2, paired_per_scene=1,
                 eval_segments_per_scene=1, segments_per_location=2),
    # smoke runs of recipes: ~350 training and 180 evaluation clips in seconds
    "quick": dict(clip_seconds=2.0, train_segments_per_scene=20, paired_per_scene=3,
                  eval_segments_per_scene=2, segments_per_location=4),
    # the default: ~2,000 training clips, small CNNs train on it on a CPU
    "standard": dict(clip_seconds=4.0, train_segments_per_scene=130, paired_per_scene=14,
                     eval_segments_per_scene=20, segments_per_location=5),
}
# TAU 2022 Mobile style: the same recordings cut into 1-s segments, plus the 2024 subset files
# (tau2022-tiny uses 2-s recordings so that every recording is cut into more than one file)
_PRESET_VALUES.update({f"tau2022-{name}" if name != "standard" else "tau2022": {**values, "segment_seconds": 1.0}
                       for name, values in list(_PRESET_VALUES.items())})
_PRESET_VALUES["tau2022-tiny"]["clip_seconds"] = 2.0


def _default_workers() -> int:
    return min(2, os.cpu_count() or 1)


@dataclass
class SynthConfig:
    """Everything that determines the corpus; two equal configs give byte-identical corpora.

    ``workers`` only changes speed, never content.
    """

    seed: int = 0
    sample_rate: int = 44100
    clip_seconds: float = 4.0
    train_segments_per_scene: int = 130  # segments recorded by device a in train, per scene
    paired_per_scene: int = 14  # train segments also recorded by each of b, c, s1-s3, per scene
    eval_segments_per_scene: int = 20  # evaluation segments, each recorded by all nine devices
    segments_per_location: int = 5  # segments sharing one location's character
    cities: int = 10
    ir_dir: Path | None = None  # measured microphone responses for ir_devices; None: parametric only
    ir_devices: tuple[str, ...] = ("s1", "s2", "s3", "s4", "s5", "s6")
    #: None: one file per recording (TAU 2020); 1.0: each recording cut into 1-s files (TAU 2022)
    segment_seconds: float | None = None
    workers: int = field(default_factory=_default_workers)

    def __post_init__(self) -> None:
        if self.ir_dir is not None:
            self.ir_dir = Path(self.ir_dir)
        self.ir_devices = tuple(self.ir_devices)
        self._validate()

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SynthConfig:
        if name not in _PRESET_VALUES:
            raise ConfigError(f"unknown synthetic preset {name!r}; choose one of {', '.join(PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(
                f"unknown synthetic option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**{**_PRESET_VALUES[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ir_dir"] = str(self.ir_dir) if self.ir_dir is not None else None
        data["ir_devices"] = list(self.ir_devices)
        return data

    def content_dict(self) -> dict[str, Any]:
        """The fields that decide the corpus contents (all but ``workers``)."""
        data = self.to_dict()
        data.pop("workers")
        if data["segment_seconds"] is None:  # corpora written before the field existed stay valid
            data.pop("segment_seconds")
        return data

    @property
    def pieces(self) -> int:
        """Files per recording: 1, or how many whole segments fit in a clip."""
        if self.segment_seconds is None:
            return 1
        return int(self.clip_seconds / self.segment_seconds + 1e-9)

    def _validate(self) -> None:
        integers = ("seed", "sample_rate", "train_segments_per_scene", "paired_per_scene",
                    "eval_segments_per_scene", "segments_per_location", "cities", "workers")
        for name in integers:
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ConfigError(f"synthetic option {name}={value!r} must be an integer")
            minimum = 0 if name in ("seed", "paired_per_scene") else 1
            if value < minimum:
                raise ConfigError(f"synthetic option {name}={value!r} must be >= {minimum}")
            setattr(self, name, int(value))  # numpy integers would not survive synth.json
        if not isinstance(self.clip_seconds, numbers.Real) or isinstance(self.clip_seconds, bool):
            raise ConfigError(f"synthetic option clip_seconds={self.clip_seconds!r} must be a number")
        self.clip_seconds = float(self.clip_seconds)
        if self.sample_rate < 8000:
            raise ConfigError(f"synthetic option sample_rate={self.sample_rate} must be >= 8000")
        if not self.clip_seconds > 0:
            raise ConfigError(f"synthetic option clip_seconds={self.clip_seconds!r} must be > 0")
        if self.paired_per_scene > self.train_segments_per_scene:
            raise ConfigError(
                f"synthetic option paired_per_scene={self.paired_per_scene} must not exceed "
                f"train_segments_per_scene={self.train_segments_per_scene}"
            )
        if self.segment_seconds is not None:
            if not isinstance(self.segment_seconds, numbers.Real) or isinstance(self.segment_seconds, bool) \
                    or not 0 < self.segment_seconds <= self.clip_seconds:
                raise ConfigError(f"synthetic option segment_seconds={self.segment_seconds!r} must be a number in "
                                  f"(0, clip_seconds={self.clip_seconds}], or null for uncut recordings")
            self.segment_seconds = float(self.segment_seconds)
        bad = sorted(set(self.ir_devices) - set(ALL_DEVICES))
        if bad:
            raise ConfigError(f"synthetic option ir_devices names unknown device(s) {', '.join(bad)}")
