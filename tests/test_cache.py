"""Waveform and feature caches: built once, reused, rebuilt on a key change, never half-written."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import asc.data.cache as cache_module
from asc.audio import load_clip
from asc.data.cache import FeatureCache, WaveformCache
from asc.data.clips import Clip
from asc.errors import AudioError

RATE = 8000


@pytest.fixture
def clips(tmp_path: Path) -> list[Clip]:
    """Four 16 kHz clips of different lengths and tones, shorter and longer than 0.25 s."""
    rng = np.random.default_rng(0)
    result = []
    for i, seconds in enumerate((0.2, 0.3, 0.25, 0.1)):
        t = np.arange(int(16000 * seconds)) / 16000
        audio = 0.3 * np.sin(2 * np.pi * 300 * (i + 1) * t) + 0.01 * rng.standard_normal(t.size)
        path = tmp_path / "audio" / f"clip{i}-a.wav"
        path.parent.mkdir(exist_ok=True)
        sf.write(path, audio.astype(np.float32), 16000, subtype="FLOAT")
        result.append(Clip(path=path, label="x"))
    return result


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Records every file the cache decodes."""
    calls: list[Path] = []

    def counting(path: Path, sample_rate: int, num_samples: int) -> np.ndarray:
        calls.append(Path(path))
        return load_clip(path, sample_rate, num_samples)

    monkeypatch.setattr(cache_module, "load_clip", counting)
    return calls


def cache_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_build_matches_direct_decoding(clips: list[Clip], tmp_path: Path) -> None:
    cache = WaveformCache.open(clips, RATE, 2000, tmp_path / "cache", progress=False)
    assert len(cache) == 4 and cache.shape == (4, 2000)
    for i, clip in enumerate(clips):
        np.testing.assert_array_equal(cache[i], load_clip(clip.path, RATE, 2000))
    assert isinstance(cache[0], np.ndarray) and cache[0].dtype == np.float32
    assert not cache[0].flags.writeable  # a view into the read-only memory map, not a copy
    # The 0.1-s clip is zero-padded; the others carry signal up to the end.
    assert np.all(cache[3][800:] == 0) and np.abs(cache[1][1900:]).max() > 0.1
    files = cache_files(tmp_path / "cache")
    assert len(files) == 2 and {Path(f).suffix for f in files} == {".npy", ".json"}
    assert np.load(cache.path).shape == (4, 2000)


def test_reuse_does_not_decode_again(
    clips: list[Clip], tmp_path: Path, decodes: list[Path]
) -> None:
    first = WaveformCache.open(clips, RATE, 2000, tmp_path / "cache", progress=False)
    assert len(decodes) == 4
    built = first.path.stat().st_mtime_ns
    second = WaveformCache.open(clips, RATE, 2000, tmp_path / "cache", progress=False)
    assert len(decodes) == 4
    assert second.path == first.path and second.path.stat().st_mtime_ns == built
    np.testing.assert_array_equal(second[2], first[2])


def test_source_change_rebuilds(clips: list[Clip], tmp_path: Path, decodes: list[Path]) -> None:
    cache = WaveformCache.open(clips, RATE, 2000, tmp_path / "cache", progress=False)
    sf.write(clips[1].path, np.full(4000, 0.5, np.float32), 16000, subtype="FLOAT")
    rebuilt = WaveformCache.open(clips, RATE, 2000, tmp_path / "cache", progress=False)
    assert len(decodes) == 8 and rebuilt.path == cache.path
    np.testing.assert_allclose(
        rebuilt[1][100:1900], 0.5, atol=1e-3
    )  # past the resampler's onset ringing
    assert len(cache_files(tmp_path / "cache")) == 2
    # Touching a file (same bytes, new mtime) also invalidates: the cache cannot tell.
    stat = clips[0].path.stat()
    os.utime(clips[0].path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    WaveformCache.open(clips, RATE, 2000, tmp_path / "cache", progress=False)
    assert len(decodes) == 12


def test_rate_and_length_get_their_own_caches(
    clips: list[Clip], tmp_path: Path, decodes: list[Path]
) -> None:
    at_8k = WaveformCache.open(clips, RATE, 2000, tmp_path / "cache", progress=False)
    at_4k = WaveformCache.open(clips, 4000, 1000, tmp_path / "cache", progress=False)
    assert len(decodes) == 8 and at_4k.path != at_8k.path
    np.testing.assert_array_equal(at_4k[0], load_clip(clips[0].path, 4000, 1000))
    assert len(cache_files(tmp_path / "cache")) == 4
    WaveformCache.open(clips, RATE, 2000, tmp_path / "cache", progress=False)
    assert len(decodes) == 8


def test_bad_file_fails_without_leaving_a_cache(clips: list[Clip], tmp_path: Path) -> None:
    clips[2].path.write_bytes(b"RIFF garbage")
    with pytest.raises(AudioError) as raised:
        WaveformCache.open(clips, RATE, 2000, tmp_path / "cache", progress=False)
    assert raised.value.path == str(clips[2].path)
    assert cache_files(tmp_path / "cache") == []


def test_failed_rebuild_removes_the_stale_cache(clips: list[Clip], tmp_path: Path) -> None:
    WaveformCache.open(clips, RATE, 2000, tmp_path / "cache", progress=False)
    clips[0].path.write_bytes(b"")
    with pytest.raises(AudioError, match="empty"):
        WaveformCache.open(clips, RATE, 2000, tmp_path / "cache", progress=False)
    assert cache_files(tmp_path / "cache") == []


def test_missing_source_is_an_audio_error(clips: list[Clip], tmp_path: Path) -> None:
    clips[3].path.unlink()
    with pytest.raises(AudioError, match="file not found"):
        WaveformCache.open(clips, RATE, 2000, tmp_path / "cache", progress=False)


def test_corrupt_manifest_or_array_is_rebuilt(
    clips: list[Clip], tmp_path: Path, decodes: list[Path]
) -> None:
    cache = WaveformCache.open(clips, RATE, 2000, tmp_path / "cache", progress=False)
    cache.path.with_suffix(".json").write_text("{not json")
    WaveformCache.open(clips, RATE, 2000, tmp_path / "cache", progress=False)
    assert len(decodes) == 8
    np.save(cache.path, np.zeros((3, 2000), np.float32))
    repaired = WaveformCache.open(clips, RATE, 2000, tmp_path / "cache", progress=False)
    assert len(decodes) == 12 and repaired.shape == (4, 2000)


def test_pickles_as_a_path(clips: list[Clip], tmp_path: Path) -> None:
    cache = WaveformCache.open(clips, RATE, 2000, tmp_path / "cache", progress=False)
    blob = pickle.dumps(cache)
    assert len(blob) < 2000 < cache[0].nbytes * 4
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone[1], cache[1])


