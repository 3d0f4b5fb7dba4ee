"""Audio I/O: round trips, mixing, resampling accuracy, fitting, errors, the real TAU clips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asc.audio import (
    AudioInfo,
    fit_length,
    load_audio,
    load_clip,
    probe_audio,
    resample,
    write_audio,
)
from asc.errors import AudioError, ConfigError

REPO = Path(__file__).resolve().parents[1]


def sine(frequency: float, sample_rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def noise(num_samples: int, channels: int | None = None, seed: int = 0) -> np.ndarray:
    shape = (num_samples,) if channels is None else (channels, num_samples)
    return np.clip(0.3 * np.random.default_rng(seed).standard_normal(shape), -0.99, 0.99).astype(
        np.float32
    )


def tone_frequency_and_amplitude(audio: np.ndarray, sample_rate: int) -> tuple[float, float]:
    """Least-squares fit of a sinusoid around the FFT peak: frequency (Hz) and amplitude."""
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    peak = int(spectrum.argmax())
    a, b, c = np.log(spectrum[peak - 1 : peak + 2])
    frequency = (peak + 0.5 * (a - c) / (a - 2 * b + c)) * sample_rate / len(audio)
    t = np.arange(len(audio)) / sample_rate
    basis = np.stack([np.sin(2 * np.pi * frequency * t), np.cos(2 * np.pi * frequency * t)], 1)
    coefficients, *_ = np.linalg.lstsq(basis, audio, rcond=None)
    return float(frequency), float(np.hypot(*coefficients))


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    ("name", "subtype", "tolerance"),
    [
        ("clip.wav", "PCM_16", 1 / 2**15),
        ("clip.wav", "PCM_24", 1 / 2**23),
        ("clip.wav", "FLOAT", 0.0),
        ("clip.flac", "PCM_16", 1 / 2**15),
        ("clip.flac", "PCM_24", 1 / 2**23),
    ],
)
def test_round_trip(tmp_path: Path, name: str, subtype: str, tolerance: float) -> None:
    audio = noise(8000)
    path = tmp_path / name
    write_audio(path, audio, 16000, subtype=subtype)
    loaded, rate = load_audio(path)
    assert rate == 16000
    assert loaded.dtype == np.float32 and loaded.shape == (8000,)
    assert np.abs(loaded - audio).max() <= tolerance
    assert probe_audio(path) == AudioInfo(
        sample_rate=16000,
        channels=1,
        frames=8000,
        duration=0.5,
        format=name.split(".")[1].upper(),
        subtype=subtype,
    )


def test_stereo_is_mixed_to_the_channel_mean(tmp_path: Path) -> None:
    stereo = noise(4000, channels=2)
    path = tmp_path / "stereo.wav"
    write_audio(path, stereo, 22050, subtype="FLOAT")
    mono, _ = load_audio(path)
    both, _ = load_audio(path, mono=False)
    assert mono.shape == (4000,) and both.shape == (2, 4000)
    np.testing.assert_allclose(mono, stereo.mean(axis=0), atol=1e-7)
    np.testing.assert_array_equal(both, stereo)


@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize(("name", "subtype"), [("a.wav", "PCM_16"), ("a.wav", "PCM_24"), ("a.flac", "PCM_16"),
                                               ("a.flac", "PCM_24"), ("a.wav", "PCM_U8"), ("a.wav", "FLOAT")])
def test_decoding_gives_libsndfiles_float_samples_bit_for_bit(tmp_path: Path, name: str, subtype: str,
                                                              channels: int) -> None:
    # Integer PCM is read as integers and scaled in numpy (faster); the values must be libsndfile's own.
    path = tmp_path / name
    sf.write(path, noise(3000, channels=channels).T, 16000, subtype=subtype)
    reference, _ = sf.read(path, dtype="float32", always_2d=True)
    mono, _ = load_audio(path)
    both, _ = load_audio(path, mono=False)
    assert mono.dtype == both.dtype == np.float32 and mono.flags.c_contiguous
    np.testing.assert_array_equal(both, reference.T)
    np.testing.assert_array_equal(mono, reference.mean(axis=1))
    assert len(np.unique(mono)) > 100  # real samples, not a constant both sides agree on


def test_write_is_atomic_and_creates_folders(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "clip.wav"
    write_audio(path, noise(100), 8000)
    write_audio(path, noise(200, seed=1), 8000)  # overwrite in place
    assert sf.info(str(path)).frames == 200
    assert sorted(p.name for p in path.parent.iterdir()) == ["clip.wav"]


def test_write_rejects_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match=r"clip\.xyz"):
        write_audio(tmp_path / "clip.xyz", noise(100), 8000)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- resampling


def test_resampling_48k_to_44k1_keeps_frequency_and_amplitude() -> None:
    original = sine(1000.0, 48000, 1.0, amplitude=0.5)
    resampled = resample(original, 48000, 44100)
    assert resampled.dtype == np.float32 and resampled.shape == (44100,)
    middle = resampled[4410:-4410]  # away from the filter's edge transients
    frequency, amplitude = tone_frequency_and_amplitude(middle, 44100)
    assert abs(frequency - 1000.0) < 0.01
    assert abs(amplitude - 0.5) < 1e-4  # a crude (linear) resampler loses ~5e-4 here


def test_load_audio_resamples_each_channel(tmp_path: Path) -> None:
    path = tmp_path / "tones.wav"
    write_audio(path, np.stack([sine(440.0, 48000, 1.0), sine(3000.0, 48000, 1.0)]), 48000, "FLOAT")
    audio, rate = load_audio(path, 44100, mono=False)
    assert rate == 44100 and audio.shape == (2, 44100)
    for channel, expected in zip(audio, (440.0, 3000.0)):
        frequency, amplitude = tone_frequency_and_amplitude(channel[4410:-4410], 44100)
        assert abs(frequency - expected) < 0.01
        assert abs(amplitude - 0.5) < 1e-4


def test_resample_is_a_no_op_when_rates_match() -> None:
    audio = noise(1000).astype(np.float64)
    out = resample(audio, 16000, 16000)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, audio.astype(np.float32))


@pytest.mark.parametrize("rate", [0, -8000, 44100.5, True])
def test_resample_rejects_invalid_rates(rate: object) -> None:
    with pytest.raises(ConfigError, match="target_sr"):
        resample(noise(100), 16000, rate)


# ---------------------------------------------------------------- fitting


def test_fit_length_pads_with_zeros_at_the_end_and_crops() -> None:
    audio = noise(10)
    padded = fit_length(audio, 15)
    np.testing.assert_array_equal(padded[:10], audio)
    np.testing.assert_array_equal(padded[10:], np.zeros(5, np.float32))
    np.testing.assert_array_equal(fit_length(audio, 4), audio[:4])
    stereo = noise(10, channels=2)
    assert fit_length(stereo, 12).shape == (2, 12)
    np.testing.assert_array_equal(fit_length(stereo, 3), stereo[:, :3])
    with pytest.raises(ConfigError):
        fit_length(audio, -1)


def test_load_clip_resamples_mixes_and_fits(tmp_path: Path) -> None:
    path = tmp_path / "short.wav"
    write_audio(path, np.stack([sine(500.0, 48000, 0.5)] * 2), 48000, subtype="FLOAT")
    clip = load_clip(path, 44100, 44100)
    assert clip.shape == (44100,) and clip.dtype == np.float32
    assert np.abs(clip[:22000]).max() > 0.45
    assert np.all(clip[22050:] == 0.0)


# ---------------------------------------------------------------- errors


def _assert_one_line_naming(error: pytest.ExceptionInfo[AudioError], path: Path) -> None:
    message = str(error.value)
    assert path.name in message
    assert "\n" not in message
    assert ";" in message  # "PATH: problem; fix"


def _pcm_wav(tmp_path: Path) -> bytes:
    path = tmp_path / "source.wav"
    write_audio(path, noise(8000), 16000)
    return path.read_bytes()


def _make_bad_file(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"bad-{kind}.wav"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.touch()
    elif kind == "zero_length":
        sf.write(str(path), np.zeros(0, np.float32), 16000)
    elif kind == "text":
        path.write_text("this is a text file, not audio\n" * 20)
    elif kind == "truncated_data":
        path.write_bytes(_pcm_wav(tmp_path)[:5000])
    elif kind == "truncated_header":
        path.write_bytes(_pcm_wav(tmp_path)[:30])
    elif kind == "garbled_header":
        data = bytearray(_pcm_wav(tmp_path))
        data[12:36] = b"\xff" * 24
        path.write_bytes(bytes(data))
    elif kind == "header_only":
        path.write_bytes(_pcm_wav(tmp_path)[:44])
    elif kind != "missing":
        raise AssertionError(kind)
    return path


HEADER_PROBLEMS = {
    "missing": "not found",
    "directory": "directory",
    "empty": "empty",
    "zero_length": "no audio samples",
    "text": "not a readable audio file",
    "truncated_data": "truncated",
    "truncated_header": "not a readable audio file",
    "garbled_header": "not a readable audio file",
    "header_only": "truncated",
}


@pytest.mark.parametrize("kind", sorted(HEADER_PROBLEMS))
def test_bad_files_raise_one_line_audio_errors(kind: str, tmp_path: Path) -> None:
    path = _make_bad_file(kind, tmp_path)
    for read in (load_audio, probe_audio, lambda p: load_clip(p, 16000, 16000)):
        with pytest.raises(AudioError, match=HEADER_PROBLEMS[kind]) as error:
            read(path)
        _assert_one_line_naming(error, path)


def test_streaming_wav_header_with_unknown_size_is_not_truncation(tmp_path: Path) -> None:
    data = bytearray(_pcm_wav(tmp_path))
    data[4:8] = data[40:44] = b"\xff\xff\xff\xff"  # RIFF and data sizes "unknown"
    path = tmp_path / "stream.wav"
    path.write_bytes(bytes(data))
    audio, rate = load_audio(path)
    assert rate == 16000 and audio.shape == (8000,)


def test_truncated_flac_raises_audio_error(tmp_path: Path) -> None:
    source = tmp_path / "source.flac"
    write_audio(source, noise(48000), 48000)
    path = tmp_path / "cut.flac"
    path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(AudioError, match="decode") as error:
        load_audio(path)
    _assert_one_line_naming(error, path)


def test_non_finite_samples_raise_audio_error(tmp_path: Path) -> None:
    path = tmp_path / "nan.wav"
    write_audio(path, np.array([0.1, np.nan, np.inf, 0.2], np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN or infinite") as error:
        load_audio(path)
    _assert_one_line_naming(error, path)


@pytest.mark.parametrize("rate", [0, -1, 22050.5, "44100"])
def test_invalid_target_rate_raises_audio_error(rate: object, tmp_path: Path) -> None:
    path = tmp_path / "ok.wav"
    write_audio(path, noise(100), 16000)
    with pytest.raises(AudioError, match="sample rate") as error:
        load_audio(path, rate)
    _assert_one_line_naming(error, path)


def test_module_works_without_torch(tmp_path: Path, without_torch) -> None:
    path = tmp_path / "a.wav"
    write_audio(path, noise(4800), 48000)
    script = (
        "from asc.audio import load_audio\n"
        f"audio, rate = load_audio({str(path)!r}, 16000)\n"
        "assert rate == 16000 and audio.shape == (1600,), audio.shape\n"
        "assert not BLOCKED, BLOCKED\n"
    )
    done = without_torch(script)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- real TAU clips


@pytest.mark.parametrize(
    ("dataset", "rate", "channels", "subtype"),
    [
        ("tau2019uas", 48000, 2, "PCM_16"),
        ("tau2020uas_mobile", 44100, 1, "FLOAT"),
        ("tau2022uas_mobile", 44100, 1, "PCM_24"),
    ],
)
def test_real_tau_clips_load(
    tau_fixtures: Path, dataset: str, rate: int, channels: int, subtype: str
) -> None:
    path = next((tau_fixtures / dataset).rglob("*.wav"))
    info = probe_audio(path)
    assert (info.sample_rate, info.channels, info.subtype, info.duration) == (
        rate,
        channels,
        subtype,
        1.0,
    )
    native, native_rate = load_audio(path, mono=False)
    assert native_rate == rate and native.shape == (channels, rate)
    clip = load_clip(path, 44100, 44100)
    assert clip.shape == (44100,) and clip.dtype == np.float32
    rms = float(np.sqrt(np.mean(clip**2)))
    assert 1e-4 < rms < 0.5  # real ambience: neither silent nor clipped garbage
