"""Normalisation layers, chosen by name in configs.

Two families:

* channel norms with batch statistics and learned affine, built per layer from a factory:
  ``"bn"`` (BatchNorm2d) and ``"ssn"`` (SubSpectralNorm, one BatchNorm per channel and sub-band);
* parameter-free frequency-wise norms with per-clip statistics (identical in training and
  inference): ``"ifn"``, ``"resnorm"``, ``"rfn"``; plus ``"bn"`` and ``"none"`` as the baselines
  they are compared against.

The frequency-wise norms subclass :class:`FreqNorm`, so export code can find them (e.g. to keep
them out of int8 quantisation) with one ``isinstance`` check.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
from torch import nn

from asc.errors import ConfigError

NormFactory = Callable[[int], nn.Module]
"""Builds a normalisation layer for a given number of channels."""

EPS = 1e-5


class SubSpectralNorm(nn.Module):
    """BatchNorm with separate statistics and affine per (channel, frequency sub-band).

    Different frequency regions of a spectrogram have different statistics; one BN per band
    keeps them apart. In inference it is an ordinary BN, so it folds into the preceding conv.
    """

    def __init__(self, channels: int, sub_bands: int, eps: float = EPS) -> None:
        super().__init__()
        if sub_bands < 1:
            raise ConfigError(f"sub_bands must be at least 1, got {sub_bands}")
        self.sub_bands = sub_bands
        self.bn = nn.BatchNorm2d(channels * sub_bands, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, f, t = x.shape
        if f % self.sub_bands:
            raise ConfigError(
                f"SubSpectralNorm: frequency size {f} is not divisible by {self.sub_bands} sub-bands; "
                "choose n_mels so that every stage's frequency size divides by sub_bands"
            )
        # (N, C, F, T) -> (N, C*S, F/S, T): channel c, band s becomes BN channel c*S + s.
        bands = x.reshape(n, c * self.sub_bands, f // self.sub_bands, t)
        return self.bn(bands).reshape(n, c, f, t)


class FreqNorm(nn.Module, ABC):
    """Base of the per-clip frequency-wise norms: ``y = d * a + b`` with ``d = x - shift``.

    Statistics are per (sample, frequency bin) over channel and time, computed in one pass as
    E[d] and E[d^2], reducing the contiguous time axis first and then channels (about 3x cheaper
    than the textbook two-pass form on CPU, see compression.md 4.1). ``d`` is ``x`` shifted by
    one of its own values per (sample, bin); without that shift, E[x^2] - E[x]^2 loses most of
    its float32 digits when a bin's mean is large relative to its spread (raw log-mels, bins at
    the log floor). The shift cost no measurable time in onnxruntime. The output does not depend
    on the shift, so it carries no gradient.
    """

    def __init__(self, eps: float = EPS) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype in (torch.bfloat16, torch.float16):  # CUDA autocast: E[d^2] - E[d]^2 needs float32 digits
            x = x.float()
        # Time first: once an int8 graph runs channels-last, slicing channel 0 first strides across the
        # whole tensor, slicing time 0 first reads one column (2.5 % of the c=40 int8 model on an AMD EPYC
        # with AVX-512 VNNI, 0 in fp32).
        shift = x[..., :1][:, :1].detach()
        d = x - shift
        mean = d.mean(dim=3, keepdim=True).mean(dim=1, keepdim=True)
        mean_sq = (d * d).mean(dim=3, keepdim=True).mean(dim=1, keepdim=True)
        var = (mean_sq - mean * mean).clamp(min=0.0)
        scale, offset = self.coefficients(shift, mean, var)
        y = d * scale + offset
        return y if y.dtype == dtype else y.to(dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"

    @abstractmethod
    def coefficients(
        self, shift: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and offset applied to the shifted input, from per-bin statistics of it.

        All arguments have shape (N, 1, F, 1); ``mean`` and ``var`` are those of ``x - shift``.
        """


