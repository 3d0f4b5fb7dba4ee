"""ClipDataset items, the device-balanced sampler, and seeded loaders."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import SequentialSampler

from asc.data.cache import WaveformCache
from asc.data.clips import Clip
from asc.data.loader import ClipDataset, DeviceBalancedSampler, make_loader
from asc.errors import DatasetError

LABELS = ["bus", "park"]
DEVICES = ["a", "b", "c"]


def make_clips(devices: list[str]) -> list[Clip]:
    return [
        Clip(path=Path(f"/data/{i}-{d}.wav"), label=LABELS[i % 2], device=d)
        for i, d in enumerate(devices)
    ]


def rows(n: int, *shape: int) -> np.ndarray:
    """Row i is filled with the value i, so every item reveals which row it came from."""
    return np.broadcast_to(
        np.arange(n, dtype=np.float32).reshape(n, *[1] * len(shape)), (n, *shape)
    ).copy()


def test_waveform_items() -> None:
    clips = make_clips(["a", "b", "c"])
    dataset = ClipDataset(clips, LABELS, DEVICES, rows(3, 16))
    x, label, device, index = dataset[2]
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape == (16,)
    assert torch.all(x == 2) and (label, device, index) == (0, 2, 2)
    assert len(dataset) == 3 and dataset.targets == [0, 1, 0] and dataset.device_ids == [0, 1, 2]


def test_feature_items_and_unlabelled_clips() -> None:
    clips = [Clip(path=Path("/x/0.wav"), label=None), Clip(path=Path("/x/1.wav"), label="park")]
    dataset = ClipDataset(clips, LABELS, ["unknown"], rows(2, 1, 4, 5))
    x, label, device, index = dataset[0]
    assert x.shape == (1, 4, 5) and (label, device, index) == (-1, 0, 0)
    assert dataset[1][1] == 1


def test_items_from_a_waveform_cache_are_writable_copies(tmp_path: Path) -> None:
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}-a.wav")
        sf.write(paths[-1], np.full(800, 0.1 * (i + 1), np.float32), 8000, subtype="FLOAT")
    clips = [Clip(path=p, label="bus", device="a") for p in paths]
    cache = WaveformCache.open(clips, 8000, 800, tmp_path / "cache", progress=False)
    x, *_ = ClipDataset(clips, LABELS, ["a"], cache)[1]
    assert x.shape == (800,) and x[400].item() == pytest.approx(0.2, abs=1e-6)
    x += 1  # owning its memory: the cache stays untouched
    assert cache[1][400] == pytest.approx(0.2, abs=1e-6)


def test_dataset_rejects_mismatches() -> None:
    clips = make_clips(["a", "b"])
    with pytest.raises(ValueError, match="3 rows for 2 clips"):
        ClipDataset(clips, LABELS, DEVICES, rows(3, 4))
    with pytest.raises(DatasetError, match="label 'park' is not one of the 1 known labels"):
        ClipDataset(clips, ["bus"], DEVICES, rows(2, 4))
    with pytest.raises(ValueError, match="device 'b' is missing"):
        ClipDataset(clips, LABELS, ["a"], rows(2, 4))


def test_balanced_sampler_equalises_devices() -> None:
    devices = ["a"] * 90 + ["b"] * 6 + ["c"] * 4
    sampler = DeviceBalancedSampler(devices, num_samples=30000, seed=1)
    draws = list(sampler)
    assert len(draws) == len(sampler) == 30000
    shares = Counter(devices[i] for i in draws)
    for device in "abc":
        assert shares[device] / 30000 == pytest.approx(1 / 3, abs=0.015)
    # Within a device every clip is equally likely: each of c's 4 clips gets ~1/12 of all draws.
    per_clip = Counter(draws)
    assert all(per_clip[i] / 30000 == pytest.approx(1 / 12, abs=0.01) for i in range(96, 100))
    assert len(DeviceBalancedSampler(devices)) == 100


def test_balanced_sampler_is_reproducible_per_epoch() -> None:
    devices = ["a"] * 8 + ["b"] * 2
    sampler = DeviceBalancedSampler(devices, seed=3)
    first = list(sampler)
    assert list(DeviceBalancedSampler(devices, seed=3)) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(DeviceBalancedSampler(devices, seed=4)) != first


def test_balanced_sampler_shards_across_replicas() -> None:
    devices = ["a"] * 7 + ["b"] * 3
    whole = list(DeviceBalancedSampler(devices, num_samples=10, seed=5))
    shards = [
        list(DeviceBalancedSampler(devices, num_samples=10, seed=5, num_replicas=2, rank=r))
        for r in range(2)
    ]
    assert [len(s) for s in shards] == [5, 5]
    assert [i for pair in zip(*shards, strict=True) for i in pair] == whole
    with pytest.raises(ValueError, match="rank 2"):
        DeviceBalancedSampler(devices, num_replicas=2, rank=2)


def order(loader: torch.utils.data.DataLoader) -> list[int]:
    return [i for batch in loader for i in batch[3].tolist()]


def test_training_loader_shuffles_reproducibly() -> None:
    dataset = ClipDataset(make_clips(["a"] * 20), LABELS, DEVICES, rows(20, 8))
    loader = make_loader(dataset, batch_size=6, train=True, seed=7)
    epoch1, epoch2 = order(loader), order(loader)
    assert len(epoch1) == 18  # the ragged last batch of 2 is dropped when training
    assert epoch1 != sorted(epoch1) and epoch1 != epoch2
    again = make_loader(dataset, batch_size=6, train=True, seed=7)
    assert order(again) == epoch1 and order(again) == epoch2
    assert order(make_loader(dataset, batch_size=6, train=True, seed=8)) != epoch1


def test_evaluation_loader_keeps_order_and_every_clip() -> None:
    dataset = ClipDataset(make_clips(["a", "b", "c"] * 3), LABELS, DEVICES, rows(9, 8))
    batches = list(make_loader(dataset, batch_size=4, train=False))
    assert [len(b[0]) for b in batches] == [4, 4, 1]
    x, label, device, index = batches[0]
    assert x.shape == (4, 8) and x.dtype == torch.float32
    assert label.dtype == torch.int64 and label.tolist() == [0, 1, 0, 1]
    assert device.tolist() == [0, 1, 2, 0] and index.tolist() == [0, 1, 2, 3]
    assert torch.equal(x[:, 0], index.float())


def test_small_training_set_keeps_its_only_batch() -> None:
    dataset = ClipDataset(make_clips(["a"] * 3), LABELS, DEVICES, rows(3, 8))
    assert sorted(order(make_loader(dataset, batch_size=32, train=True))) == [0, 1, 2]


def test_balanced_and_external_samplers() -> None:
    devices = ["a"] * 45 + ["b"] * 5
    dataset = ClipDataset(make_clips(devices), LABELS, DEVICES, rows(50, 4))
    loader = make_loader(dataset, batch_size=10, train=True, balanced_devices=True, seed=2)
    assert isinstance(loader.sampler, DeviceBalancedSampler)
    drawn = []
    for epoch in range(40):
        loader.sampler.set_epoch(epoch)
        drawn += order(loader)
    assert len(drawn) == 2000
    assert sum(devices[i] == "b" for i in drawn) / 2000 == pytest.approx(0.5, abs=0.04)
    external = make_loader(dataset, batch_size=10, train=True, sampler=SequentialSampler(dataset))
    assert order(external) == list(range(50))
    with pytest.raises(ValueError, match="either sampler or balanced_devices"):
        make_loader(
            dataset,
            batch_size=10,
            train=True,
            balanced_devices=True,
            sampler=SequentialSampler(dataset),
        )
    with pytest.raises(TypeError, match=r"needs a dataset with a \.clips list"):
        make_loader(
            torch.utils.data.TensorDataset(torch.zeros(4)),
            batch_size=2,
            train=True,
            balanced_devices=True,
        )


def test_worker_processes_give_the_same_batches() -> None:
    dataset = ClipDataset(make_clips(["a", "b"] * 6), LABELS, DEVICES, rows(12, 8))
    single = list(make_loader(dataset, batch_size=4, train=True, seed=9))
    workers = list(make_loader(dataset, batch_size=4, train=True, seed=9, num_workers=2))
    assert [b[3].tolist() for b in workers] == [b[3].tolist() for b in single]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(single, workers, strict=True))
