"""Device-specific models in one bundle (DCASE 2025): combining, routing, lazy sessions, CLI, complexity.

The bundles are the band-energy classifier of test_classify (no training, no torch): the general
model labels a tone by its frequency band; device a's model has its outputs reversed, so a low
tone is "high" on device a, a known and different answer; device b's model is the general one
with logits tripled, so it agrees on labels but not on probabilities.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_classify import (
    FEATURES,
    LABELS,
    RATE,
    band_energy_model,
    tone,
    write_band_bundle,
)

from asc.bundle_manifest import GENERAL_MODEL, BundleManifest, combine_bundles
from asc.classify import classify_paths, file_device, format_results
from asc.cli import main
from asc.errors import AscError
from asc.export.onnx import convert_to_ort
from asc.feature_spec import FeatureConfig
from asc.runtime import Classifier


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {
        GENERAL_MODEL: write_band_bundle(root / "general", metrics={"accuracy": 0.5}),
        "a": write_band_bundle(root / "a", band_energy_model(order=(2, 1, 0)), metrics={"accuracy": 0.25}),
        "b": write_band_bundle(root / "b", band_energy_model(gain=3.0), precision="int8"),
    }


@pytest.fixture(scope="module")
def combined(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    (sources["a"] / "parity.json").write_text('{"a": true}\n')
    out = tmp_path_factory.mktemp("combined") / "bundle"
    combine_bundles(sources[GENERAL_MODEL], {"a": sources["a"], "b": sources["b"]}, out)
    return out


def test_combined_bundle_lists_each_device_model_with_its_files_and_metrics(combined: Path) -> None:
    manifest = BundleManifest.read(combined)
    assert list(manifest.models) == ["general", "a", "b"]
    a, b = manifest.device_models["a"], manifest.device_models["b"]
    assert (a.model_file, a.parity_file, a.precision, a.metrics) == (
        "devices/a/model.onnx", "devices/a/parity.json", "fp32", {"accuracy": 0.25})
    assert (b.precision, b.parity_file, manifest.metrics) == ("int8", None, {"accuracy": 0.5})
    assert json.loads((combined / a.parity_file).read_text()) == {"a": True}
    assert sorted(p.name for p in (combined / "devices" / "a").iterdir()) == ["model.onnx", "parity.json"]
    assert manifest.model_for("a") == "a" and manifest.model_for("s4") == manifest.model_for(None) == "general"
    # an old reader ignores the new key: the general model alone is an ordinary bundle
    assert json.loads((combined / "bundle.json").read_text())["model_file"] == "model.onnx"


def test_each_device_gets_its_model_and_others_the_general_one(combined: Path) -> None:
    classifier = Classifier(combined)
    assert classifier.devices == ("a", "b") and list(classifier.open_models) == ["general"]
    low = tone("low", 2.0)[:, 0]
    general = classifier.classify_waveform(low, RATE)
    assert (general.label, general.model) == ("low", "general")
    on_a = classifier.classify_waveform(low, RATE, device="a")
    assert (on_a.label, on_a.model) == ("high", "a")  # reversed outputs: the band of "low" is output 2
    np.testing.assert_allclose(on_a.probabilities, general.probabilities[::-1], rtol=1e-5)
    assert list(classifier.open_models) == ["general", "a"]
    for device in ("s4", "unknown", None):
        other = classifier.classify_waveform(low, RATE, device=device)
        assert other.model == "general"
        np.testing.assert_array_equal(other.probabilities, general.probabilities)
    clips = np.stack([low[:RATE], tone("high", 1.0)[:, 0]])
    np.testing.assert_allclose(classifier.logits(clips, device="b"), 3 * classifier.logits(clips), rtol=1e-5)
    assert list(classifier.open_models) == ["general", "a", "b"]


def test_device_sessions_open_on_first_use_only(combined: Path, tmp_path: Path) -> None:
    classifier = Classifier(combined)
    sf.write(tmp_path / "x.wav", tone("mid", 1.0), RATE)
    result = classifier.classify_file(tmp_path / "x.wav", device="b")
    assert (result.label, result.model) == ("mid", "b")
    assert list(classifier.open_models) == ["general", "b"]  # device a's model was never loaded


def test_a_device_bundle_keeps_its_ort_and_xz_files(sources: dict[str, Path], tmp_path: Path) -> None:
    """A device shipped as xz container plus ORT file: both are carried over and the ORT file is loaded."""
    import lzma

    import onnxruntime as ort

    device = write_band_bundle(tmp_path / "c", band_energy_model(order=(2, 1, 0)), ort_file="model.ort",
                               container_file="model.onnx.xz")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(device / "model.ort")
    options.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(device / "model.onnx"), options, providers=["CPUExecutionProvider"])
    (device / "model.onnx.xz").write_bytes(lzma.compress((device / "model.onnx").read_bytes()))
    (device / "model.onnx").unlink()  # shipped as the container only
    out = combine_bundles(sources[GENERAL_MODEL], {"c": device}, tmp_path / "out")
    entry = out.device_models["c"]
    assert (entry.model_file, entry.ort_file, entry.container_file) == (
        "devices/c/model.onnx", "devices/c/model.ort", "devices/c/model.onnx.xz")
    classifier = Classifier(tmp_path / "out")
    result = classifier.classify_waveform(tone("low", 1.0)[:, 0], RATE, device="c")
    assert (result.label, result.model) == ("high", "c")
    assert classifier.open_models["c"] == tmp_path / "out" / "devices" / "c" / "model.ort"
    (tmp_path / "out" / "devices" / "c" / "model.ort").unlink()  # without it, the container is unpacked
    unpacked = Classifier(tmp_path / "out")
    assert unpacked.classify_waveform(tone("low", 1.0)[:, 0], RATE, device="c").label == "high"
    assert unpacked.open_models["c"].name == "model.onnx.xz"


def test_a_missing_device_model_file_is_one_line(combined: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(combined, broken)
    (broken / "devices" / "a" / "model.onnx").unlink()
    with pytest.raises(AscError) as error:
        Classifier(broken)
    assert str(error.value) == (f"{broken / 'devices/a/model.onnx'}: the bundle's model file of device 'a' is "
                                "missing; copy the whole bundle folder or re-export it")


# ---------------------------------------------------------------- refusals

OTHER_RATE = FeatureConfig(sample_rate=22050, n_fft=512, hop_length=256, n_mels=40)  # same input shape at 1 s
OTHER_FFT = FeatureConfig(sample_rate=RATE, n_fft=1024, hop_length=256, n_mels=40)


@pytest.mark.parametrize(("make", "expected"), [
    (lambda d: write_band_bundle(d, labels=["low", "mid", "loud"]), "labels ['low', 'mid', 'loud'] differs"),
    (lambda d: write_band_bundle(d, features=OTHER_RATE), "sample_rate 22050 differs"),
    (lambda d: write_band_bundle(d, band_energy_model(frames=FEATURES.num_frames(2 * RATE)), clip_samples=2 * RATE,
                                 input_shape=["batch", 1, 40, FEATURES.num_frames(2 * RATE)]),
     "clip_samples 32000 differs"),
    (lambda d: write_band_bundle(d, features=OTHER_FFT), "front-end spec differs from the general bundle"),
    (lambda d: write_band_bundle(d, band_energy_model(batch=4), input_shape=[4, 1, 40, FEATURES.num_frames(RATE)]),
     "input_shape [4, 1, 40, 63] differs"),
])
def test_mismatched_device_bundles_are_refused_in_one_line(sources: dict[str, Path], tmp_path: Path, make,
                                                           expected: str) -> None:
    device = make(tmp_path / "device")
    out = tmp_path / "out"
    with pytest.raises(AscError) as error:
        combine_bundles(sources[GENERAL_MODEL], {"a": sources["a"], "c": device}, out)
    message = str(error.value)
    assert message.startswith(f"{device}: ") and expected in message and "\n" not in message
    assert message.endswith("export every device model with the general model's labels, clip length and front end")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written


def test_other_bad_combinations_are_refused(sources: dict[str, Path], combined: Path, tmp_path: Path) -> None:
    general = sources[GENERAL_MODEL]
    cases = [
        ({"general": sources["a"]}, tmp_path / "o1", "device name 'general'"),
        ({"a/b": sources["a"]}, tmp_path / "o2", "device name 'a/b'"),
        ({}, tmp_path / "o3", "no device bundles to combine"),
        ({"a": combined}, tmp_path / "o4", f"{combined}: already holds device models ['a', 'b']"),
        ({"a": sources["a"]}, sources["a"], "is the a input bundle and would be replaced; choose another --out"),
        ({"a": tmp_path / "nothing"}, tmp_path / "o5", f"{tmp_path / 'nothing' / 'bundle.json'}: no bundle manifest"),
    ]
    for devices, out, expected in cases:
        with pytest.raises(AscError, match=None) as error:
            combine_bundles(general, devices, out)
        assert expected in str(error.value) and "\n" not in str(error.value), devices
    hidden = tmp_path / "hidden"  # a broken model.onnx behind a loadable model.ort would ship unnoticed
    shutil.copytree(sources["a"], hidden)
    manifest = BundleManifest.read(hidden)
    ort_file = convert_to_ort(hidden / manifest.model_file, hidden).model.name
    (hidden / "bundle.json").write_text(replace(manifest, ort_file=ort_file).to_json())
    (hidden / manifest.model_file).write_bytes(b"\x08\x07 not a model")
    with pytest.raises(AscError, match=f"{hidden / 'model.onnx'}: onnxruntime cannot load the model"):
        combine_bundles(general, {"a": hidden}, tmp_path / "o6")
    assert not (tmp_path / "o6").exists()


# ---------------------------------------------------------------- the command line


def test_file_device_reads_the_tau_name() -> None:
    assert file_device("airport-lisbon-1000-40000-0-a.wav") == "a"
    assert file_device(Path("x/street-s4.flac")) == "s4"
    assert file_device("plain.wav") is None


def write_named(root: Path) -> dict[str, str]:
    """TAU-style names -> the model that should answer with --device auto."""
    root.mkdir(parents=True, exist_ok=True)
    models = {"park-lyon-1-a.wav": "a", "park-lyon-2-b.wav": "b", "park-lyon-3-s4.wav": "general",
              "plain.wav": "general"}
    for name in models:
        sf.write(root / name, tone("low", 1.0), RATE)
    return models


def test_cli_combine_then_classify_with_a_device(sources: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bundle"
    assert main(["bundle", "combine", str(sources[GENERAL_MODEL]), "--device", f"a={sources['a']}",
                 "--device-bundle", f"b={sources['b']}", "--out", str(out)]) == 0
    assert "device models a (fp32, devices/a/model.onnx), b (int8, devices/b/model.onnx)" in capsys.readouterr().out
    files = write_named(tmp_path / "audio")
    first = str(tmp_path / "audio" / "plain.wav")

    assert main(["classify", str(out), first, "--device", "a", "-q"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[:5] == ["file", "seconds", "model", "label", "probability"]
    assert row.split()[1:4] == ["1.00", "a", "high"]

    assert main(["classify", str(out), str(tmp_path / "audio"), "--device", "auto", "--format", "csv", "-q"]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert {Path(r["file"]).name: r["model"] for r in rows} == files
    assert {Path(r["file"]).name: r["label"] for r in rows} == {
        name: "high" if model == "a" else "low" for name, model in files.items()}

    assert main(["classify", str(out), first, "--device", "s9", "--format", "json", "-q"]) == 0
    captured = capsys.readouterr()
    assert [(r["model"], r["label"]) for r in json.loads(captured.out)] == [("general", "low")]
    assert captured.err == (f"asc: warning: {out}: no model for device 's9' (device models: a, b); "
                            "using the general model\n")


@pytest.mark.parametrize("command", [["bundle"], ["bundle", "combine"]])
def test_bundle_commands_have_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main([*command, "--help"])
    assert stop.value.code == 0 and "usage: asc bundle" in capsys.readouterr().out


def test_cli_usage_errors_exit_2_with_one_line(sources: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    general = str(sources[GENERAL_MODEL])
    with pytest.raises(SystemExit) as stop:
        main(["bundle"])
    assert stop.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as stop:
        main(["bundle", "combine", general, "--device", "a", "--out", str(tmp_path / "o")])
    assert stop.value.code == 2 and "'a' is not DEVICE=BUNDLE" in capsys.readouterr().err
    mismatched = write_band_bundle(tmp_path / "labels", labels=["x", "y", "z"])
    assert main(["bundle", "combine", general, "--device", f"c={mismatched}", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"asc: error: {mismatched}: labels ['x', 'y', 'z'] differs")
    assert main(["bundle", "combine", general, "--device", f"a={sources['a']}", "--device", f"a={sources['b']}",
                 "--out", str(tmp_path / "o")]) == 2
    assert "given twice" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_ordinary_bundle_output_has_no_model_column(sources: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    write_named(tmp_path)
    assert main(["classify", str(sources["a"]), str(tmp_path / "plain.wav"), "--device", "auto", "-q"]) == 0
    assert "model" not in capsys.readouterr().out.splitlines()[0].split()
    results, _ = classify_paths(Classifier(sources["a"]), [tmp_path], device="auto", progress=False)
    assert {r.model for r in results} == {"general"}
    assert "model" not in json.loads(format_results(results, "json"))[0]


def test_combine_and_classify_never_import_torch(sources: dict[str, Path], tmp_path: Path, without_torch) -> None:
    write_named(tmp_path / "audio")
    code = ("import sys\nfrom asc.cli import main\n"
            "general, a, audio, out = sys.argv[1:5]\n"
            "print('status', main(['bundle', 'combine', general, '--device', 'a=' + a, '--out', out]))\n"
            "print('status', main(['classify', out, audio, '--device', 'auto', '--format', 'json', '-q']))\n"
            "print('loaded', sorted(BLOCKED))\n")
    done = without_torch(code, sources[GENERAL_MODEL], sources["a"], tmp_path / "audio", tmp_path / "out")
    lines = done.stdout.splitlines()
    assert [line for line in lines if line.startswith(("status", "loaded"))] == [
        "status 0", "status 0", "loaded []"], done.stderr
    records, _ = json.JSONDecoder().raw_decode(done.stdout[done.stdout.index("["):])
    assert {Path(r["file"]).name: r["model"] for r in records}["park-lyon-1-a.wav"] == "a"


# ---------------------------------------------------------------- evaluate and complexity


def test_evaluate_routes_each_clip_by_its_dataset_device(combined: Path, tmp_path: Path) -> None:
    from asc.bundle_eval import evaluate_bundle
    from asc.config import DataConfig

    rows = []
    for device in ("a", "b", "s4"):
        for label in LABELS:
            name = f"{label}-{device}.wav"
            sf.write(tmp_path / name, tone(label, 1.0), RATE)
            rows.append([name, label, device, "evaluate"])
    with (tmp_path / "clips.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["filename", "scene_label", "device", "split"], *rows])
    data = DataConfig(root=str(tmp_path / "clips.csv"), format="table", device_column="device",
                      split_column="split")
    metrics = evaluate_bundle(combined, data, progress=False)
    per_device = {device: score.accuracy for device, score in metrics.per_device.items()}
    # device a's reversed model gets low and high wrong, mid right; b and s4 (general) are all right
    assert per_device == {"a": pytest.approx(1 / 3), "b": 1.0, "s4": 1.0}
    assert metrics.accuracy == pytest.approx(7 / 9)


def test_complexity_reports_every_model(combined: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from asc.complexity import bundle_complexity, run_complexity_command

    assert run_complexity_command(combined, ["dcase2025"], per_layer=False) == 0
    out = capsys.readouterr().out
    blocks, summary = out.rsplit("\n\n", 1)[0].split("\n\n== model "), out.rsplit("\n\n", 1)[1]
    assert summary == "3 models: none over a limit\n"
    assert [block.split(" ==")[0].removeprefix("== model ") for block in blocks] == ["general", "a", "b"]
    assert all(block.count("dcase2025: ") == 2 and block.count(": PASS") == 2 for block in blocks)
    assert "devices/a/model.onnx" in blocks[1] and "devices/b/model.onnx" in blocks[2]
    counts = [bundle_complexity(combined, model=name) for name in ("general", "a", "b")]
    assert {c.params for c in counts} == {FEATURES.n_mels * len(LABELS)}  # the MatMul weights
    with pytest.raises(AscError, match="no model 'c' \\(it has general, a, b\\)"):
        bundle_complexity(combined, model="c")
