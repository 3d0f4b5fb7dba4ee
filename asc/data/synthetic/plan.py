"""Which segments exist, where they were recorded, and which devices record each one.

Mirrors TAU 2020 Mobile fold 1: the training split is dominated by device a, and every training
clip of b, c, s1-s3 has its device-a twin (same segment), so paired spectrograms exist; the
evaluation split records every segment with all nine devices, at locations never used in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from asc.data.clips import TAU_SCENES
from asc.data.synthetic.config import SynthConfig
from asc.data.synthetic.devices import ALL_DEVICES, TRAIN_DEVICES
from asc.data.synthetic.rng import Stream, stream_rng

TRAIN, EVALUATE = "train", "evaluate"


@dataclass(frozen=True)
class SegmentPlan:
    index: int  # global segment number: part of the file name and of the segment's random stream
    scene: str
    city: int
    location: int  # global location number
    split: str
    devices: tuple[str, ...]

    @property
    def identifier(self) -> str:
        """TAU's ``city-location`` identifier."""
        return f"synth{self.city:02d}-{self.location}"

    @property
    def stem(self) -> str:
        """The segment id: the file name stem without the device token."""
        return f"{self.scene}-{self.identifier}-{self.index}"

    def filename(self, device: str) -> str:
        return f"audio/{self.stem}-{device}.wav"

    def piece_filename(self, device: str, piece: int) -> str:
        """TAU 2022 Mobile naming: the 1-s piece's index between segment and device."""
        return f"audio/{self.stem}-{piece}-{device}.wav"


def plan_segments(config: SynthConfig) -> list[SegmentPlan]:
    """All segments of the corpus, train first, in a fixed order."""
    rng = stream_rng(config.seed, Stream.PLAN)
    plans: list[SegmentPlan] = []
    location = 0
    splits = ((TRAIN, config.train_segments_per_scene), (EVALUATE, config.eval_segments_per_scene))
    for split, per_scene in splits:
        for scene in TAU_SCENES:
            paired = _paired_devices(rng, per_scene, config.paired_per_scene) if split == TRAIN else None
            city = 0
            for k in range(per_scene):
                if k % config.segments_per_location == 0:
                    location += 1
                    city = int(rng.integers(1, config.cities + 1))
                devices = ALL_DEVICES if paired is None else ("a", *paired[k])
                plans.append(SegmentPlan(len(plans), scene, city, location, split, devices))
    return plans


def _paired_devices(rng: np.random.Generator, segments: int, paired: int) -> list[tuple[str, ...]]:
    """For each device-a training segment, the other training devices that also record it."""
    chosen: list[list[str]] = [[] for _ in range(segments)]
    for device in TRAIN_DEVICES[1:]:
        for k in rng.choice(segments, size=paired, replace=False):
            chosen[k].append(device)
    return [tuple(devices) for devices in chosen]
