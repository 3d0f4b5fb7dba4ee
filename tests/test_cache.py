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
    """The arrays and manifests in a cache folder (not the digest index)."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name != cache_module.INDEX_NAME)


def arrays(folder: Path) -> list[str]:
    return [name for name in cache_files(folder) if name.endswith(".npy")]


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
    assert len(decodes) == 8 and rebuilt.path != cache.path  # named by content
    np.testing.assert_allclose(
        rebuilt[1][100:1900], 0.5, atol=1e-3
    )  # past the resampler's onset ringing
    # the array of the old content is gone: no other list of files resolved to it
    assert cache_files(tmp_path / "cache") == [rebuilt.path.with_suffix(".json").name, rebuilt.path.name]


def test_touching_a_file_rehashes_but_does_not_decode(
    clips: list[Clip], tmp_path: Path, decodes: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[Path] = []
    real = cache_module.file_digest
    monkeypatch.setattr(cache_module, "file_digest", lambda path: hashed.append(Path(path)) or real(path))
    first = WaveformCache.open(clips, RATE, 2000, tmp_path / "cache", progress=False)
    assert len(hashed) == 4 and len(decodes) == 4
    WaveformCache.open(clips, RATE, 2000, tmp_path / "cache", progress=False)
    assert len(hashed) == 4  # unchanged (path, size, mtime): the memoised digests are used
    stat = clips[0].path.stat()
    os.utime(clips[0].path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again = WaveformCache.open(clips, RATE, 2000, tmp_path / "cache", progress=False)
    assert hashed[4:] == [clips[0].path] and len(decodes) == 4 and again.path == first.path


def test_same_corpus_at_two_paths_is_stored_once(
    clips: list[Clip], tmp_path: Path, decodes: list[Path]
) -> None:
    """A copied corpus (new paths, new mtimes, same bytes) reuses the first copy's arrays."""
    copies = []
    for clip in clips:
        target = tmp_path / "copy" / clip.path.name
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(clip.path.read_bytes())
        stat = target.stat()
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5 * 10**9))
        copies.append(Clip(path=target, label="x"))
    assert copies[0].path.stat().st_mtime_ns != clips[0].path.stat().st_mtime_ns
    calls: list[int] = []
    waves = WaveformCache.open(clips, RATE, 2000, tmp_path / "cache", progress=False)
    FeatureCache.open(waves, frame_energy(calls), {"frames": 10}, tmp_path / "cache", progress=False)
    copied = WaveformCache.open(copies, RATE, 2000, tmp_path / "cache", progress=False)
    features = FeatureCache.open(copied, frame_energy(calls), {"frames": 10}, tmp_path / "cache", progress=False)
    assert len(decodes) == 4 and calls == [1, 4]  # neither decoded nor featurised again
    assert copied.path == waves.path and len(arrays(tmp_path / "cache")) == 2  # one waveform, one feature array
    np.testing.assert_array_equal(features[3], frame_energy([])(np.asarray(waves[3:4]))[0])
    # Editing one copy gives it its own array; the other copy's array stays, still valid.
    sf.write(copies[2].path, np.full(4000, 0.5, np.float32), 16000, subtype="FLOAT")
    edited = WaveformCache.open(copies, RATE, 2000, tmp_path / "cache", progress=False)
    assert len(decodes) == 8 and edited.path != waves.path
    WaveformCache.open(clips, RATE, 2000, tmp_path / "cache", progress=False)
    assert len(decodes) == 8 and len(arrays(tmp_path / "cache")) == 3
    assert edited[2][1000] == pytest.approx(0.5, abs=1e-3) and abs(waves[2][1000] - 0.5) > 0.1


