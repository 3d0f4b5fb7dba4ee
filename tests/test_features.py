"""LogMel: parity with librosa, golden vectors, shapes, config handling, exportability."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import librosa
import numpy as np
import pytest
import torch

from asc.audio import load_audio
from asc.errors import ConfigError
from asc.features import FeatureConfig, LogMel

_spec = importlib.util.spec_from_file_location(
    "make_golden", Path(__file__).with_name("data") / "make_golden.py"
)
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)

DCASE = FeatureConfig()
SPEECH_LIKE = FeatureConfig(
    sample_rate=16000, n_fft=512, win_length=480, hop_length=160, n_mels=40, center=False
)
# Every non-default branch at once: magnitude, HTK scale, no area norm, reflect padding, hamming.
VARIANT = FeatureConfig(
    sample_rate=22050,
    n_fft=1024,
    win_length=800,
    hop_length=256,
    window="hamming",
    n_mels=64,
    f_min=20.0,
    f_max=8000.0,
    pad_mode="reflect",
    power=1.0,
    mel_norm=None,
    htk=True,
    log_eps=1e-6,
)
TOLERANCE = 1e-4


def log_mel(config: FeatureConfig, audio: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return LogMel(config)(torch.from_numpy(audio)[None])[0, 0].double().numpy()


def noise_chirp(sample_rate: int, seconds: float = 3.0) -> np.ndarray:
    n = int(sample_rate * seconds)
    chirp = 0.5 * librosa.chirp(fmin=40, fmax=0.45 * sample_rate, sr=sample_rate, length=n)
    noise = 0.05 * np.random.default_rng(0).standard_normal(n)
    return (chirp + noise).astype(np.float32)


def parity(config: FeatureConfig, audio: np.ndarray) -> tuple[float, float]:
    """(log-mel max |diff| / max |ref|, worst per-frame max |diff| / max |ref| of mel power).

    Mel power is compared per frame because float32 FFT rounding is relative to a frame's energy:
    bands 80 dB below the frame peak carry ~1e-4 relative error in any float32 implementation.
    """
    ours = log_mel(config, audio)
    ref = golden.reference_log_mel(audio, config)
    assert ours.shape == ref.shape
    log_error = np.abs(ours - ref).max() / np.abs(ref).max()
    mel_ref = golden.reference_mel(audio, config)
    mel_ours = np.exp(ours * config.norm_std + config.norm_mean) - config.log_eps
    frame_error = (np.abs(mel_ours - mel_ref).max(axis=0) / mel_ref.max(axis=0)).max()
    return float(log_error), float(frame_error)


@pytest.mark.parametrize("config", [DCASE, SPEECH_LIKE, VARIANT], ids=["dcase", "16k", "variant"])
def test_matches_librosa_on_noise_and_chirp(config: FeatureConfig) -> None:
    log_error, frame_error = parity(config, noise_chirp(config.sample_rate))
    assert log_error <= TOLERANCE
    assert frame_error <= TOLERANCE


@pytest.mark.parametrize("config", [DCASE, SPEECH_LIKE], ids=["dcase", "16k"])
def test_matches_librosa_on_real_tau_clip(config: FeatureConfig, tau_fixtures: Path) -> None:
    clip = next((tau_fixtures / "tau2022uas_mobile").rglob("*.wav"))
    audio, _ = load_audio(clip, config.sample_rate)
    log_error, frame_error = parity(config, audio)
    assert log_error <= TOLERANCE
    assert frame_error <= TOLERANCE


@pytest.mark.parametrize("config", [DCASE, VARIANT], ids=["dcase", "variant"])
def test_training_and_deployment_front_ends_agree_closer_than_either_to_librosa(config: FeatureConfig) -> None:
    """LogMel (training, in-graph export) and FastLogMel (the runtime) are both float32 FFTs of the same
    power formula; a model trained on one and run on the other sees features 5e-5 apart at most."""
    from asc.feature_spec import FastLogMel

    audio = noise_chirp(config.sample_rate)
    ours, deployed = log_mel(config, audio), FastLogMel(config)(audio)[0].astype(np.float64)
    assert np.abs(ours - deployed).max() / np.abs(ours).max() <= 5e-5
    assert np.abs(ours - deployed).max() > 0  # two implementations, not one compared with itself


def test_parity_metric_catches_a_wrong_window() -> None:
    audio = noise_chirp(16000, seconds=1.0)
    ours = log_mel(replace(SPEECH_LIKE, window="hamming"), audio)
    ref = golden.reference_log_mel(audio, SPEECH_LIKE)
    assert np.abs(ours - ref).max() / np.abs(ref).max() > 100 * TOLERANCE


def test_reproduces_golden_vectors() -> None:
    data = np.load(golden.GOLDEN_PATH)
    config = FeatureConfig.from_dict(json.loads(str(data["config"])))
    ours = log_mel(config, data["signal"])
    assert ours.shape == data["log_mel"].shape == (config.n_mels, config.num_frames(16000))
    # float32 against float64 librosa: log values within 1e-4 absolute (normalised units).
    assert np.abs(ours - data["log_mel"]).max() <= 1e-4


def test_golden_file_matches_its_generator() -> None:
    data = np.load(golden.GOLDEN_PATH)
    assert json.loads(str(data["config"])) == golden.GOLDEN_CONFIG.to_dict()
    np.testing.assert_array_equal(data["signal"], golden.golden_signal())
    np.testing.assert_allclose(
        data["log_mel"], golden.reference_log_mel(data["signal"], golden.GOLDEN_CONFIG), atol=1e-12
    )
    module = LogMel(golden.GOLDEN_CONFIG)
    np.testing.assert_allclose(module.window.numpy(), data["window"], atol=1e-7)
    np.testing.assert_allclose(module.filterbank.numpy(), data["mel_filterbank"], rtol=1e-6)


def test_dcase_defaults_give_256_by_431_for_ten_seconds() -> None:
    waveform = torch.randn(2, 441000) * 0.1
    with torch.no_grad():
        out = LogMel()(waveform)
    assert DCASE.num_frames(441000) == 431
    assert out.shape == (2, 1, 256, 431)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("config", [DCASE, SPEECH_LIKE, VARIANT], ids=["dcase", "16k", "variant"])
@pytest.mark.parametrize("num_samples", [2048, 5000, 16001])
def test_num_frames_matches_the_output(config: FeatureConfig, num_samples: int) -> None:
    with torch.no_grad():
        out = LogMel(config)(torch.zeros(1, num_samples))
    assert out.shape[-1] == config.num_frames(num_samples)


def test_num_frames_rejects_clips_shorter_than_the_fft_without_centring() -> None:
    with pytest.raises(ConfigError, match="shorter than n_fft"):
        SPEECH_LIKE.num_frames(100)


def test_batch_items_are_independent() -> None:
    batch = torch.from_numpy(np.stack([noise_chirp(16000, 1.0), np.zeros(16000, np.float32)]))
    module = LogMel(SPEECH_LIKE)
    with torch.no_grad():
        together = module(batch)
        alone = torch.cat([module(batch[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    assert torch.allclose(together[1], torch.full_like(together[1], np.log(1e-5)))


def test_normalisation_is_applied_after_the_log() -> None:
    audio = torch.from_numpy(noise_chirp(16000, 1.0))[None]
    with torch.no_grad():
        plain = LogMel(SPEECH_LIKE)(audio)
        normalised = LogMel(replace(SPEECH_LIKE, norm_mean=-3.0, norm_std=2.0))(audio)
    torch.testing.assert_close(normalised, (plain + 3.0) / 2.0)


def test_buffers_follow_the_module_but_stay_out_of_checkpoints() -> None:
    module = LogMel(SPEECH_LIKE)
    assert dict(module.state_dict()) == {}
    assert {name for name, _ in module.named_buffers()} == {"window", "filterbank"}
    assert module.filterbank.shape == (40, 257)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_runs_on_cuda_like_on_cpu() -> None:
    audio = torch.from_numpy(noise_chirp(44100, 2.0))[None]
    module = LogMel(DCASE)
    with torch.no_grad():
        cpu = module(audio)
        gpu = module.to("cuda")(audio.to("cuda")).cpu()
    assert (gpu - cpu).abs().max() / cpu.abs().max() <= TOLERANCE


def test_exports_with_a_dynamic_batch() -> None:
    module = LogMel(SPEECH_LIKE).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    example = torch.randn(2, 16000)
    exported = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    three = torch.randn(3, 16000)
    torch.testing.assert_close(exported.module()(three), module(three))


def test_config_round_trips_through_json() -> None:
    restored = FeatureConfig.from_dict(json.loads(json.dumps(VARIANT.to_dict())))
    assert restored == VARIANT


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="n_mel"):
        FeatureConfig.from_dict({"n_mel": 128})


@pytest.mark.parametrize(
    "changes",
    [
        {"win_length": 4096},
        {"f_max": 30000.0},
        {"f_min": 9000.0, "f_max": 8000.0},
        {"pad_mode": "wrap"},
        {"mel_norm": "area"},
        {"hop_length": 0},
        {"log_eps": 0.0},
        {"norm_std": 0.0},
    ],
)
def test_invalid_settings_raise_config_error(changes: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(changes))):
        FeatureConfig(**changes)


def test_unknown_window_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="window"):
        LogMel(replace(SPEECH_LIKE, window="no-such-window"))
