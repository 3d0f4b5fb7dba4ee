"""``asc classify`` logic: file discovery, per-file failures that do not stop the batch, output formats.

The bundle here is built with onnx.helper, no torch: a log-mel "band energy" classifier whose
logit for ``low``/``mid``/``high`` is the mean log-mel of that frequency range minus the mean of
all bands. A pure tone therefore has a known right answer, so the tests can check labels.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
from pathlib import Path

import librosa
import numpy as np
import onnx
import pytest
import soundfile as sf
from onnx import TensorProto, helper, numpy_helper

from asc.bundle_manifest import BundleManifest
from asc.classify import (
    AUDIO_EXTENSIONS,
    classify_paths,
    find_audio_files,
    format_results,
    stale_bundle,
)
from asc.errors import ConfigError
from asc.feature_spec import FRONTEND_ARRAYS_NAME, FeatureConfig, FrontendArrays
from asc.run_files import DIGEST_KEY, FINALIZED_NAME, deployed_file, file_digest
from asc.runtime import Classifier, ClipResult

RATE = 16000
FEATURES = FeatureConfig(sample_rate=RATE, n_fft=512, hop_length=256, n_mels=40)
LABELS = ["low", "mid", "high"]
TONES = {"low": 250.0, "mid": 1200.0, "high": 5000.0}
BAND_EDGES = (500.0, 2500.0)  # Hz between low|mid and mid|high


def band_energy_model(order: tuple[int, ...] = (0, 1, 2), gain: float = 1.0,
                      batch: int | str = "batch", frames: int | None = None) -> onnx.ModelProto:
    """``order`` permutes the outputs (output i scores band ``order[i]``), ``gain`` scales the logits."""
    frames = frames or FEATURES.num_frames(RATE)
    centres = librosa.mel_frequencies(FEATURES.n_mels + 2, fmax=RATE / 2)[1:-1]
    group = np.digitize(centres, BAND_EDGES)  # 0 low, 1 mid, 2 high
    weights = np.stack([(group == g) / (group == g).sum() for g in order], axis=1) - 1 / FEATURES.n_mels
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["log_mel"], ["bands"], axes=[1, 3], keepdims=0),
            helper.make_node("MatMul", ["bands", "weights"], ["scores"]),
            helper.make_node("Mul", ["scores", "gain"], ["logits"]),
        ],
        "band_energy",
        [helper.make_tensor_value_info("log_mel", TensorProto.FLOAT, [batch, 1, FEATURES.n_mels, frames])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, len(LABELS)])],
        [numpy_helper.from_array(weights.astype(np.float32), "weights"),
         numpy_helper.from_array(np.array(gain, np.float32), "gain")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return model


def write_band_bundle(folder: Path, model: onnx.ModelProto | None = None, *, features: FeatureConfig = FEATURES,
                      **manifest: object) -> Path:
    """A bundle folder of ``model`` (default: the band-energy classifier); ``manifest`` overrides bundle.json."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model or band_energy_model(), folder / "model.onnx")
    FrontendArrays.compute(features).save(folder / FRONTEND_ARRAYS_NAME)
    fields = {"labels": LABELS, "sample_rate": features.sample_rate, "clip_samples": RATE,
              "frontend": features.to_dict(), "frontend_in_graph": False, "precision": "fp32", "input_name": "log_mel",
              "input_shape": ["batch", 1, features.n_mels, features.num_frames(RATE)],
              "frontend_file": FRONTEND_ARRAYS_NAME}
    (folder / "bundle.json").write_text(BundleManifest(**{**fields, **manifest}).to_json())  # type: ignore[arg-type]
    return folder


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Classifier:
    return Classifier(write_band_bundle(tmp_path_factory.mktemp("band-bundle")))


def tone(label: str, seconds: float, rate: int = RATE, channels: int = 1) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    signal = 0.3 * np.sin(2 * np.pi * TONES[label] * t) + 0.001 * np.random.default_rng(0).standard_normal(len(t))
    return np.repeat(signal[:, None], channels, axis=1).astype(np.float32)


def good_files(root: Path) -> dict[Path, tuple[str, int]]:
    """Writes recordings of known label; returns path -> (label, number of windows)."""
    files = {
        root / "low.wav": ("low", 2.5, RATE, 1, "PCM_16"),
        root / "sub" / "high.flac": ("high", 1.0, 44100, 1, "PCM_24"),
        root / "sub" / "deeper" / "MID.WAV": ("mid", 0.5, 8000, 2, "FLOAT"),
        root / "mid48k.ogg": ("mid", 3.0, 48000, 2, "VORBIS"),
    }
    for path, (label, seconds, rate, channels, subtype) in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, tone(label, seconds, rate, channels), rate, subtype=subtype,
                 format="OGG" if subtype == "VORBIS" else None)
    return {path: (label, max(1, math.ceil(seconds))) for path, (label, seconds, *_) in files.items()}


