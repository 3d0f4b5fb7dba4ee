"""Torch datasets and loaders over cached arrays: clip → (input, label, device, index).

The dataset only indexes an array source (waveform or feature cache, or any array); decoding,
augmentation and features live elsewhere, so wrappers can be stacked around it.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from asc.data.clips import Clip
from asc.errors import DatasetError

Item = tuple[torch.Tensor, int, int, int]


class ArraySource(Protocol):
    """Row ``i`` is the input for clip ``i``: a WaveformCache, a FeatureCache or a plain array."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


class ClipDataset(Dataset[Item]):
    """Items ``(x, label, device, index)``; ``label`` is -1 for unlabelled clips.

    ``index`` is the clip's position in ``clips``, so predictions can be traced back to files.
    """

    def __init__(
        self,
        clips: Sequence[Clip],
        labels: Sequence[str],
        devices: Sequence[str],
        source: ArraySource,
    ) -> None:
        if len(source) != len(clips):
            raise ValueError(f"the array source has {len(source)} rows for {len(clips)} clips")
        label_ids = {label: i for i, label in enumerate(labels)}
        device_ids = {device: i for i, device in enumerate(devices)}
        for clip in clips:
            if clip.label is not None and clip.label not in label_ids:
                raise DatasetError(
                    clip.path,
                    f"label {clip.label!r} is not one of the {len(labels)} known labels "
                    f"({', '.join(labels)})",
                    "use data whose classes the model was trained on",
                )
            if clip.device not in device_ids:
                known = list(devices)
                raise ValueError(f"{clip.path}: device {clip.device!r} is missing from {known}")
        self.clips = list(clips)
        self.labels = list(labels)
        self.devices = list(devices)
        self.source = source
        self.targets = [label_ids[c.label] if c.label is not None else -1 for c in self.clips]
        self.device_ids = [device_ids[c.device] for c in self.clips]

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> Item:
        # Copy out of the read-only memory map: torch tensors must own writable memory.
        x = torch.from_numpy(np.array(self.source[index], dtype=np.float32))
        return x, self.targets[index], self.device_ids[index], index


class DeviceBalancedSampler(Sampler[int]):
    """Draws clips with replacement so every device gets the same share of draws.

    TAU 2020's training split is 73 % device A; balancing shows the model the rare devices as
    often as the common one. Clips are equally likely within a device. Call ``set_epoch`` each
    epoch for a new, reproducible order; with ``num_replicas > 1`` every rank draws the same
    sequence and keeps its own interleaved share (for DDP).
    """

    def __init__(
        self,
        devices: Sequence[str],
        num_samples: int | None = None,
        seed: int = 0,
        *,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if not devices:
            raise ValueError("cannot balance an empty list of devices")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        counts = Counter(devices)
        self.probabilities = np.array([1.0 / (len(counts) * counts[d]) for d in devices])
        self.probabilities /= self.probabilities.sum()
        self.num_samples = num_samples if num_samples is not None else len(devices)
        self.seed = seed
        self.epoch = 0
        self.num_replicas = num_replicas
        self.rank = rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        draws = rng.choice(
            len(self.probabilities), size=len(self) * self.num_replicas, p=self.probabilities
        )
        return iter(draws[self.rank :: self.num_replicas].tolist())


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    balanced_devices: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool | None = None,
    sampler: Sampler[int] | None = None,
) -> DataLoader:
    """A loader that shuffles reproducibly (from ``seed``) when training and keeps order otherwise.

    ``sampler`` replaces the shuffling (e.g. a DistributedSampler); ``balanced_devices`` uses a
    :class:`DeviceBalancedSampler` over ``dataset.clips``. ``drop_last`` defaults to dropping
    a ragged last batch when training, since batch norm fails on a batch of one.
    """
    if balanced_devices:
        if sampler is not None:
            raise ValueError("pass either sampler or balanced_devices=True, not both")
        clips = getattr(dataset, "clips", None)
        if clips is None:
            raise TypeError(
                "balanced_devices needs a dataset with a .clips list "
                "(a ClipDataset or a wrapper exposing it)"
            )
        sampler = DeviceBalancedSampler([clip.device for clip in clips], seed=seed)
    count = len(sampler) if sampler is not None else len(dataset)  # type: ignore[arg-type]
    if drop_last is None:
        drop_last = train and count > batch_size
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_seed_worker if num_workers else None,
    )


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and random from torch's per-worker seed: workers differ, runs repeat."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
