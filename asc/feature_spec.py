"""The front-end specification, torch-free: settings, window, filterbank, the reference and a fast numpy version.

Training uses the torch implementation in :mod:`asc.features`; the runtime on an exported bundle
and a phone app use this spec (docs/frontend.md). Keeping it free of torch is what lets
:mod:`asc.runtime` compute features for bundles whose front end is not inside the ONNX graph.
:func:`log_mel` (librosa) defines the features; :class:`FastLogMel` is what deployment runs.
"""

from __future__ import annotations

import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import librosa
import numpy as np
import scipy.fft
import scipy.sparse

from asc.errors import AscError, ConfigError
from asc.io import atomic_path

PAD_MODES = ("constant", "reflect")  # the modes librosa and torch.stft define identically
MEL_NORMS = ("slaney", None)


@dataclass(frozen=True)
class FeatureConfig:
    """Front-end settings; the defaults are the DCASE 2021 Task 1a ones (256 x 431 per 10-s clip).

    ``norm_mean``/``norm_std`` apply a fixed ``(log_mel - mean) / std`` after the log, so dataset
    statistics can travel inside an exported model instead of in app code.
    """

    sample_rate: int = 44100
    n_fft: int = 2048
    win_length: int | None = None  # None: n_fft
    hop_length: int = 1024
    window: str = "hann"
    n_mels: int = 256
    f_min: float = 0.0
    f_max: float | None = None  # None: sample_rate / 2
    center: bool = True
    pad_mode: str = "constant"
    power: float = 2.0
    mel_norm: str | None = "slaney"
    htk: bool = False
    log_eps: float = 1e-5
    norm_mean: float = 0.0
    norm_std: float = 1.0

    def __post_init__(self) -> None:
        problems = [
            message
            for failed, message in (
                (self.sample_rate <= 0, f"sample_rate={self.sample_rate} must be > 0"),
                (self.n_fft <= 0, f"n_fft={self.n_fft} must be > 0"),
                (self.hop_length <= 0, f"hop_length={self.hop_length} must be > 0"),
                (self.n_mels <= 0, f"n_mels={self.n_mels} must be > 0"),
                (
                    not 0 < self.effective_win_length <= self.n_fft,
                    f"win_length={self.win_length} must be in 1..n_fft={self.n_fft}",
                ),
                (
                    not 0 <= self.f_min < self.effective_f_max <= self.sample_rate / 2,
                    (f"need 0 <= f_min < f_max <= sample_rate/2, got f_min={self.f_min}, "
                     f"f_max={self.f_max}, sample_rate={self.sample_rate}"),
                ),
                (self.pad_mode not in PAD_MODES, f"pad_mode={self.pad_mode!r} not in {PAD_MODES}"),
                (self.mel_norm not in MEL_NORMS, f"mel_norm={self.mel_norm!r} not in {MEL_NORMS}"),
                (self.power <= 0, f"power={self.power} must be > 0"),
                (self.log_eps <= 0, f"log_eps={self.log_eps} must be > 0"),
                (self.norm_std <= 0, f"norm_std={self.norm_std} must be > 0"),
            )
            if failed
        ]
        if problems:
            raise ConfigError("features: " + "; ".join(problems))

    @property
    def effective_win_length(self) -> int:
        return self.n_fft if self.win_length is None else self.win_length

    @property
    def effective_f_max(self) -> float:
        return self.sample_rate / 2 if self.f_max is None else self.f_max

    def num_frames(self, num_samples: int) -> int:
        """Frames the front end produces for a clip of ``num_samples`` samples."""
        padded = num_samples + 2 * (self.n_fft // 2) if self.center else num_samples
        if padded < self.n_fft:
            raise ConfigError(
                f"features: {num_samples} samples is shorter than n_fft={self.n_fft} "
                "with center=False; use longer clips or center=True"
            )
        return 1 + (padded - self.n_fft) // self.hop_length

    def librosa_kwargs(self) -> dict[str, Any]:
        """Arguments for ``librosa.feature.melspectrogram`` that give this config's mel power.

        The independent reference the tests, golden vectors and benchmark compare against.
        """
        return {
            "sr": self.sample_rate,
            "n_fft": self.n_fft,
            "hop_length": self.hop_length,
            "win_length": self.win_length,
            "window": self.window,
            "center": self.center,
            "pad_mode": self.pad_mode,
            "power": self.power,
            "n_mels": self.n_mels,
            "fmin": self.f_min,
            "fmax": self.f_max,
            "htk": self.htk,
            "norm": self.mel_norm,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureConfig:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            known = ", ".join(f.name for f in fields(cls))
            raise ConfigError(f"features: unknown keys {unknown}; valid keys: {known}")
        return cls(**data)


def analysis_window(config: FeatureConfig) -> np.ndarray:
    """The periodic window of ``win_length`` samples, zero-padded to ``n_fft`` about the centre."""
    try:
        window = librosa.filters.get_window(
            config.window, config.effective_win_length, fftbins=True
        )
    except ValueError as error:
        raise ConfigError(f"features: unknown window {config.window!r} ({error})") from None
    return librosa.util.pad_center(window, size=config.n_fft)


def mel_filterbank(config: FeatureConfig) -> np.ndarray:
    """The ``(n_mels, n_fft // 2 + 1)`` triangular filterbank, float64."""
    return librosa.filters.mel(
        sr=config.sample_rate,
        n_fft=config.n_fft,
        n_mels=config.n_mels,
        fmin=config.f_min,
        fmax=config.effective_f_max,
        htk=config.htk,
        norm=config.mel_norm,
        dtype=np.float64,
    )


def log_mel(waveform: np.ndarray, config: FeatureConfig, dtype: type = np.float32) -> np.ndarray:
    """Log-mel ``(..., n_mels, frames)`` of waveforms ``(..., samples)``, computed by librosa in ``dtype``.

    The reference definition: :class:`asc.features.LogMel` and :class:`FastLogMel` are held to it
    (relative error 1e-4), and golden vectors are made from it. It is kept as librosa, not as the
    faster code, so the definition stays independent of what is being checked against it.
    """
    power = librosa.feature.melspectrogram(y=np.asarray(waveform, dtype=dtype), dtype=dtype,
                                           **config.librosa_kwargs())
    features = np.log(power + config.log_eps)
    if (config.norm_mean, config.norm_std) != (0.0, 1.0):
        features = (features - config.norm_mean) / config.norm_std
    return features.astype(dtype, copy=False)


FRONTEND_ARRAYS_NAME = "frontend.npz"


@dataclass(frozen=True, eq=False)
class FrontendArrays:
    """The analysis window and mel filterbank of a spec, float32, as a bundle ships them.

    Computing them needs librosa, whose filter code takes longer to import than a whole
    classification; a bundle stores them so the runtime starts fast and an app on a phone reads
    the exact filters instead of re-implementing librosa's.
    """

    window: np.ndarray  #: (n_fft,)
    mel_filterbank: np.ndarray  #: (n_mels, n_fft // 2 + 1)

    @classmethod
    def compute(cls, config: FeatureConfig) -> FrontendArrays:
        return cls(analysis_window(config).astype(np.float32), mel_filterbank(config).astype(np.float32))

    def save(self, path: Path) -> None:
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as handle:
            np.savez_compressed(handle, window=self.window, mel_filterbank=self.mel_filterbank)

    @classmethod
    def load(cls, path: Path, config: FeatureConfig) -> FrontendArrays:
        """The arrays in ``path``, checked against ``config``; any problem is one AscError."""
        fix = "re-export the bundle with `asc export`"
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = cls(data["window"].astype(np.float32), data["mel_filterbank"].astype(np.float32))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            raise AscError(f"{path}: not a readable front-end file ({type(error).__name__}); {fix}") from None
        bins = config.n_fft // 2 + 1
        if arrays.window.shape != (config.n_fft,) or arrays.mel_filterbank.shape != (config.n_mels, bins):
            raise AscError(f"{path}: window {arrays.window.shape} and filterbank {arrays.mel_filterbank.shape} do "
                           f"not fit the spec (n_fft {config.n_fft}, n_mels {config.n_mels}); {fix}")
        return arrays


class FastLogMel:
    """:func:`log_mel` in float32 numpy/scipy, about 3x faster: the front end deployment runs.

    On a 10-s 44.1 kHz clip librosa's log-mel costs about as much as an int8 model, so for
    bundles whose front end is outside the graph it would be near half the end-to-end time. This
    builds the window and the filterbank once (the filterbank as a sparse matrix: under 1 % of it
    is non-zero) and keeps each clip's frames in cache. One FFT worker, so a caller's thread
    budget is not overrun. Parity with :func:`log_mel` is tested to a relative error of 1e-4.
    """

    def __init__(self, config: FeatureConfig, arrays: FrontendArrays | None = None) -> None:
        self.config = config
        arrays = arrays or FrontendArrays.compute(config)
        self._window = arrays.window
        self._filterbank = scipy.sparse.csr_array(arrays.mel_filterbank)
        self._pad = config.n_fft // 2 if config.center else 0

    def __call__(self, waveforms: np.ndarray) -> np.ndarray:
        """Log-mel ``(batch, 1, n_mels, frames)`` of ``(batch, samples)``; ``(1, n_mels, frames)`` of ``(samples,)``.

        The channel dimension is there because it is the layout the exported models take.
        """
        cfg = self.config
        audio = np.asarray(waveforms, dtype=np.float32)
        if audio.ndim not in (1, 2) or audio.shape[-1] == 0:
            raise ConfigError(f"features: expected (samples,) or (batch, samples) audio with samples >= 1, "
                              f"got shape {audio.shape}; pass mono waveforms")
        clips = audio.reshape(-1, audio.shape[-1])
        out = np.empty((len(clips), 1, cfg.n_mels, cfg.num_frames(clips.shape[1])), dtype=np.float32)
        for clip, features in zip(clips, out[:, 0]):
            self._log_mel_into(clip, features)
        return out.reshape(*audio.shape[:-1], *out.shape[1:])

    def _log_mel_into(self, clip: np.ndarray, out: np.ndarray) -> None:
        """One clip's log-mel, written into ``out`` ``(n_mels, frames)``."""
        cfg = self.config
        padded = np.pad(clip, self._pad, mode=cfg.pad_mode) if self._pad else clip
        frames = np.lib.stride_tricks.sliding_window_view(padded, cfg.n_fft)[:: cfg.hop_length]
        spectrum = scipy.fft.rfft(frames * self._window, axis=-1)
        # |X| laid out (bins, frames) in one pass, so the filterbank product reads contiguous rows.
        magnitude = np.abs(spectrum.T, order="C")
        if cfg.power == 2.0:
            np.square(magnitude, out=magnitude)
        elif cfg.power != 1.0:
            np.power(magnitude, np.float32(cfg.power), out=magnitude)
        mel = self._filterbank @ magnitude
        np.log(mel + np.float32(cfg.log_eps), out=out)
        if (cfg.norm_mean, cfg.norm_std) != (0.0, 1.0):
            out -= np.float32(cfg.norm_mean)
            out /= np.float32(cfg.norm_std)