def bad_files(root: Path) -> dict[Path, str]:
    """Writes files that cannot be classified; returns path -> the problem the failure must name."""
    sf.write(root / "whole.wav", tone("low", 1.0), RATE, subtype="PCM_16")
    corrupt = root / "corrupt.wav"
    corrupt.write_bytes((root / "whole.wav").read_bytes()[:20000])  # an interrupted copy
    (root / "whole.wav").unlink()
    (root / "empty.flac").write_bytes(b"")
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "text.ogg").write_text("this is a text file with an audio extension\n")
    (root / "notes.txt").write_text("not searched: no audio extension\n")
    return {corrupt: "truncated", root / "empty.flac": "empty", root / "sub" / "text.ogg": "not a readable audio file"}


# ---------------------------------------------------------------- discovery


def test_find_audio_files_order_filters_and_failures(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for name in ("b.wav", "a.FLAC", "sub/c.ogg", "sub/a.mp3", ".hidden.wav", "._b.wav", ".cache/d.wav", "notes.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    named = tmp_path / "named.txt"
    named.write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    files, failures = find_audio_files([root, named, root / "b.wav", tmp_path / "missing.wav", tmp_path / "empty"])
    extensions = ", ".join(sorted(ext.lstrip(".") for ext in AUDIO_EXTENSIONS))
    expected = ["a.FLAC", "b.wav"] + (["sub/a.mp3"] if ".mp3" in AUDIO_EXTENSIONS else []) + ["sub/c.ogg"]
    assert files == [root / name for name in expected] + [named]  # a named file is always tried
    assert [str(f) for f in failures] == [
        f"{tmp_path / 'missing.wav'}: no such file or folder; check the path",
        f"{tmp_path / 'empty'}: no audio files ({extensions}) in this folder; point at a folder of recordings",
    ]
    assert {".wav", ".flac", ".ogg"} <= AUDIO_EXTENSIONS


# ---------------------------------------------------------------- batch classification


def test_bad_files_fail_one_line_each_and_the_rest_succeed(classifier: Classifier, tmp_path: Path) -> None:
    good = good_files(tmp_path)
    bad = bad_files(tmp_path)
    results, failures = classify_paths(classifier, [tmp_path], windows=True, top_k=2, progress=False)
    assert [Path(r.source) for r in results] == sorted(good)
    for result in results:
        label, n_windows = good[Path(result.source)]
        assert result.label == label and result.probability > 0.5
        assert [p.label for p in result.top][:1] == [label] and len(result.top) == 2
        assert len(result.windows) == n_windows
        assert all(window.label == label for window in result.windows)
    assert sorted(f.path for f in failures) == sorted(str(p) for p in bad)
    for failure in failures:
        message = str(failure)
        assert message.startswith(f"{failure.path}: ") and "; " in message and "\n" not in message
        assert bad[Path(failure.path)] in message


def test_windows_are_kept_only_when_asked(classifier: Classifier, tmp_path: Path) -> None:
    sf.write(tmp_path / "a.wav", tone("high", 3.0), RATE)
    (with_windows,), _ = classify_paths(classifier, [tmp_path], windows=True, progress=False)
    (without,), _ = classify_paths(classifier, [tmp_path], windows=False, progress=False)
    assert [(w.start, w.end) for w in with_windows.windows] == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]
    assert without.windows == ()
    assert np.array_equal(without.probabilities, with_windows.probabilities)


def test_bad_options(classifier: Classifier, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top_k=0"):
        classify_paths(classifier, [tmp_path], top_k=0, progress=False)
    with pytest.raises(ConfigError, match="format 'xml' is not one of table, json, csv"):
        format_results([], "xml")  # type: ignore[arg-type]


# ---------------------------------------------------------------- formats


@pytest.fixture(scope="module")
def results(classifier: Classifier, tmp_path_factory: pytest.TempPathFactory) -> list[ClipResult]:
    root = tmp_path_factory.mktemp("format-inputs")
    sf.write(root / "a low.wav", tone("low", 2.5), RATE)  # a space in the name must survive every format
    sf.write(root / "b.wav", tone("high", 0.5), RATE)
    found, failures = classify_paths(classifier, [root], windows=True, top_k=3, progress=False)
    assert not failures
    return found


def expected_rows(results: list[ClipResult], windows: bool) -> list[tuple]:
    """(file, scope, start, end, [(label, probability), ...]) in output order."""
    rows = []
    for r in results:
        rows.append((r.source, "clip", 0.0, r.duration, [(p.label, p.probability) for p in r.top]))
        if windows:
            rows += [(r.source, "window", w.start, w.end, [(p.label, p.probability) for p in w.top])
                     for w in r.windows]
    return rows


@pytest.mark.parametrize("windows", [False, True])
def test_json_parses_back(results: list[ClipResult], windows: bool) -> None:
    records = json.loads(format_results(results, "json", windows=windows))
    assert [r["file"] for r in records] == [r.source for r in results]
    for record, result in zip(records, results, strict=True):
        assert record["label"] == result.label
        assert record["probability"] == pytest.approx(result.probability, abs=1e-6)
        assert record["duration"] == pytest.approx(result.duration)
        assert [(t["label"], t["probability"]) for t in record["top_k"]] == [
            (p.label, pytest.approx(p.probability, abs=1e-6)) for p in result.top]
        if windows:
            assert [(w["start"], w["end"], w["label"]) for w in record["windows"]] == [
                (pytest.approx(w.start), pytest.approx(w.end), w.label) for w in result.windows]
        else:
            assert "windows" not in record


@pytest.mark.parametrize("windows", [False, True])
def test_csv_parses_back(results: list[ClipResult], windows: bool) -> None:
    reader = csv.DictReader(io.StringIO(format_results(results, "csv", windows=windows)))
    assert reader.fieldnames == ["file", "scope", "start", "end", "label", "probability",
                                 "label_2", "probability_2", "label_3", "probability_3", "warning", "error"]
    rows = list(reader)
    expected = expected_rows(results, windows)
    assert len(rows) == len(expected) == (len(results) + (4 if windows else 0))
    for row, (file, scope, start, end, top) in zip(rows, expected, strict=True):
        assert (row["file"], row["scope"]) == (file, scope)
        assert (float(row["start"]), float(row["end"])) == (pytest.approx(start, abs=1e-3), pytest.approx(end, abs=1e-3))
        for rank, (label, probability) in enumerate(top, start=1):
            suffix = "" if rank == 1 else f"_{rank}"
            assert row[f"label{suffix}"] == label
            assert float(row[f"probability{suffix}"]) == pytest.approx(probability, abs=1e-6)


@pytest.mark.parametrize("windows", [False, True])
def test_table_is_aligned_and_parses_back(results: list[ClipResult], windows: bool) -> None:
    lines = format_results(results, "table", windows=windows).splitlines()
    header = lines[0]
    assert header.split() == ["file", "seconds", "label", "probability", "top-3"]
    starts = [match.start() for match in re.finditer(r"\S+", header)]
    cells = [[line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])] for line in lines[1:]]
    expected = expected_rows(results, windows)
    assert len(cells) == len(expected)
    for row, (file, scope, start, end, top) in zip(cells, expected, strict=True):
        assert row[0] == (file if scope == "clip" else "")
        assert row[1] == (f"{end:.2f}" if scope == "clip" else f"{start:.2f}-{end:.2f}")
        assert (row[2], float(row[3])) == (top[0][0], pytest.approx(top[0][1], abs=5e-4))
        assert row[4] == ", ".join(f"{label} {probability:.3f}" for label, probability in top)


