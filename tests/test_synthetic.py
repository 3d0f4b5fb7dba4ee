"""The synthetic multi-device corpus: layout, splits, pairing, determinism and device behaviour."""

from __future__ import annotations

import csv
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asc import __version__
from asc.data.clips import DEVICE_GROUPS, TAU_SCENES
from asc.data.synthetic import PRESETS, SynthConfig, synthesize
from asc.data.synthetic.devices import ALL_DEVICES
from asc.data.synthetic.scenes import SCENES, ParamSampler
from asc.errors import ConfigError, DatasetError

NAME = re.compile(r"^audio/([a-z_]+)-(synth\d\d-\d+)-(\d+)-([a-z0-9]+)\.wav$")


def tiny(**overrides: object) -> SynthConfig:
    return SynthConfig.preset("tiny", **{"workers": 1, **overrides})


def read_table(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as handle:
        lines = list(csv.reader(handle, delimiter="\t"))
    return lines[0], lines[1:]


def segment_of(filename: str) -> str:
    return Path(filename).stem.rsplit("-", 1)[0]


def device_of(filename: str) -> str:
    return Path(filename).stem.rsplit("-", 1)[1]


def all_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "synth.json"
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "corpus"
    summary = synthesize(root, tiny(), progress=False)
    assert summary.generated
    return root


@pytest.fixture(scope="module")
def meta(corpus: Path) -> list[list[str]]:
    return read_table(corpus / "meta.csv")[1]


def test_layout_and_table_formats(corpus: Path, meta: list[list[str]]) -> None:
    header, _ = read_table(corpus / "meta.csv")
    assert header == ["filename", "scene_label", "identifier", "source_label"]
    for filename, scene, identifier, device in meta:
        match = NAME.match(filename)
        assert match, filename
        assert (match[1], match[2], match[4]) == (scene, identifier, device)
        assert scene in TAU_SCENES and device in ALL_DEVICES
    setup = corpus / "evaluation_setup"
    for split in ("train", "evaluate"):
        header, rows = read_table(setup / f"fold1_{split}.csv")
        assert header == ["filename", "scene_label"]
        assert all(len(row) == 2 for row in rows)
    header, test_rows = read_table(setup / "fold1_test.csv")
    assert header == ["filename"]
    evaluate = read_table(setup / "fold1_evaluate.csv")[1]
    assert [row[0] for row in test_rows] == [row[0] for row in evaluate]
    # every listed file exists, nothing unlisted lies around, and each clip is in exactly one fold
    train = read_table(setup / "fold1_train.csv")[1]
    listed = sorted(row[0] for row in train + evaluate)
    assert listed == sorted(row[0] for row in meta)
    assert sorted(f"audio/{p.name}" for p in (corpus / "audio").iterdir()) == listed
    labels = {row[0]: row[1] for row in meta}
    assert all(labels[f] == s for f, s in train + evaluate)


def test_manifest_records_config_and_counts(corpus: Path, meta: list[list[str]]) -> None:
    manifest = json.loads((corpus / "synth.json").read_text())
    assert manifest["complete"] is True
    assert manifest["asc_version"] == __version__
    assert isinstance(manifest["format_version"], int)
    assert manifest["config"] == json.loads(json.dumps(tiny().to_dict()))
    assert set(manifest["devices"]) == set(ALL_DEVICES)
    assert sum(sum(d.values()) for d in manifest["counts"].values()) == len(meta)


def test_counts_per_split_and_device_follow_the_config(corpus: Path) -> None:
    config = tiny()
    setup = corpus / "evaluation_setup"
    counts = {
        split: _count_devices(read_table(setup / f"fold1_{split}.csv")[1]) for split in ("train", "evaluate")
    }
    scenes = len(TAU_SCENES)
    assert counts["train"] == {
        "a": scenes * config.train_segments_per_scene,
        **{d: scenes * config.paired_per_scene for d in ("b", "c", "s1", "s2", "s3")},
    }
    assert counts["evaluate"] == {d: scenes * config.eval_segments_per_scene for d in ALL_DEVICES}
    assert json.loads((corpus / "synth.json").read_text())["counts"] == counts
    assert not set(DEVICE_GROUPS["unseen"]) & set(counts["train"])


def _count_devices(rows: list[list[str]]) -> dict[str, int]:
    devices = [device_of(row[0]) for row in rows]
    return {d: devices.count(d) for d in ALL_DEVICES if d in devices}


def test_every_scene_in_every_split_and_device(corpus: Path) -> None:
    for split in ("train", "evaluate"):
        rows = read_table(corpus / "evaluation_setup" / f"fold1_{split}.csv")[1]
        for device in {device_of(r[0]) for r in rows}:
            scenes = {r[1] for r in rows if device_of(r[0]) == device}
            assert scenes == set(TAU_SCENES), (split, device)


def test_train_pairs_and_disjoint_locations(corpus: Path, meta: list[list[str]]) -> None:
    train = {r[0] for r in read_table(corpus / "evaluation_setup" / "fold1_train.csv")[1]}
    train_a = {segment_of(f) for f in train if device_of(f) == "a"}
    others = [f for f in train if device_of(f) != "a"]
    assert others and all(segment_of(f) in train_a for f in others)
    train_locations = {r[2] for r in meta if r[0] in train}
    evaluate_locations = {r[2] for r in meta if r[0] not in train}
    assert train_locations and evaluate_locations
    assert not train_locations & evaluate_locations
    # evaluation segments are recorded by all nine devices
    evaluate = [r[0] for r in meta if r[0] not in train]
    for segment in {segment_of(f) for f in evaluate}:
        assert sorted(device_of(f) for f in evaluate if segment_of(f) == segment) == sorted(ALL_DEVICES)


def test_audio_is_mono_pcm16_finite_and_in_range(corpus: Path, meta: list[list[str]]) -> None:
    config = tiny()
    for filename, *_ in meta[::7]:
        info = sf.info(corpus / filename)
        assert (info.channels, info.samplerate, info.subtype) == (1, config.sample_rate, "PCM_16")
        audio, _ = sf.read(corpus / filename, dtype="float32")
        assert audio.size == round(config.clip_seconds * config.sample_rate)
        assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0
        assert np.sqrt(np.mean(audio**2)) > 10 ** (-75 / 20)  # not silent


def test_same_seed_gives_identical_bytes_also_in_parallel(corpus: Path, tmp_path: Path) -> None:
    parallel = tmp_path / "parallel"
    synthesize(parallel, tiny(workers=2), progress=False)
    assert all_bytes(parallel) == all_bytes(corpus)


def test_different_seed_gives_different_audio(corpus: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    synthesize(other, tiny(seed=1), progress=False)
    ours, theirs = all_bytes(corpus), all_bytes(other)
    ours = {k: v for k, v in ours.items() if k.endswith(".wav")}
    theirs = {k: v for k, v in theirs.items() if k.endswith(".wav")}
    assert len(ours) == len(theirs)
    assert set(ours.values()).isdisjoint(theirs.values())


def test_rerun_is_idempotent_and_a_new_config_regenerates(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    synthesize(root, tiny(), progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    again = synthesize(root, tiny(workers=2), progress=False)  # workers do not change content
    assert not again.generated
    assert "reused" in str(again) and "evaluate 90 (a 10," in str(again)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps
    changed = synthesize(root, tiny(eval_segments_per_scene=2, segments_per_location=3), progress=False)
    assert changed.generated
    assert changed.counts["evaluate"] == {d: 20 for d in ALL_DEVICES}
    meta = read_table(root / "meta.csv")[1]
    assert len(list((root / "audio").iterdir())) == len(meta) == changed.total


def test_interrupted_corpus_is_regenerated(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    synthesize(root, tiny(), progress=False)
    (root / "meta.csv").unlink()
    assert synthesize(root, tiny(), progress=False).generated
    assert (root / "meta.csv").is_file()


def test_refuses_a_foreign_folder(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="no synthetic corpus"):
        synthesize(foreign, tiny(), progress=False)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(DatasetError, match="not a folder"):
        synthesize(a_file, tiny(), progress=False)


def _band_levels(audio: np.ndarray, sr: int, n_fft: int = 512) -> np.ndarray:
    """Log energy (bands x frames) in 16 log-spaced bands between 200 Hz and 6 kHz."""
    frames = np.lib.stride_tricks.sliding_window_view(audio, n_fft)[:: n_fft // 2] * np.hanning(n_fft)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    freqs = np.fft.rfftfreq(n_fft, 1 / sr)
    edges = np.geomspace(200, 6000, 17)
    bands = [power[:, (freqs >= lo) & (freqs < hi)].sum(axis=1) for lo, hi in itertools.pairwise(edges)]
    return 10 * np.log10(np.stack(bands) + 1e-10)


def _evaluate_recordings(corpus: Path, meta: list[list[str]]) -> dict[str, dict[str, np.ndarray]]:
    train = {r[0] for r in read_table(corpus / "evaluation_setup" / "fold1_train.csv")[1]}
    recordings: dict[str, dict[str, np.ndarray]] = {}
    for filename, *_ in meta:
        if filename not in train:
            audio, sr = sf.read(corpus / filename)
            recordings.setdefault(segment_of(filename), {})[device_of(filename)] = _band_levels(audio, sr)
    return recordings


def test_devices_colour_consistently_while_recordings_stay_parallel(
    corpus: Path, meta: list[list[str]]
) -> None:
    recordings = _evaluate_recordings(corpus, meta)
    segments = sorted(recordings)
    # a device's long-term spectrum departs from device a's by a curve that is the device's own:
    # the same across segments, and larger for the unseen devices than for the real ones
    def response(segment: str, device: str) -> np.ndarray:
        return recordings[segment][device].mean(axis=1) - recordings[segment]["a"].mean(axis=1)

    curves = {d: np.stack([response(s, d) for s in segments]) for d in ALL_DEVICES[1:]}
    for device, curve in curves.items():
        assert np.median(np.std(curve, axis=0)) < 2.0, device  # dB: one response for every segment
    spread = {d: np.ptp(curve.mean(axis=0)) for d, curve in curves.items()}
    assert min(spread[d] for d in DEVICE_GROUPS["unseen"]) > 10  # dB across 200 Hz - 6 kHz
    assert np.mean([spread[d] for d in DEVICE_GROUPS["unseen"]]) > np.mean([spread[d] for d in ("b", "c")])
    means = [curve.mean(axis=0) for curve in curves.values()]
    assert min(np.sqrt(np.mean((x - y) ** 2)) for i, x in enumerate(means) for y in means[i + 1 :]) > 1.0
    # the recordings of one segment share its time structure; other segments do not
    def envelope(segment: str, device: str) -> np.ndarray:
        return recordings[segment][device][6:10].mean(axis=0)  # ~700-1300 Hz, inside every band

    same = [np.corrcoef(envelope(s, "a"), envelope(s, d))[0, 1] for s in segments for d in ("b", "s1", "s4")]
    other = [np.corrcoef(envelope(s, "a"), envelope(t, "b"))[0, 1] for s, t in itertools.pairwise(segments)]
    assert np.median(same) > 0.8
    assert np.median(same) > np.median(other) + 0.4


def test_per_clip_frequency_normalisation_removes_most_of_the_device_shift(
    corpus: Path, meta: list[list[str]]
) -> None:
    recordings = _evaluate_recordings(corpus, meta)

    def normalise(x: np.ndarray) -> np.ndarray:
        return (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, keepdims=True) + 1e-5)

    def standardise(x: np.ndarray) -> np.ndarray:  # one scale for the whole clip: keeps the colour
        return (x - x.mean()) / (x.std() + 1e-5)

    raw, normalised = [], []
    for devices in recordings.values():
        for device in DEVICE_GROUPS["unseen"]:
            raw.append(np.abs(standardise(devices[device]) - standardise(devices["a"]))[3:12].mean())
            normalised.append(np.abs(normalise(devices[device]) - normalise(devices["a"]))[3:12].mean())
    assert np.mean(normalised) < 0.7 * np.mean(raw)


def test_impulse_response_devices(tmp_path: Path, micirp_dir: Path) -> None:
    root = tmp_path / "ir"
    synthesize(root, tiny(ir_dir=micirp_dir, ir_devices=("s1", "s4")), progress=False)
    devices = json.loads((root / "synth.json").read_text())["devices"]
    used = {name: d["impulse_response"] for name, d in devices.items() if d["impulse_response"]}
    assert set(used) == {"s1", "s4"} and all((micirp_dir / f).is_file() for f in used.values())
    plain = tmp_path / "plain"
    synthesize(plain, tiny(), progress=False)
    name = read_table(root / "evaluation_setup" / "fold1_evaluate.csv")[1][0][0].replace("-a.wav", "-s4.wav")
    assert (root / name).read_bytes() != (plain / name).read_bytes()
    untouched = name.replace("-s4", "-s2")  # devices without an IR render exactly as before
    assert (root / untouched).read_bytes() == (plain / untouched).read_bytes()


def test_empty_impulse_response_folder_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "irs"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no .wav"):
        synthesize(tmp_path / "out", tiny(ir_dir=empty), progress=False)


def test_presets_and_validation() -> None:
    assert set(PRESETS) == {"tiny", "quick", "standard", "tau2022-tiny", "tau2022-quick", "tau2022"}
    assert SynthConfig.preset("tau2022").segment_seconds == 1.0 and SynthConfig.preset("standard").segment_seconds is None
    standard = SynthConfig.preset("standard")
    assert standard.sample_rate == 44100
    assert len(TAU_SCENES) * (standard.train_segments_per_scene + 5 * standard.paired_per_scene) == 2000
    assert SynthConfig.preset("quick", seed=3).seed == 3
    assert tuple(SCENES) == TAU_SCENES
    with pytest.raises(ConfigError, match="unknown synthetic preset"):
        SynthConfig.preset("huge")
    with pytest.raises(ConfigError, match="unknown synthetic option"):
        SynthConfig.preset("quick", colour="pink")
    with pytest.raises(ConfigError, match="paired_per_scene"):
        tiny(paired_per_scene=5)
    with pytest.raises(ConfigError, match="ir_devices"):
        tiny(ir_devices=("s9",))
    with pytest.raises(ConfigError, match="clip_seconds"):
        tiny(clip_seconds=0)
    with pytest.raises(ConfigError, match="seed='1' must be an integer"):
        tiny(seed="1")


def test_certain_sources_always_sound_and_optional_ones_sometimes() -> None:
    recipe = SCENES["street_traffic"]  # source 1 (passes) has presence 1.0, source 3 (horn) 0.4
    rng = np.random.default_rng
    samplers = [ParamSampler(recipe, rng(seed), rng(seed + 1000)) for seed in range(200)]
    assert all(sampler.present("1.present", recipe.sources[1].presence) for sampler in samplers)
    share = np.mean([sampler.present("3.present", recipe.sources[3].presence) for sampler in samplers])
    assert 0.25 < share < 0.55


def test_table_layout_writes_one_plain_table_with_folds_by_segment(corpus: Path, tmp_path: Path) -> None:
    root = tmp_path / "table"
    summary = synthesize(root, tiny(), progress=False, layout="table")
    with (root / "clips.csv").open(newline="") as handle:
        header, *rows = list(csv.reader(handle))
    assert header == ["filename", "scene_label", "device", "fold"]
    assert not (root / "meta.csv").exists() and not (root / "evaluation_setup").exists()
    assert all_bytes(root / "audio") == all_bytes(corpus / "audio")  # the same recordings as the TAU layout
    assert summary.total == len(rows) == 160
    assert {row[3] for row in rows if row[2] in ("s4", "s5", "s6")} == {"5"}  # evaluation split
    folds_of_segment: dict[str, set[str]] = {}
    for filename, _, device, fold in rows:
        assert device == device_of(filename)
        folds_of_segment.setdefault(segment_of(filename), set()).add(fold)
    assert all(len(folds) == 1 for folds in folds_of_segment.values())  # a segment never spans two folds
    assert {fold for folds in folds_of_segment.values() for fold in folds} == {"1", "2", "3", "4", "5"}
    assert synthesize(root, tiny(), progress=False, layout="table").generated is False
    assert synthesize(root, tiny(), progress=False, layout="tau").generated is True  # a layout change rewrites
    assert (root / "meta.csv").is_file() and not (root / "clips.csv").exists()