def test_old_format_arrays_are_dropped_on_rebuild(clips: list[Clip], tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    np.save(cache_dir / "waveforms-8000hz-2000-0123456789abcdef.npy", np.zeros((4, 2000), np.float32))
    (cache_dir / "waveforms-8000hz-2000-0123456789abcdef.json").write_text(
        '{"key": {"kind": "waveforms", "version": 1}, "shape": [4, 2000], "dtype": "float32"}')
    (cache_dir / "notes.txt").write_text("not asc's")
    assert cache_module.cache_usage(cache_dir).by_kind()["stale"][0] == 1
    cache = WaveformCache.open(clips, RATE, 2000, cache_dir, progress=False)
    assert arrays(cache_dir) == [cache.path.name]
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted(
        [cache.path.name, cache.path.with_suffix(".json").name, "index.json", "notes.txt"])


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


def test_asc_cache_shows_location_and_size(
    clips: list[Clip], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from asc.cli import main

    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("ASC_CACHE", str(cache_dir))
    assert cache_module.default_cache_dir() == cache_dir
    waves = WaveformCache.open(clips, RATE, 2000, cache_dir, progress=False)
    FeatureCache.open(waves, frame_energy([]), {"frames": 10}, cache_dir, progress=False)
    (cache_dir / "synthetic" / "quick-seed0").mkdir(parents=True)
    (cache_dir / "synthetic" / "quick-seed0" / "meta.csv").write_text("x" * 1000)
    total = sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file())
    assert main(["cache"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"cache: {cache_dir} ($ASC_CACHE)"
    assert lines[1].endswith(f"({total} bytes) in 2 arrays")
    kinds = {line.split()[0]: int(line.split()[1]) for line in lines[2:]}
    assert kinds == {"waveforms": 1, "features": 1, "synthetic": 1, "index": 1}
    wave_bytes = waves.path.stat().st_size + waves.path.with_suffix(".json").stat().st_size
    assert cache_module.cache_usage(cache_dir).by_kind()["waveforms"] == (1, wave_bytes)
    assert wave_bytes > 4 * 2000 * 4  # the float32 rows plus headers and manifest
    monkeypatch.delenv("ASC_CACHE")
    assert main(["cache", "--dir", str(tmp_path / "nowhere")]) == 0
    assert "0 arrays (the folder does not exist yet)" in capsys.readouterr().out


def test_asc_cache_clear_empties_it_and_says_how_much(
    clips: list[Clip], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from asc.cli import main

    cache_dir = tmp_path / "cache"
    WaveformCache.open(clips, RATE, 2000, cache_dir, progress=False)
    (cache_dir / ".features-x.npy.abc.tmp").write_bytes(b"\0" * 100)  # a killed write
    (cache_dir / "mine.txt").write_text("not asc's")
    total = sum(p.stat().st_size for p in cache_dir.iterdir()) - len("not asc's")
    assert main(["cache", "clear", "--dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"cleared {cache_dir}: freed {cache_module.format_bytes(total)} ({total} bytes) in 3 entries, 1 of them arrays"
    assert out[1] == "kept 1 entries asc did not write: mine.txt"
    assert sorted(p.name for p in cache_dir.iterdir()) == ["mine.txt"]
    assert main(["cache", "clear", "--dir", str(cache_dir)]) == 0
    assert "freed 0 B (0 bytes) in 0 entries" in capsys.readouterr().out


def test_asc_cache_errors_and_help_without_torch(tmp_path: Path, without_torch, capsys) -> None:
    from asc.cli import main

    (tmp_path / "file").write_text("x")
    assert main(["cache", "--dir", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.strip() == (f"asc: error: {tmp_path / 'file'}: the cache location is a file, not "
                                               "a folder; point the cache at a folder")
    code = "import sys; from asc.cli import main; sys.exit(main(sys.argv[1:]))"
    shown = without_torch(code, "cache", "--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage: asc cache"), shown.stderr
    shown = without_torch(code, "cache", "--dir", tmp_path / "c")
    assert shown.returncode == 0 and "total: 0 B (0 bytes) in 0 arrays" in shown.stdout, shown.stderr


def test_format_bytes() -> None:
    assert [cache_module.format_bytes(n) for n in (0, 999, 1000, 1_234_567, 5 * 10**9, 2 * 10**12)] == [
        "0 B", "999 B", "1.0 kB", "1.2 MB", "5.0 GB", "2.0 TB"]