class InstanceFreqNorm(FreqNorm):
    """IFN: removes each clip's per-frequency mean and scale, where device responses live."""

    def coefficients(
        self, shift: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inv_std = torch.rsqrt(var + self.eps)
        return inv_std, -mean * inv_std


class ResNorm(FreqNorm):
    """Residual normalisation ``lam * x + IFN(x)``: the shortcut keeps some of what IFN discards."""

    def __init__(self, lam: float = 0.1, eps: float = EPS) -> None:
        super().__init__(eps)
        self.lam = lam

    def coefficients(
        self, shift: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inv_std = torch.rsqrt(var + self.eps)
        return self.lam + inv_std, self.lam * shift - mean * inv_std

    def extra_repr(self) -> str:
        return f"lam={self.lam}, {super().extra_repr()}"


class RelaxedFreqNorm(FreqNorm):
    """RFN ``lam * LN(x) + (1 - lam) * IFN(x)``: like ResNorm, but scale-free in its input.

    LN statistics (over channel, frequency and time) come from the per-bin ones by the law of
    total variance, so the input is read only once.
    """

    def __init__(self, lam: float = 0.5, eps: float = EPS) -> None:
        super().__init__(eps)
        self.lam = lam

    def coefficients(
        self, shift: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        bin_mean = mean + shift
        clip_mean = bin_mean.mean(dim=2, keepdim=True)
        clip_var = var.mean(dim=2, keepdim=True) + (bin_mean - clip_mean).square().mean(dim=2, keepdim=True)
        ln_scale = self.lam * torch.rsqrt(clip_var + self.eps)
        ifn_scale = (1.0 - self.lam) * torch.rsqrt(var + self.eps)
        return ln_scale + ifn_scale, (shift - clip_mean) * ln_scale - mean * ifn_scale

    def extra_repr(self) -> str:
        return f"lam={self.lam}, {super().extra_repr()}"


_CHANNEL_NORMS = ("bn", "ssn")
_FREQ_NORMS = ("resnorm", "rfn", "ifn", "bn", "none")
_WITH_LAMBDA = ("resnorm", "rfn")


def norm_names(kind: Literal["channel", "freq"]) -> tuple[str, ...]:
    """Valid names for :func:`norm_factory` (``"channel"``) or :func:`freq_norm` (``"freq"``)."""
    return _CHANNEL_NORMS if kind == "channel" else _FREQ_NORMS


def norm_factory(name: str, *, sub_bands: int = 1) -> NormFactory:
    """Channel-norm factory by name; ``sub_bands`` is used by ``"ssn"`` only."""
    if name == "bn":
        return nn.BatchNorm2d
    if name == "ssn":
        return partial(SubSpectralNorm, sub_bands=sub_bands)
    raise ConfigError(f"unknown channel norm {name!r}; valid: {', '.join(_CHANNEL_NORMS)}")


def freq_norm(name: str, channels: int = 1, *, lam: float | None = None) -> nn.Module:
    """Frequency-wise norm by name; ``channels`` matters for ``"bn"`` only.

    ``lam`` overrides the shortcut weight of ``"resnorm"`` (default 0.1) and ``"rfn"``
    (default 0.5); the other norms have none, so passing it there is a config mistake.
    """
    builders: dict[str, Callable[..., nn.Module]] = {
        "resnorm": ResNorm,
        "rfn": RelaxedFreqNorm,
        "ifn": InstanceFreqNorm,
        "bn": partial(nn.BatchNorm2d, channels),
        "none": nn.Identity,
    }
    if name not in builders:
        raise ConfigError(f"unknown frequency norm {name!r}; valid: {', '.join(_FREQ_NORMS)}")
    if lam is None:
        return builders[name]()
    if name not in _WITH_LAMBDA:
        raise ConfigError(
            f"frequency norm {name!r} has no lambda; drop the lambda or use one of {', '.join(_WITH_LAMBDA)}"
        )
    return builders[name](lam=lam)
