"""FastLogMel: parity with the librosa reference across the config's branches, layout, input checks, no torch."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import librosa
import numpy as np
import pytest

from asc.errors import AscError, ConfigError
from asc.feature_spec import FastLogMel, FeatureConfig, FrontendArrays, log_mel

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4

DCASE = FeatureConfig()
SPEECH_16K = FeatureConfig(sample_rate=16000, n_fft=512, win_length=400, hop_length=160, n_mels=40)
CONFIGS = {
    "dcase": DCASE,
    "16k_win_lt_nfft": SPEECH_16K,
    "reflect": replace(SPEECH_16K, pad_mode="reflect"),
    "power1_htk_nonorm": replace(SPEECH_16K, power=1.0, htk=True, mel_norm=None, f_min=50.0, f_max=7000.0),
    "power1.5_hamming": replace(SPEECH_16K, power=1.5, window="hamming", log_eps=1e-7),
    "normalised": replace(SPEECH_16K, norm_mean=-4.2, norm_std=3.1),
    "uncentred_odd_hop": replace(SPEECH_16K, center=False, hop_length=97),
}


def noise_chirp(sample_rate: int, seconds: float, seed: int = 0) -> np.ndarray:
    n = int(sample_rate * seconds)
    chirp = 0.5 * librosa.chirp(fmin=40, fmax=0.45 * sample_rate, sr=sample_rate, length=n)
    noise = 0.05 * np.random.default_rng(seed).standard_normal(n)
    return (chirp + noise).astype(np.float32)


def parity(config: FeatureConfig, audio: np.ndarray) -> float:
    """Max |FastLogMel - log_mel| over max |log_mel| (the metric of tests/test_features.py)."""
    ours = FastLogMel(config)(audio[None])[0, 0].astype(np.float64)
    ref = log_mel(audio, config, dtype=np.float64)
    assert ours.shape == ref.shape == (config.n_mels, config.num_frames(len(audio)))
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_librosa_reference(name: str) -> None:
    config = CONFIGS[name]
    seconds = 10.0 if config is DCASE else 1.5
    assert parity(config, noise_chirp(config.sample_rate, seconds)) <= TOLERANCE


@pytest.mark.filterwarnings("ignore:n_fft=.*too large:UserWarning")  # librosa's, about the reference
@pytest.mark.parametrize("name", ["dcase", "16k_win_lt_nfft", "reflect"])
@pytest.mark.parametrize("length", ["100", "n_fft-1", "n_fft"])  # 100: reflect padding repeats the clip
def test_short_clip_matches_reference(name: str, length: str) -> None:
    config = CONFIGS[name]
    samples = {"100": 100, "n_fft-1": config.n_fft - 1, "n_fft": config.n_fft}[length]
    audio = noise_chirp(config.sample_rate, 1.0, seed=1)[:samples]
    assert parity(config, audio) <= TOLERANCE


@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
@pytest.mark.parametrize(("n_fft", "hop"), [(64, 16), (64, 32), (64, 64), (64, 7), (64, 100), (63, 16), (65, 33)])
def test_frames_read_from_the_clip_are_the_padded_clips_frames(pad_mode: str, n_fft: int, hop: int) -> None:
    # FastLogMel reads the frames inside the clip from the clip itself and pads copies of its ends
    # only; for every length, the frames must be exactly those of the whole padded clip.
    config = FeatureConfig(sample_rate=8000, n_fft=n_fft, hop_length=hop, n_mels=8, pad_mode=pad_mode)
    frontend = FastLogMel(config)
    rng = np.random.default_rng(n_fft + hop)
    split = 0
    for n in [*range(1, 260), 1001, 1037]:
        clip = rng.standard_normal(n).astype(np.float32)
        runs = frontend._frame_runs(clip)
        expected = np.lib.stride_tricks.sliding_window_view(np.pad(clip, n_fft // 2, mode=pad_mode), n_fft)[::hop]
        assert [first for first, _ in runs] == list(np.cumsum([0] + [len(f) for _, f in runs[:-1]]))
        np.testing.assert_array_equal(np.concatenate([frames for _, frames in runs]), expected)
        split += len(runs) > 1
    assert split > 100  # most lengths take the path that does not copy the clip


def test_reflect_padding_differs_from_constant() -> None:
    # Guards the branch tests above: the two pad modes must give different edge frames.
    audio = noise_chirp(16000, 0.5)
    constant = FastLogMel(SPEECH_16K)(audio)
    reflect = FastLogMel(CONFIGS["reflect"])(audio)
    assert np.abs(constant[..., 0] - reflect[..., 0]).max() > 0.1
    np.testing.assert_array_equal(constant[..., 4:-4], reflect[..., 4:-4])


def test_normalisation_is_the_fixed_affine_map() -> None:
    audio = noise_chirp(16000, 0.5)
    plain = FastLogMel(SPEECH_16K)(audio)
    normalised = FastLogMel(CONFIGS["normalised"])(audio)
    np.testing.assert_allclose(normalised, (plain + 4.2) / 3.1, rtol=0, atol=1e-5)


def test_batch_layout_and_single_clip_agree() -> None:
    frontend = FastLogMel(SPEECH_16K)
    clips = np.stack([noise_chirp(16000, 1.0, seed=seed) for seed in range(3)])
    batch = frontend(clips)
    assert batch.shape == (3, 1, 40, SPEECH_16K.num_frames(16000)) and batch.dtype == np.float32
    assert batch.flags.c_contiguous  # onnxruntime takes it without a copy
    for clip, features in zip(clips, batch):
        single = frontend(clip)
        assert single.shape == (1, 40, SPEECH_16K.num_frames(16000))
        np.testing.assert_array_equal(single, features)
    assert not np.array_equal(batch[0], batch[1])
    # float64 input is computed in float32 like the runtime's.
    np.testing.assert_array_equal(frontend(clips.astype(np.float64)), batch)


def test_clips_of_changing_length_and_threads_sharing_one_instance() -> None:
    # The work buffers are reused per thread and per clip length: neither may leak into a result.
    frontend = FastLogMel(SPEECH_16K)
    clips = [noise_chirp(16000, seconds, seed=seed) for seed, seconds in enumerate((1.0, 1.37, 0.2, 1.0))]
    expected = [FastLogMel(SPEECH_16K)(clip) for clip in clips]  # a fresh instance each
    for clip, features in zip(clips, expected):
        np.testing.assert_array_equal(frontend(clip), features)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(frontend, clips * 8))
    for i, features in enumerate(results):
        np.testing.assert_array_equal(features, expected[i % len(clips)])
    assert len({features.shape for features in results}) == 3


@pytest.mark.parametrize("shape", [(2, 3, 800), (0,), ()])
def test_rejects_bad_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError, match="expected"):
        FastLogMel(SPEECH_16K)(np.zeros(shape, np.float32))


def test_uncentred_clip_shorter_than_nfft_is_rejected() -> None:
    with pytest.raises(ConfigError, match="shorter than n_fft"):
        FastLogMel(replace(SPEECH_16K, center=False))(np.zeros(511, np.float32))


def test_unknown_window_fails_at_construction() -> None:
    with pytest.raises(ConfigError, match="unknown window"):
        FastLogMel(replace(SPEECH_16K, window="no-such-window"))


def test_works_with_torch_blocked(without_torch) -> None:
    script = (
        "import json\n"
        "import numpy as np\n"
        "from asc.feature_spec import FastLogMel, FeatureConfig\n"
        "config = FeatureConfig(sample_rate=16000, n_fft=512, hop_length=160, n_mels=40)\n"
        "out = FastLogMel(config)(np.zeros((2, 16000), np.float32))\n"
        "print(json.dumps({'shape': list(out.shape), 'min': float(out.min()), 'blocked': BLOCKED}))\n"
    )
    done = without_torch(script)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out == {"shape": [2, 1, 40, 101], "min": pytest.approx(np.log(1e-5)), "blocked": []}


@pytest.mark.parametrize("name", ["dcase", "16k_win_lt_nfft"])
def test_shipped_arrays_give_the_same_features_as_computed_ones(name: str, tmp_path: Path) -> None:
    config = CONFIGS[name]
    FrontendArrays.compute(config).save(tmp_path / "frontend.npz")
    loaded = FrontendArrays.load(tmp_path / "frontend.npz", config)
    expected = librosa.filters.mel(sr=config.sample_rate, n_fft=config.n_fft, n_mels=config.n_mels,
                                   fmin=config.f_min, fmax=config.effective_f_max, norm=config.mel_norm)
    np.testing.assert_allclose(loaded.mel_filterbank, expected, rtol=1e-6, atol=1e-9)
    assert loaded.window.dtype == np.float32 and loaded.window.shape == (config.n_fft,)
    clips = np.random.default_rng(3).standard_normal((2, config.sample_rate)).astype(np.float32)
    np.testing.assert_array_equal(FastLogMel(config, loaded)(clips), FastLogMel(config)(clips))
    assert (tmp_path / "frontend.npz").stat().st_size < 20_000  # sparse triangles compress well


def test_arrays_that_do_not_fit_the_spec_are_one_line_errors(tmp_path: Path) -> None:
    FrontendArrays.compute(SPEECH_16K).save(tmp_path / "frontend.npz")
    with pytest.raises(AscError, match=r"do not fit the spec \(n_fft 2048, n_mels 256\); re-export") as error:
        FrontendArrays.load(tmp_path / "frontend.npz", DCASE)
    assert "\n" not in str(error.value)
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(AscError, match="broken.npz: not a readable front-end file"):
        FrontendArrays.load(tmp_path / "broken.npz", DCASE)
