"""The clip record that every dataset reader produces and every loader consumes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from asc.errors import DatasetError

#: The ten scene classes of TAU Urban Acoustic Scenes 2020 Mobile, in the challenge's order.
TAU_SCENES: tuple[str, ...] = (
    "airport",
    "bus",
    "metro",
    "metro_station",
    "park",
    "public_square",
    "shopping_mall",
    "street_pedestrian",
    "street_traffic",
    "tram",
)

#: Device groups used in DCASE reports: real devices, simulated devices seen in training, and
#: simulated devices that appear only in the evaluation split.
DEVICE_GROUPS: dict[str, tuple[str, ...]] = {
    "real": ("a", "b", "c"),
    "seen": ("s1", "s2", "s3"),
    "unseen": ("s4", "s5", "s6"),
}

UNKNOWN_DEVICE = "unknown"


def device_vocabulary(devices: Iterable[str]) -> list[str]:
    """Distinct devices: DCASE devices in report order (a, b, c, s1-s6), then the rest sorted."""
    distinct = set(devices)
    known = [device for group in DEVICE_GROUPS.values() for device in group]
    return [d for d in known if d in distinct] + sorted(distinct - set(known))


def device_group(device: str) -> str | None:
    """The DCASE group ('real', 'seen', 'unseen') of a device name, or None if it has none."""
    for group, devices in DEVICE_GROUPS.items():
        if device in devices:
            return group
    return None


@dataclass(frozen=True)
class Clip:
    """One labelled recording.

    ``segment`` identifies the recorded scene segment independently of the device, so that the
    same segment captured by several devices can be paired (device translation needs the pairs).
    """

    path: Path
    label: str | None
    device: str = UNKNOWN_DEVICE
    city: str | None = None
    segment: str | None = None
    fold: str | None = None  #: the collection's fold (a table's fold column or an assigned fold)


def has_devices(clips: Iterable[Clip]) -> bool:
    """Whether any clip names its recording device; without devices, device tables mean nothing."""
    return any(clip.device != UNKNOWN_DEVICE for clip in clips)


@dataclass
class ClipSet:
    """Named splits of clips plus the label vocabulary shared by all splits."""

    splits: dict[str, list[Clip]]
    labels: list[str]
    root: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, split: str) -> list[Clip]:
        return self.splits[split]

    def split(self, name: str) -> list[Clip]:
        """The clips of split ``name`` ("all": every split's); a missing or empty split is a one-line
        dataset error."""
        if name == "all" and name not in self.splits:
            return [clip for clips in self.splits.values() for clip in clips]
        if name not in self.splits:
            raise DatasetError(self.root or "dataset", f"has no split '{name}' (found: {', '.join(self.splits)})",
                               "set data.train_split / data.eval_split (or --split) to one of them")
        if not self.splits[name]:
            raise DatasetError(self.root or "dataset", f"split '{name}' is empty",
                               "check the split's folds, folder or evaluation_setup/ file")
        return self.splits[name]

    def label_index(self, label: str) -> int:
        return self.labels.index(label)
