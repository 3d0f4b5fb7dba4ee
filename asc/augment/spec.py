"""Label-agnostic batch augmentations: mixup, SpecAugment masks and random time roll.

All randomness is drawn from a caller-supplied CPU ``torch.Generator`` (never the global RNG), so a
training run is reproducible from its seed and the same draws happen on CPU and GPU. Spectrograms
are ``(batch, channel, frequency, time)``; roll also takes waveforms ``(batch, samples)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from asc.errors import ConfigError


def sample_beta(alpha: float, n: int, generator: torch.Generator) -> Tensor:
    """``n`` draws of Beta(alpha, alpha) as float32.

    torch's Beta sampler cannot take a generator, so a numpy generator is seeded from ``generator``
    instead: the draws stay a pure function of the caller's seed.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    draws = np.random.default_rng(seed).beta(alpha, alpha, size=n)
    return torch.from_numpy(draws.astype(np.float32))


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Reshape ``(batch,)`` values to broadcast over the other dimensions of ``like``."""
    return values.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class MixedBatch:
    """A mixed batch and what is needed to mix its targets the same way."""

    x: Tensor
    perm: Tensor  # (batch,) partner of each row
    lam: Tensor  # (batch,) weight of the row's own sample, in [0, 1]


class Mixup:
    """Mixup with one Beta(alpha, alpha) weight per sample and a random partner per sample."""

    def __init__(self, alpha: float = 0.3) -> None:
        if alpha <= 0:
            raise ConfigError(
                f"mixup alpha={alpha} must be > 0 (set augment.mixup_alpha to 0 to turn mixup off)"
            )
        self.alpha = alpha

    def __call__(self, x: Tensor, generator: torch.Generator) -> MixedBatch:
        batch = x.shape[0]
        perm = torch.randperm(batch, generator=generator).to(x.device)
        lam = sample_beta(self.alpha, batch, generator).to(x.device)
        mixed = _per_sample(lam, x) * x + _per_sample(1 - lam, x) * x[perm]
        return MixedBatch(mixed, perm, lam)


def mix_targets(targets: Tensor, perm: Tensor, lam: Tensor) -> Tensor:
    """Mix ``(batch, classes)`` targets (one-hot or teacher probabilities) like their inputs."""
    lam = lam.to(targets.dtype).unsqueeze(1)
    return lam * targets + (1 - lam) * targets[perm]


def mixup_loss(logits: Tensor, y: Tensor, perm: Tensor, lam: Tensor) -> Tensor:
    """Cross-entropy against both labels of each mixed row, weighted by its mixing weight."""
    own = F.cross_entropy(logits, y, reduction="none")
    partner = F.cross_entropy(logits, y[perm], reduction="none")
    lam = lam.to(logits.dtype)
    return (lam * own + (1 - lam) * partner).mean()


def _band_mask(batch: int, size: int, count: int, max_width: int, generator: torch.Generator) -> Tensor:
    """``(batch, size)`` bool: the union of ``count`` bands per row, each of width U{0..max_width}."""
    width = torch.randint(0, min(max_width, size) + 1, (batch, count, 1), generator=generator)
    start = (torch.rand(batch, count, 1, generator=generator) * (size - width + 1)).long()
    position = torch.arange(size).view(1, 1, size)
    return ((position >= start) & (position < start + width)).any(dim=1)


class SpecAugment:
    """Frequency and time masks, drawn independently for every sample (shared across channels).

    ``fill=None`` fills with each sample's mean, which is neutral whether or not the front end
    normalises its output; a float fills with that constant (0 for normalised features).
    """

    def __init__(
        self,
        freq_masks: int = 1,
        freq_width: int = 48,
        time_masks: int = 0,
        time_width: int = 0,
        fill: float | None = None,
    ) -> None:
        for name, value in (("freq_masks", freq_masks), ("freq_width", freq_width),
                            ("time_masks", time_masks), ("time_width", time_width)):
            if value < 0:
                raise ConfigError(f"SpecAugment {name}={value} must be >= 0")
        self.freq_masks, self.freq_width = freq_masks, freq_width
        self.time_masks, self.time_width = time_masks, time_width
        self.fill = fill

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        batch, _, n_freq, n_time = x.shape
        freq = _band_mask(batch, n_freq, self.freq_masks, self.freq_width, generator)
        time = _band_mask(batch, n_time, self.time_masks, self.time_width, generator)
        mask = (freq[:, None, :, None] | time[:, None, None, :]).to(x.device)
        if self.fill is None:
            fill = x.mean(dim=(1, 2, 3), keepdim=True)
        else:
            fill = torch.tensor(self.fill, dtype=x.dtype, device=x.device)
        return torch.where(mask, fill, x)


class TimeRoll:
    """Circular shift along the last axis by U{-max_shift..max_shift}, independently per sample.

    Works on waveforms ``(batch, samples)`` (shift in samples) and spectrograms ``(..., time)``
    (shift in frames). Scenes are stationary enough that the wrapped-around start is harmless.
    """

    def __init__(self, max_shift: int) -> None:
        if max_shift < 0:
            raise ConfigError(f"TimeRoll max_shift={max_shift} must be >= 0")
        self.max_shift = max_shift

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        batch, length = x.shape[0], x.shape[-1]
        shift = torch.randint(-self.max_shift, self.max_shift + 1, (batch, 1), generator=generator)
        index = (torch.arange(length).view(1, length) - shift) % length
        flat = x.reshape(batch, -1, length)
        index = index.to(x.device).unsqueeze(1).expand(-1, flat.shape[1], -1)
        return flat.gather(2, index).reshape(x.shape)
