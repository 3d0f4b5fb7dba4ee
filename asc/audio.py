"""Audio file I/O: decode anything soundfile reads into float32 arrays, resample, and fail clearly.

Every problem with a file surfaces as one :class:`~asc.errors.AudioError` naming the file, so a
dataset scan or ``asc classify`` can report it in one line instead of a libsndfile traceback. This
module stays torch-free because the deployment runtime reuses it.
"""

from __future__ import annotations

import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from asc.errors import AudioError, ConfigError
from asc.io import atomic_path

PathLike = str | os.PathLike[str]

# libsndfile logs "data : <declared> (should be <present>)" when a WAV's data chunk claims more
# bytes than the file holds, which is how an interrupted copy or download looks.
_WAV_DATA_SIZE = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_WAV_UNKNOWN_SIZE = 0xFFFFFFFF  # streaming writers put this in the header; it is not truncation
_REPLACE = "re-export or re-download the file"
# Integer PCM is read as integers and scaled here: the same float32 values libsndfile's own
# conversion gives (sample / 2^(bits-1); 24-bit samples arrive shifted into an int32) in under
# half its time, which matters when a 10-s clip's decode is a tenth of its classification.
_INTEGER_READS = {"PCM_16": ("int16", 2.0**-15), "PCM_24": ("int32", 2.0**-31)}
_FORMATS = "use WAV, FLAC or OGG"


@dataclass(frozen=True)
class AudioInfo:
    """What a file holds, read from its header only."""

    sample_rate: int
    channels: int
    frames: int
    duration: float
    format: str
    subtype: str


def probe_audio(path: PathLike) -> AudioInfo:
    """Describe a file without decoding its samples (fast dataset checks)."""
    with _open(path) as handle:
        return _info(path, handle)


def load_audio(
    path: PathLike, sample_rate: int | None = None, *, mono: bool = True
) -> tuple[np.ndarray, int]:
    """Decode to float32: ``(samples,)`` if mono (channel mean), else ``(channels, samples)``.

    Resamples to ``sample_rate`` when it is given and differs from the file's rate.
    """
    if sample_rate is not None and not _valid_rate(sample_rate):
        raise AudioError(
            path,
            f"cannot load at sample rate {sample_rate!r}",
            "pass a positive integer rate such as 44100",
        )
    with _open(path) as handle:
        info = _info(path, handle)
        integer = _INTEGER_READS.get(info.subtype)
        try:
            frames = handle.read(dtype=integer[0] if integer else "float32", always_2d=True)
        except (sf.SoundFileError, OSError) as error:
            raise AudioError(path, f"cannot decode audio ({_reason(error)})", _REPLACE) from None
    if frames.shape[0] < info.frames:
        raise AudioError(
            path,
            f"file is truncated: decoded {frames.shape[0]} of {info.frames} frames",
            _REPLACE,
        )
    if integer:  # integers cannot be NaN, and the scale is a power of two: exact in float32
        frames = np.multiply(frames, np.float32(integer[1]), dtype=np.float32)
    elif not np.isfinite(frames).all():
        raise AudioError(path, "audio contains NaN or infinite samples", _REPLACE)
    if not mono:
        audio = np.ascontiguousarray(frames.T)
    elif frames.shape[1] == 1:
        audio = frames[:, 0]
    else:  # the channel mean, summed over the rows of (channels, samples): numpy reduces a short
        # contiguous axis one frame at a time, ten times slower, and the sum is the same either way
        audio = np.add.reduce(frames.T, axis=0) / np.float32(frames.shape[1])
    if sample_rate is not None:
        audio = resample(audio, info.sample_rate, sample_rate)
    return audio.astype(np.float32, copy=False), sample_rate or info.sample_rate


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited resampling (soxr HQ) along the last axis; float32 out."""
    for name, rate in (("orig_sr", orig_sr), ("target_sr", target_sr)):
        if not _valid_rate(rate):
            raise ConfigError(f"resample: {name}={rate!r} is not a positive integer sample rate")
    if orig_sr == target_sr:
        return np.asarray(audio, dtype=np.float32)
    import librosa  # lazy: librosa's import cost is only worth paying when rates differ

    out = librosa.resample(
        np.asarray(audio, dtype=np.float32),
        orig_sr=int(orig_sr),
        target_sr=int(target_sr),
        res_type="soxr_hq",
        axis=-1,
    )
    return out.astype(np.float32, copy=False)


def fit_length(audio: np.ndarray, num_samples: int) -> np.ndarray:
    """Zero-pad at the end or crop the last axis to exactly ``num_samples``."""
    if num_samples < 0:
        raise ConfigError(f"fit_length: num_samples={num_samples} must be >= 0")
    have = audio.shape[-1]
    if have >= num_samples:
        return audio[..., :num_samples]
    pad = [(0, 0)] * (audio.ndim - 1) + [(0, num_samples - have)]
    return np.pad(audio, pad)


def load_clip(path: PathLike, sample_rate: int, num_samples: int) -> np.ndarray:
    """Mono clip at ``sample_rate`` and exactly ``num_samples`` long: what datasets feed models."""
    audio, _ = load_audio(path, sample_rate, mono=True)
    return fit_length(audio, num_samples)


def write_audio(
    path: PathLike, audio: np.ndarray, sample_rate: int, subtype: str = "PCM_16"
) -> None:
    """Write ``(samples,)`` or ``(channels, samples)`` atomically: readers never see half a file."""
    target = Path(path)
    container = target.suffix.lstrip(".").upper()
    if container not in sf.available_formats():
        raise AudioError(path, f"cannot write audio with extension {target.suffix!r}", _FORMATS)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(audio)
    frames = data.T if data.ndim == 2 else data  # soundfile wants (samples, channels)
    with atomic_path(target) as tmp:
        sf.write(tmp, frames, sample_rate, subtype=subtype, format=container)


def _open(path: PathLike) -> sf.SoundFile:
    """Open with every pre-decode check, turning libsndfile failures into AudioError."""
    file = Path(path)
    if not file.exists():
        raise AudioError(path, "file not found", "check the path")
    if file.is_dir():
        raise AudioError(path, "is a directory, not an audio file", "pass a file inside it")
    if file.stat().st_size == 0:
        raise AudioError(path, "file is empty (0 bytes)", _REPLACE)
    try:
        return sf.SoundFile(file)
    except (sf.SoundFileError, OSError) as error:
        raise AudioError(
            path,
            f"not a readable audio file ({_reason(error)})",
            f"{_FORMATS}, or re-export the file",
        ) from None


def _info(path: PathLike, handle: sf.SoundFile) -> AudioInfo:
    declared = _WAV_DATA_SIZE.search(handle.extra_info) if handle.format == "WAV" else None
    if declared and _WAV_UNKNOWN_SIZE > int(declared[1]) > int(declared[2]):
        raise AudioError(
            path,
            f"WAV is truncated: header declares {declared[1]} data bytes, file holds {declared[2]}",
            _REPLACE,
        )
    if handle.frames <= 0:
        raise AudioError(path, "file contains no audio samples", _REPLACE)
    return AudioInfo(
        sample_rate=handle.samplerate,
        channels=handle.channels,
        frames=handle.frames,
        duration=handle.frames / handle.samplerate,
        format=handle.format,
        subtype=handle.subtype,
    )


def _reason(error: Exception) -> str:
    text = getattr(error, "error_string", None) or str(error)
    return " ".join(text.split()).rstrip(".")


def _valid_rate(rate: object) -> bool:
    return isinstance(rate, numbers.Integral) and not isinstance(rate, bool) and rate > 0