def test_top_one_table_has_no_top_k_column(classifier: Classifier, tmp_path: Path) -> None:
    sf.write(tmp_path / "x.wav", tone("mid", 1.0), RATE)
    found, _ = classify_paths(classifier, [tmp_path / "x.wav"], top_k=1, progress=False)
    lines = format_results(found, "table").splitlines()
    assert lines[0].split() == ["file", "seconds", "label", "probability"]
    assert lines[1].split()[-2] == "mid"
    assert format_results([], "csv") == "file,scope,start,end,label,probability,warning,error\n"
    assert json.loads(format_results([], "json")) == []
    assert format_results([], "table") == ""  # no header above nothing


# ---------------------------------------------------------------- inputs the model cannot judge


def test_short_and_silent_recordings_come_with_warnings(classifier: Classifier, tmp_path: Path) -> None:
    sf.write(tmp_path / "short.wav", tone("low", 0.3), RATE)  # under half the 1-s window
    sf.write(tmp_path / "silent.wav", np.zeros(RATE, np.float32), RATE)
    sf.write(tmp_path / "hum.wav", 1e-5 * tone("low", 1.0) / 0.3, RATE, subtype="FLOAT")  # -100 dBFS: below the floor
    sf.write(tmp_path / "quiet.wav", 1e-3 * tone("low", 1.0) / 0.3, RATE)  # -60 dBFS: a quiet room, fine
    sf.write(tmp_path / "half.wav", tone("low", 0.5), RATE)  # exactly half: accepted
    results, failures = classify_paths(classifier, [tmp_path], progress=False)
    assert failures == []
    warned = {Path(r.source).name: r.warnings for r in results}
    assert warned["quiet.wav"] == warned["half.wav"] == ()
    assert len(warned["short.wav"]) == 1 and "only 0.30 s of audio" in warned["short.wav"][0]
    assert "under half the model's 1-s window" in warned["short.wav"][0]
    assert warned["silent.wav"] == ("the recording is silent (digital silence); the label reflects no sound",)
    assert "peak -100 dBFS" in warned["hum.wav"][0]
    record = {Path(r["file"]).name: r for r in json.loads(format_results(results, "json"))}
    assert record["short.wav"]["warnings"] == list(warned["short.wav"]) and record["quiet.wav"]["warnings"] == []
    rows = {Path(r["file"]).name: r for r in csv.DictReader(io.StringIO(format_results(results, "csv")))}
    assert rows["silent.wav"]["warning"] == warned["silent.wav"][0] and rows["half.wav"]["warning"] == ""


