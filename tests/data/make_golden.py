"""Regenerate ``frontend_golden.npz``: the vectors any reimplementation of the front end must match.

Run ``python tests/data/make_golden.py`` from the repository root. The reference is librosa in
float64, independent of ``asc.features.LogMel``, so the file checks the torch module and a phone
implementation against the same ground truth. The tests import the reference functions from here.

Contents (see docs/frontend.md): ``signal`` (float32, 1 s), ``config`` (JSON of a FeatureConfig),
``window`` (n_fft,), ``mel_filterbank`` (n_mels, n_fft // 2 + 1) and ``log_mel`` (n_mels, frames),
all float64 except the signal.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import librosa
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from asc.feature_spec import FeatureConfig, analysis_window, log_mel, mel_filterbank  # noqa: E402

GOLDEN_PATH = Path(__file__).with_name("frontend_golden.npz")

# Small enough to keep the file tiny, yet it exercises every step: a window shorter than the FFT,
# a band-limited filterbank, centre padding and the fixed normalisation.
GOLDEN_CONFIG = FeatureConfig(
    sample_rate=16000,
    n_fft=512,
    win_length=400,
    hop_length=160,
    n_mels=40,
    f_min=50.0,
    f_max=7600.0,
    norm_mean=-6.0,
    norm_std=5.0,
)


def golden_signal(sample_rate: int = GOLDEN_CONFIG.sample_rate) -> np.ndarray:
    """1 s of chirp + tone + noise, ending in 0.1 s of silence so the log floor is exercised."""
    num_samples = sample_rate
    t = np.arange(num_samples) / sample_rate
    chirp = librosa.chirp(fmin=100, fmax=0.45 * sample_rate, sr=sample_rate, length=num_samples)
    tone = 0.2 * np.sin(2 * np.pi * 440.0 * t)
    noise = 0.01 * np.random.default_rng(2021).standard_normal(num_samples)
    signal = 0.3 * chirp + tone + noise
    signal[-num_samples // 10 :] = 0.0
    return signal.astype(np.float32)


def reference_mel(signal: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """librosa's mel spectrogram in float64 with exactly the config's settings."""
    return librosa.feature.melspectrogram(
        y=np.asarray(signal, dtype=np.float64), dtype=np.float64, **config.librosa_kwargs()
    )


def reference_log_mel(signal: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """The front end's definition (log(mel + eps), then the fixed normalisation), in float64."""
    return log_mel(signal, config, dtype=np.float64)


def main() -> None:
    signal = golden_signal()
    np.savez_compressed(
        GOLDEN_PATH,
        signal=signal,
        config=np.array(json.dumps(GOLDEN_CONFIG.to_dict())),
        window=analysis_window(GOLDEN_CONFIG),
        mel_filterbank=mel_filterbank(GOLDEN_CONFIG),
        log_mel=reference_log_mel(signal, GOLDEN_CONFIG),
    )
    print(f"wrote {GOLDEN_PATH} ({GOLDEN_PATH.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
