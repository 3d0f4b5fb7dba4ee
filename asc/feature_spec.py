"""The front-end specification, torch-free: settings, window, filterbank, the reference and a fast numpy version.

Training uses the torch implementation in :mod:`asc.features`; the runtime on an exported bundle
and a phone app use this spec (docs/frontend.md). Keeping it free of torch is what lets
:mod:`asc.runtime` compute features for bundles whose front end is not inside the ONNX graph.
:func:`log_mel` (librosa) defines the features; :class:`FastLogMel` is what deployment runs.
"""

from __future__ import annotations

import threading
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
    """:func:`log_mel` in float32 numpy/scipy: the front end deployment runs.

    On a 10-s 44.1 kHz clip the FFT alone costs about a tenth of an int8 model, so everything
    around it must cost little, also on a busy machine where the model has just evicted the
    caches. It therefore works through the frames in blocks of :data:`BLOCK_FRAMES` whose
    windowed frames, spectrum and power stay in the L2 cache, and reuses per-thread work buffers,
    so a clip allocates no large temporaries (fresh multi-MB arrays cost page faults on every
    call). The window and the filterbank are built once per spec; the filterbank is a sparse
    matrix (under 1 % of it is non-zero). The spectrum comes out with bins as rows, so the power
    ``re² + im²`` (the formula of :class:`asc.features.LogMel`) and the filterbank product read
    contiguous memory without a transpose. One FFT worker, so a caller's thread budget is not
    overrun. Parity with :func:`log_mel` is tested to a relative error of 1e-4.
    """

    def __init__(self, config: FeatureConfig, arrays: FrontendArrays | None = None) -> None:
        self.config = config
        arrays = arrays or FrontendArrays.compute(config)
        self._window = np.ascontiguousarray(arrays.window, dtype=np.float32)
        self._filterbank = scipy.sparse.csr_array(arrays.mel_filterbank.astype(np.float32, copy=False))
        self._pad = config.n_fft // 2 if config.center else 0
        self._work = threading.local()  # per-thread buffers: one instance may serve several threads

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

    def _buffers(self) -> _WorkBuffers:
        """This thread's work buffers, made on its first clip."""
        work: _WorkBuffers | None = getattr(self._work, "buffers", None)
        if work is None:
            work = self._work.buffers = _WorkBuffers.make(self.config)
        return work

    def _frame_runs(self, clip: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(first frame, strided frames) that together give every frame of the padded clip, in order.

        The frames that lie inside the clip are views of it; only the few at each end that reach
        into the ``center`` padding come from small padded copies, so the clip is never copied whole.
        """
        cfg, pad, hop = self.config, self._pad, self.config.hop_length
        n, total = len(clip), cfg.num_frames(len(clip))

        def frames(signal: np.ndarray) -> np.ndarray:
            return np.lib.stride_tricks.sliding_window_view(signal, cfg.n_fft)[::hop]

        if not pad:
            return [(0, frames(clip))]
        first = -(-pad // hop)  # frames first..last start and end inside the clip
        last = (n + pad - cfg.n_fft) // hop
        # Each end's copy keeps pad + 1 samples of the clip beyond what its frames read: "reflect" mirrors them.
        head_end = max((first - 1) * hop + cfg.n_fft - pad, pad + 1)
        tail_start = (last + 1) * hop - pad
        tail_from = min(tail_start, n - pad - 1)
        if last < first or head_end > n or tail_from < 0:  # a short clip: pad it whole
            return [(0, frames(np.pad(clip, pad, mode=cfg.pad_mode)))]
        runs = [(0, frames(np.pad(clip[:head_end], (pad, 0), mode=cfg.pad_mode))[:first]),
                (first, frames(clip[first * hop - pad : last * hop - pad + cfg.n_fft]))]
        if total > last + 1:
            tail = np.pad(clip[tail_from:], (0, pad), mode=cfg.pad_mode)[tail_start - tail_from :]
            runs.append((last + 1, frames(tail)[: total - last - 1]))
        return runs

    def _log_mel_into(self, clip: np.ndarray, out: np.ndarray) -> None:
        """One clip's log-mel, written into ``out`` ``(n_mels, frames)``."""
        cfg = self.config
        work = self._buffers()
        runs = self._frame_runs(clip)
        half_power = np.float32(cfg.power / 2)
        for start in range(0, out.shape[1], BLOCK_FRAMES):
            stop = min(start + BLOCK_FRAMES, out.shape[1])
            windowed = work.windowed[: stop - start]
            for first, frames in runs:
                lo, hi = max(start, first), min(stop, first + len(frames))
                if lo < hi:
                    np.multiply(frames[lo - first : hi - first], self._window, out=windowed[lo - start : hi - start])
            # Transforming the transposed block gives the (bins, frames) layout the filterbank reads.
            parts = scipy.fft.rfft(windowed.T, axis=0).view(np.float32)  # (bins, 2 * frames): re, im
            np.square(parts, out=parts)
            power = np.add(parts[:, 0::2], parts[:, 1::2],
                           out=work.power if stop - start == BLOCK_FRAMES else None)
            if half_power == 0.5:
                np.sqrt(power, out=power)
            elif half_power != 1:
                np.power(power, half_power, out=power)
            out[:, start:stop] = self._filterbank @ power
        out += np.float32(cfg.log_eps)
        np.log(out, out=out)
        if (cfg.norm_mean, cfg.norm_std) != (0.0, 1.0):
            out -= np.float32(cfg.norm_mean)
            out /= np.float32(cfg.norm_std)


BLOCK_FRAMES = 32
"""Frames per block of :class:`FastLogMel`: at n_fft 2048 a block's windowed frames, spectrum and
power take about 0.6 MB, which fits the L2 cache of current x86 and ARM cores. Smaller blocks pay
more per-call overhead, larger ones spill to L3: 16, 48, 64 and 128 took 3-14 % more CPU time
(docs/frontend.md §9)."""


@dataclass(frozen=True, eq=False)
class _WorkBuffers:
    """Arrays :class:`FastLogMel` reuses from clip to clip on one thread."""

    windowed: np.ndarray  #: (BLOCK_FRAMES, n_fft) windowed frames of one block
    power: np.ndarray  #: (n_fft // 2 + 1, BLOCK_FRAMES) power spectrum of one full block

    @classmethod
    def make(cls, config: FeatureConfig) -> _WorkBuffers:
        bins = config.n_fft // 2 + 1
        return cls(np.empty((BLOCK_FRAMES, config.n_fft), np.float32), np.empty((bins, BLOCK_FRAMES), np.float32))