def frame_energy(counter: list[int], frames: int = 10) -> Callable[[np.ndarray], np.ndarray]:
    """A small deterministic front end: (B, samples) → (B, 1, 2, frames) mean square and mean."""

    def frontend(batch: np.ndarray) -> np.ndarray:
        counter.append(len(batch))
        framed = batch.reshape(len(batch), frames, -1)
        return np.stack([(framed**2).mean(-1), framed.mean(-1)], axis=1)[:, None]

    return frontend


def test_feature_cache_builds_in_batches_and_reuses(clips: list[Clip], tmp_path: Path) -> None:
    waves = WaveformCache.open(clips, RATE, 2000, tmp_path / "cache", progress=False)
    calls: list[int] = []
    spec = {"name": "energy", "frames": 10}
    features = FeatureCache.open(
        waves, frame_energy(calls), spec, tmp_path / "cache", batch_size=3, progress=False
    )
    assert features.shape == (4, 1, 2, 10)
    assert calls == [1, 3, 1]  # one probe row for the shape, then batches of 3 and 1
    expected = frame_energy([])(np.asarray(waves[:]))
    np.testing.assert_allclose(features[:], expected, rtol=1e-6)
    FeatureCache.open(
        waves, frame_energy(calls), spec, tmp_path / "cache", batch_size=3, progress=False
    )
    assert calls == [1, 3, 1]
    changed = FeatureCache.open(
        waves, frame_energy(calls, 5), {**spec, "frames": 5}, tmp_path / "cache", progress=False
    )
    assert changed.shape == (4, 1, 2, 5) and changed.path != features.path


def test_feature_cache_follows_its_waveforms(clips: list[Clip], tmp_path: Path) -> None:
    calls: list[int] = []
    waves = WaveformCache.open(clips, RATE, 2000, tmp_path / "cache", progress=False)
    FeatureCache.open(waves, frame_energy(calls), {"v": (1, 2)}, tmp_path / "cache", progress=False)
    assert calls == [1, 4]
    FeatureCache.open(waves, frame_energy(calls), {"v": (1, 2)}, tmp_path / "cache", progress=False)
    assert calls == [1, 4]  # a tuple in the key survives the JSON round trip
    sf.write(clips[0].path, np.full(3200, 0.25, np.float32), 16000, subtype="FLOAT")
    waves = WaveformCache.open(clips, RATE, 2000, tmp_path / "cache", progress=False)
    features = FeatureCache.open(
        waves, frame_energy(calls), {"v": (1, 2)}, tmp_path / "cache", progress=False
    )
    assert calls == [1, 4, 1, 4]
    assert features[0][0, 1, 0] == pytest.approx(0.25, abs=1e-3)


def test_front_end_with_inconsistent_shapes_leaves_no_cache(
    clips: list[Clip], tmp_path: Path
) -> None:
    waves = WaveformCache.open(clips, RATE, 2000, tmp_path / "waves", progress=False)

    def ragged(batch: np.ndarray) -> np.ndarray:
        return np.zeros((len(batch), 3 if len(batch) == 1 else 4), np.float32)

    with pytest.raises(ValueError, match=r"rows of shape \(4,\) do not fit \(3,\)"):
        FeatureCache.open(
            waves, ragged, {"name": "ragged"}, tmp_path / "features", batch_size=2, progress=False
        )
    assert cache_files(tmp_path / "features") == []
