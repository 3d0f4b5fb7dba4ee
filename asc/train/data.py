"""From a :class:`~asc.config.DataConfig` to cached, indexable datasets.

Training and evaluation both go through :func:`open_clipset` and :func:`make_dataset`, so a split
is decoded, resampled and (optionally) turned into log-mels exactly once and the same way for
every command.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from asc.audio import probe_audio
from asc.config import DataConfig
from asc.data.cache import FeatureCache, WaveformCache, default_cache_dir
from asc.data.clips import Clip, ClipSet, device_vocabulary
from asc.data.loader import ClipDataset
from asc.data.source import read_dataset
from asc.data.synthetic import SynthConfig, synthesize
from asc.features import FeatureConfig, LogMel


def cache_root(config: DataConfig) -> Path:
    return Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()


def synthetic_root(config: DataConfig) -> Path:
    if config.synth_dir:
        return Path(config.synth_dir).expanduser()
    return cache_root(config) / "synthetic" / f"{config.synth_preset}-seed{config.synth_seed}"


def ensure_synthetic(config: DataConfig, *, progress: bool) -> Path:
    """Generate the synthetic corpus the config names (a no-op when it already exists)."""
    root = synthetic_root(config)
    overrides: dict[str, object] = {"seed": config.synth_seed}
    if config.ir_dir:
        overrides["ir_dir"] = config.ir_dir
    synthesize(root, SynthConfig.preset(config.synth_preset, **overrides), progress=progress)
    return root


def dataset_root(config: DataConfig) -> Path:
    return Path(config.root).expanduser() if config.root else synthetic_root(config)


def open_clipset(config: DataConfig, *, progress: bool = True, create: bool = True) -> ClipSet:
    """Read the dataset the config points at (TAU folder, table or folder tree, see
    :func:`asc.data.source.read_dataset`), creating the synthetic corpus when allowed."""
    if config.root is None and create:
        ensure_synthetic(config, progress=progress)
    return read_dataset(dataset_root(config), config)


def split_clips(clipset: ClipSet, split: str) -> list[Clip]:
    return clipset.split(split)


def clip_samples(config: DataConfig, features: FeatureConfig, clips: list[Clip]) -> int:
    """Samples per clip at the model rate: the configured length or the first clip's."""
    seconds = config.clip_seconds if config.clip_seconds else probe_audio(clips[0].path).duration
    return int(round(seconds * features.sample_rate))


def clipset_devices(clipset: ClipSet) -> list[str]:
    """Every device in the dataset, DCASE order first (a, b, c, s1 … s6)."""
    return device_vocabulary(clip.device for clips in clipset.splits.values() for clip in clips)


def make_dataset(clips: list[Clip], clipset: ClipSet, devices: list[str], *, config: DataConfig,
                 features: FeatureConfig, num_samples: int, as_features: bool,
                 progress: bool = True) -> ClipDataset:
    """Waveforms (samples,) or log-mels (1, F, T) for ``clips``, backed by memory-mapped caches."""
    cache_dir = cache_root(config)
    waves = WaveformCache.open(clips, features.sample_rate, num_samples, cache_dir, progress=progress)
    source: WaveformCache | FeatureCache = waves
    if as_features:
        source = FeatureCache.open(waves, _batch_frontend(features), features.to_dict(), cache_dir,
                                   progress=progress)
    return ClipDataset(clips, clipset.labels, devices, source)


def _batch_frontend(features: FeatureConfig):
    frontend = LogMel(features).eval()

    def compute(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return frontend(torch.from_numpy(np.array(batch, dtype=np.float32))).numpy()

    return compute