def test_machine_readable_output_lists_failed_files_with_their_error(classifier: Classifier, tmp_path: Path) -> None:
    problems = bad_files(tmp_path)
    sf.write(tmp_path / "good.wav", tone("mid", 1.0), RATE)
    results, failures = classify_paths(classifier, [tmp_path, tmp_path / "missing.wav"], progress=False)
    assert [Path(r.source).name for r in results] == ["good.wav"]
    records = json.loads(format_results(results, "json", failures=failures))
    # paths that are not there fail while the inputs are listed, unreadable files while decoding
    assert [Path(r["file"]).name for r in records] == ["good.wav", "missing.wav", "corrupt.wav", "empty.flac",
                                                       "text.ogg"]
    errors = {Path(r["file"]).name: r["error"] for r in records[1:]}
    for path, problem in problems.items():
        assert problem in errors[path.name] and errors[path.name].startswith(str(path))
    assert "no such file" in errors["missing.wav"] and "label" not in records[1]
    rows = list(csv.DictReader(io.StringIO(format_results(results, "csv", failures=failures))))
    assert [(Path(r["file"]).name, r["scope"]) for r in rows] == [
        ("good.wav", "clip"), ("missing.wav", "error"), ("corrupt.wav", "error"), ("empty.flac", "error"),
        ("text.ogg", "error")]
    assert rows[0]["error"] == "" and rows[0]["label"] == "mid"
    assert all(r["label"] == "" and r["error"] == errors[Path(r["file"]).name] for r in rows[1:])


# ---------------------------------------------------------------- the command line


def test_cli_exit_status_says_whether_some_or_all_inputs_failed(classifier: Classifier, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from asc.cli import main

    bundle = str(classifier.bundle_dir)
    sf.write(tmp_path / "good.wav", tone("high", 1.0), RATE)
    (tmp_path / "bad.wav").write_text("not audio")
    assert main(["classify", bundle, str(tmp_path / "good.wav"), "-q"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[2] == "high"

    assert main(["classify", bundle, str(tmp_path), "-q"]) == 1  # one answer, one failure
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2 and captured.err.count("asc: error:") == 1

    assert main(["classify", bundle, str(tmp_path / "bad.wav"), str(tmp_path / "nope.wav"), "-q"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no empty table header above the errors
    assert [line.split(":")[2].strip() for line in captured.err.splitlines()] == [
        str(tmp_path / "nope.wav"), str(tmp_path / "bad.wav")]

    assert main(["classify", bundle, str(tmp_path / "bad.wav"), "--format", "json", "-q"]) == 2
    assert [r["file"] for r in json.loads(capsys.readouterr().out)] == [str(tmp_path / "bad.wav")]


def test_cli_warns_about_short_and_silent_recordings_on_stderr(classifier: Classifier, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from asc.cli import main

    sf.write(tmp_path / "blip.wav", tone("low", 0.2), RATE)
    sf.write(tmp_path / "silent.wav", np.zeros(RATE, np.float32), RATE)
    assert main(["classify", str(classifier.bundle_dir), str(tmp_path), "-q"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 3
    warnings = captured.err.splitlines()
    assert len(warnings) == 2 and all(line.startswith("asc: warning: ") for line in warnings)
    assert "blip.wav: only 0.20 s of audio" in warnings[0] and "silent.wav: the recording is silent" in warnings[1]


def test_deployment_commands_never_import_torch(classifier: Classifier, tmp_path: Path, without_torch) -> None:
    """What a phone-side or server-side deployment runs: help, classify, bench, evaluate on a bundle.

    librosa's filter code is not loaded either: the bundle ships its window and filterbank, and
    importing librosa.filters costs more than a whole classification."""
    sf.write(tmp_path / "x.wav", tone("mid", 1.0), RATE)
    code = ("import sys\nfrom asc.cli import main\n"
            "for argv in (['classify', *sys.argv[1:3], '-q'], ['bench', sys.argv[1], '--threads', '1', '--repeats', '1'],\n"
            "             ['evaluate', sys.argv[1], '--data', sys.argv[3], '-q']):\n"
            "    status = main(argv)\n"
            "    print('status', status)\n"
            "try:\n    main(['--help'])\nexcept SystemExit as stop:\n    print('help', stop.code)\n"
            "print('loaded', sorted(BLOCKED + [m for m in sys.modules if m == 'librosa.filters']))\n")
    done = without_torch(code, classifier.bundle_dir, tmp_path / "x.wav", tmp_path / "no-dataset")
    lines = done.stdout.splitlines()
    assert [line for line in lines if line.startswith(("status", "help", "loaded"))] == [
        "status 0", "status 0", "status 2", "help 0", "loaded []"], done.stderr
    assert "blocked" not in done.stderr  # evaluate failed on the missing dataset, not on an import
    assert "no-dataset" in done.stderr


# ---------------------------------------------------------------- a run's cached bundle


def _run_with_bundle(root: Path, **source: object) -> tuple[Path, Path]:
    """A run folder (only what the staleness check reads) with a bundle exported from its last.pt at time 1000."""
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    _write_at(run / "checkpoints" / "last.pt", b"weights after epoch 3", 500)
    bundle = write_band_bundle(run / "bundle", source={"run": str(run), "checkpoint": "last", **source})
    os.utime(bundle / "bundle.json", (1000, 1000))
    return run, bundle


def _write_at(path: Path, data: bytes, mtime: float) -> None:
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))


def test_a_bundle_older_than_the_runs_model_is_stale(tmp_path: Path) -> None:
    run, bundle = _run_with_bundle(tmp_path)
    assert stale_bundle(run, bundle) is None
    _write_at(run / "checkpoints" / "last.pt", b"weights after epoch 6", 2000)  # trained further
    reason = stale_bundle(run, bundle)
    assert reason is not None and "\n" not in reason
    assert str(bundle) in reason and f"than {run / 'checkpoints' / 'last.pt'} (written after the export)" in reason


def test_compressing_the_run_makes_its_bundle_stale(tmp_path: Path) -> None:
    run, bundle = _run_with_bundle(tmp_path)
    _write_at(run / FINALIZED_NAME, b"pruned int8 module", 2000)  # asc compress finalized the run
    assert deployed_file(run) == run / FINALIZED_NAME
    assert deployed_file(run, "best") == run / "checkpoints" / "best.pt"
    assert f"than {run / FINALIZED_NAME}" in (stale_bundle(run, bundle) or "")


def test_a_recorded_digest_decides_whatever_the_file_times_say(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"weights after epoch 3").hexdigest()
    run, bundle = _run_with_bundle(tmp_path, **{DIGEST_KEY: digest})
    assert file_digest(run / "checkpoints" / "last.pt") == digest
    _write_at(run / "checkpoints" / "last.pt", b"weights after epoch 3", 2000)  # copied again: same bytes
    assert stale_bundle(run, bundle) is None
    _write_at(run / "checkpoints" / "last.pt", b"weights after epoch 6", 1)  # restored with an old time
    assert "its digest changed since the export" in (stale_bundle(run, bundle) or "")


def test_a_run_without_its_model_file_keeps_its_bundle(tmp_path: Path) -> None:
    run, bundle = _run_with_bundle(tmp_path, checkpoint="best")  # exported from best.pt, which is gone
    assert stale_bundle(run, bundle) is None
