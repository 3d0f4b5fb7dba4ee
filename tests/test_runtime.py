"""The torch-free runtime on real exported bundles: parity with torch, windowing, aggregation, input handling.

The fixture exports a tiny CNN three ways: with the log-mel front end inside the graph (ONNX STFT,
plus an ORT-format copy), on log-mel input with the front end outside, and the latter with a
fixed batch of 4. Torch is the reference the runtime's numbers are held to.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import soundfile as sf
import torch
from torch import nn

from asc.audio import resample
from asc.bundle_manifest import BundleManifest
from asc.errors import AscError, AudioError, ConfigError
from asc.feature_spec import FeatureConfig
from asc.features import LogMel
from asc.runtime import (
    Classifier,
    bundle_intra_op_threads,
    intra_op_threads,
    session_options,
    top_predictions,
    window_starts,
)

REPO = Path(__file__).resolve().parents[1]
RATE = 16000
CLIP = RATE  # 1-s clips
FEATURES = FeatureConfig(sample_rate=RATE, n_fft=512, hop_length=256, n_mels=40)
FRAMES = FEATURES.num_frames(CLIP)
LABELS = ["airport", "bus", "metro", "park"]


class TinyCNN(nn.Module):
    """Log-mel ``(batch, 1, n_mels, frames)`` to logits; small but input-dependent."""

    def __init__(self, n_labels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(1), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(8, n_labels),
        )

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        return self.body(log_mel)


class WaveformModel(nn.Module):
    """Front end and CNN in one module: what an in-graph bundle contains."""

    def __init__(self, cnn: TinyCNN) -> None:
        super().__init__()
        self.frontend = LogMel(FEATURES)
        self.cnn = cnn

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.cnn(self.frontend(waveform))


@dataclass(frozen=True)
class Bundles:
    in_graph: Path  # raw PCM input, ONNX STFT inside, plus model.ort
    external: Path  # log-mel input, dynamic batch
    fixed_batch: Path  # log-mel input, batch fixed at 4
    reference: WaveformModel  # torch: waveform -> logits, the same weights

    def torch_logits(self, clips: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.reference(torch.from_numpy(np.asarray(clips, np.float32))).numpy()


def _export(model: nn.Module, example: torch.Tensor, path: Path, input_name: str) -> None:
    torch.onnx.export(
        model, (example,), path, dynamo=True, external_data=False, verbose=False,
        input_names=[input_name], output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
    )


def _write_manifest(folder: Path, *, in_graph: bool, input_shape: list[int | str], ort_file: str | None) -> None:
    manifest = BundleManifest(
        labels=LABELS, sample_rate=RATE, clip_samples=CLIP, frontend=FEATURES.to_dict(),
        frontend_in_graph=in_graph, precision="fp32", input_name="waveform" if in_graph else "log_mel",
        input_shape=input_shape, ort_file=ort_file,
    )
    (folder / "bundle.json").write_text(manifest.to_json())


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    torch.manual_seed(0)
    cnn = TinyCNN(len(LABELS))
    with torch.no_grad():  # a real normalisation, and logits far enough apart that windows disagree
        cnn.body[0].running_mean.fill_(-8.0)
        cnn.body[0].running_var.fill_(9.0)
        cnn.body[-1].weight.mul_(30.0)
    reference = WaveformModel(cnn).eval()
    root = tmp_path_factory.mktemp("bundles")
    waveforms = torch.randn(2, CLIP) * 0.1
    log_mels = reference.frontend(waveforms)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folders = {name: root / name for name in ("in_graph", "external", "fixed_batch")}
        for folder in folders.values():
            folder.mkdir()
        _export(reference, waveforms, folders["in_graph"] / "model.onnx", "waveform")
        _export(cnn.eval(), log_mels, folders["external"] / "model.onnx", "log_mel")
    # Fixing the batch dimension in the graph's signature is what a static-shape export produces.
    fixed = onnx.load(folders["external"] / "model.onnx")
    for value in (fixed.graph.input[0], fixed.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 4
    onnx.save(fixed, folders["fixed_batch"] / "model.onnx")
    # An ORT-format copy, saved at the portable optimisation level as an exporter would.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folders["in_graph"] / "model.ort")
    options.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(folders["in_graph"] / "model.onnx"), options, providers=["CPUExecutionProvider"])
    _write_manifest(folders["in_graph"], in_graph=True, input_shape=["batch", CLIP], ort_file="model.ort")
    _write_manifest(folders["external"], in_graph=False, input_shape=["batch", 1, FEATURES.n_mels, FRAMES],
                    ort_file=None)
    _write_manifest(folders["fixed_batch"], in_graph=False, input_shape=[4, 1, FEATURES.n_mels, FRAMES],
                    ort_file=None)
    return Bundles(**folders, reference=reference)


def scene(seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """Band-limited audio (< 3.5 kHz) whose character changes every second, so windows differ."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    second = np.floor(t).astype(int)
    frequencies = np.array([220.0, 880.0, 2400.0, 500.0, 3300.0])[second % 5]
    amplitudes = np.array([0.05, 0.4, 0.2, 0.6, 0.1])[second % 5]
    tone = amplitudes * np.sin(2 * np.pi * frequencies * t + rng.uniform(0, 2 * np.pi))
    return (tone + 0.3 * np.sin(2 * np.pi * 150.0 * t) * (second % 2)).astype(np.float32)


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-4) -> None:
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= rtol * scale, (actual, expected)


# ---------------------------------------------------------------- parity with torch


def test_in_graph_bundle_matches_torch_and_prefers_the_ort_file(bundles: Bundles) -> None:
    classifier = Classifier(bundles.in_graph)
    assert classifier.model_path.name == "model.ort"
    clips = np.stack([scene(1.0, seed=s) for s in range(3)] + [0.3 * np.random.default_rng(1).standard_normal(CLIP)])
    logits = classifier.logits(clips)
    assert logits.shape == (4, len(LABELS))
    assert_close(logits, bundles.torch_logits(clips))
    assert np.ptp(logits, axis=0).max() > 1e-2  # the model's answer depends on the input


def test_external_front_end_bundle_matches_torch(bundles: Bundles) -> None:
    classifier = Classifier(bundles.external)
    assert classifier.model_path.name == "model.onnx"
    clips = np.stack([scene(1.0, seed=s) for s in range(5)])
    assert_close(classifier.logits(clips), bundles.torch_logits(clips))


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_batching_does_not_change_the_answer(bundles: Bundles, batch_size: int) -> None:
    audio = scene(5.0)
    expected = Classifier(bundles.external).classify_waveform(audio, RATE).probabilities
    result = Classifier(bundles.external, batch_size=batch_size).classify_waveform(audio, RATE)
    assert_close(result.probabilities, expected, 1e-6)


@pytest.mark.parametrize("seconds", [1.0, 3.0, 4.0, 5.0])
def test_fixed_batch_graph_pads_the_last_batch(bundles: Bundles, seconds: float) -> None:
    audio = scene(seconds)
    fixed = Classifier(bundles.fixed_batch, batch_size=16).classify_waveform(audio, RATE)
    dynamic = Classifier(bundles.external).classify_waveform(audio, RATE)
    assert len(fixed.windows) == len(dynamic.windows) == int(seconds)
    assert_close(np.stack([w.logits for w in fixed.windows]), np.stack([w.logits for w in dynamic.windows]), 1e-6)


def test_more_threads_give_the_same_logits(bundles: Bundles) -> None:
    clips = np.stack([scene(1.0, seed=s) for s in range(3)])
    assert_close(Classifier(bundles.in_graph, threads=2).logits(clips), Classifier(bundles.in_graph).logits(clips),
                 1e-6)


def _with_runtime_settings(source: Path, target: Path, settings: object) -> Path:
    shutil.copytree(source, target)
    manifest = json.loads((target / "bundle.json").read_text())
    (target / "bundle.json").write_text(json.dumps({**manifest, "runtime": settings}))
    return target


def test_thread_count_comes_from_the_caller_then_the_bundle_then_one(bundles: Bundles, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)  # any machine
    assert Classifier(bundles.external).threads == 1
    measured = _with_runtime_settings(bundles.external, tmp_path / "measured", {"intra_op_threads": 2})
    assert bundle_intra_op_threads(measured) == 2 and bundle_intra_op_threads(bundles.external) is None
    assert Classifier(measured).threads == 2  # what the exporter measured for this bundle
    assert Classifier(measured, threads=1).threads == 1  # --threads overrides it
    assert intra_op_threads(measured, 3) == 3 and intra_op_threads(bundles.external) == 1
    absent = _with_runtime_settings(bundles.external, tmp_path / "absent", {"intra_op_threads": None})
    assert Classifier(absent).threads == 1


def test_the_bundles_thread_count_is_capped_at_the_usable_cores(bundles: Bundles, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    measured = _with_runtime_settings(bundles.external, tmp_path / "measured", {"intra_op_threads": 4})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert intra_op_threads(measured) == 2  # measured on a bigger machine
    assert intra_op_threads(measured, 4) == 4  # the caller's count is taken as given
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    assert intra_op_threads(measured) == 4
    clips = np.stack([scene(1.0, seed=s) for s in range(2)])
    assert_close(Classifier(measured).logits(clips), Classifier(bundles.external).logits(clips), 1e-6)


@pytest.mark.parametrize("settings", [{"intra_op_threads": 0}, {"intra_op_threads": "2"},
                                      {"intra_op_threads": True}, {"intra_op_threads": 1.5}, [2]])
def test_a_bad_thread_setting_in_the_bundle_is_one_line(bundles: Bundles, tmp_path: Path, settings: object) -> None:
    bundle = _with_runtime_settings(bundles.external, tmp_path / "bad", settings)
    with pytest.raises(AscError, match=r"bundle.json: runtime(\.intra_op_threads)? is .*; re-export") as error:
        Classifier(bundle)
    assert "\n" not in str(error.value)
    assert Classifier(bundle, threads=1).threads == 1  # --threads does not need the bundle's value


def test_worker_threads_sleep_instead_of_spinning() -> None:
    for threads in (1, 2):
        options = session_options(threads)
        assert options.intra_op_num_threads == threads
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(2, spinning=True).get_session_config_entry("session.intra_op.allow_spinning") == "1"


# ---------------------------------------------------------------- windows and aggregation


@pytest.mark.parametrize(
    ("num_samples", "hop", "expected"),
    [
        (8000, CLIP, [0]),  # 0.5 s: one zero-padded window
        (CLIP, CLIP, [0]),
        (40000, CLIP, [0, 16000, 24000]),  # 2.5 s: the tail window is aligned to the end
        (60 * CLIP, CLIP, list(range(0, 60 * CLIP, CLIP))),
        (40000, 8000, [0, 8000, 16000, 24000]),  # 0.5-s hop: overlapping windows end exactly at the end
        (50000, 24000, [0, 24000, 34000]),  # hop longer than a clip skips audio, still covers the end
        (CLIP + 1, CLIP, [0, 1]),
    ],
)
def test_window_starts(num_samples: int, hop: int, expected: list[int]) -> None:
    assert window_starts(num_samples, CLIP, hop) == expected


@pytest.mark.parametrize(
    ("seconds", "spans"),
    [
        (0.5, [(0.0, 0.5)]),
        (1.0, [(0.0, 1.0)]),
        (2.5, [(0.0, 1.0), (1.0, 2.0), (1.5, 2.5)]),
        (60.0, [(float(i), float(i + 1)) for i in range(60)]),
    ],
)
def test_windows_of_a_recording_and_their_logits(bundles: Bundles, seconds: float, spans: list) -> None:
    audio = scene(seconds)
    result = Classifier(bundles.external, batch_size=32).classify_waveform(audio, RATE)
    assert result.duration == pytest.approx(seconds)
    assert np.allclose([(w.start, w.end) for w in result.windows], spans)
    # Each window's logits are torch's on exactly that slice (zero-padded when shorter than a clip).
    starts = [round(start * RATE) for start, _ in spans]
    clips = np.stack([np.pad(audio[s : s + CLIP], (0, max(0, s + CLIP - len(audio)))) for s in starts])
    assert_close(np.stack([w.logits for w in result.windows]), bundles.torch_logits(clips))


def test_hop_option_overlaps_windows(bundles: Bundles) -> None:
    result = Classifier(bundles.external, hop_seconds=0.5).classify_waveform(scene(2.5), RATE)
    assert np.allclose([(w.start, w.end) for w in result.windows], [(0, 1), (0.5, 1.5), (1, 2), (1.5, 2.5)])


def test_clip_answer_is_the_mean_log_probability_of_its_windows(bundles: Bundles) -> None:
    audio = scene(2.5, seed=3)
    result = Classifier(bundles.in_graph).classify_waveform(audio, RATE, top_k=4)
    logits = bundles.torch_logits(np.stack([audio[:16000], audio[16000:32000], audio[24000:40000]])).astype(float)
    # By hand: log-softmax per window, mean over windows, then renormalise.
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    mean = log_probs.mean(axis=0)
    expected = np.exp(mean) / np.exp(mean).sum()
    assert_close(result.probabilities, expected)
    assert result.probabilities.sum() == pytest.approx(1.0)
    assert [p.label for p in result.top] == [LABELS[i] for i in np.argsort(-expected)]
    assert result.label == LABELS[int(expected.argmax())]
    assert result.probability == pytest.approx(expected.max(), rel=1e-4)
    for window, window_logits in zip(result.windows, logits, strict=True):
        window_probs = np.exp(window_logits) / np.exp(window_logits).sum()
        assert_close(window.probabilities, window_probs)
        assert window.label == LABELS[int(window_probs.argmax())]
    # The windows disagree, so averaging probabilities instead would give different numbers.
    assert len({window.label for window in result.windows}) > 1
    arithmetic = np.exp(log_probs).mean(axis=0)
    assert np.abs(arithmetic - expected).max() > 1e-3  # 25x the tolerance used above


def test_top_predictions_orders_and_clamps() -> None:
    top = top_predictions(np.array([0.1, 0.6, 0.3]), ["a", "b", "c"], 5)
    assert [(p.label, p.probability) for p in top] == [("b", 0.6), ("c", 0.3), ("a", 0.1)]
    assert len(top_predictions(np.array([0.5, 0.5]), ["x", "y"], 1)) == 1
    with pytest.raises(ConfigError, match="top_k"):
        top_predictions(np.array([1.0]), ["x"], 0)


# ---------------------------------------------------------------- input handling


@pytest.mark.parametrize("rate", [8000, 48000])
def test_files_at_other_rates_are_resampled(bundles: Bundles, tmp_path: Path, rate: int) -> None:
    audio = scene(2.5, rate=rate)
    path = tmp_path / f"scene_{rate}.wav"
    sf.write(path, audio, rate, subtype="FLOAT")
    classifier = Classifier(bundles.external)
    result = classifier.classify_file(path)
    assert result.source == str(path)
    assert result.duration == pytest.approx(2.5)
    assert len(result.windows) == 3
    same_path = classifier.classify_waveform(resample(audio, rate, RATE), RATE)
    assert_close(result.probabilities, same_path.probabilities, 1e-6)
    assert_close(classifier.classify_waveform(audio, rate).probabilities, result.probabilities, 1e-6)
    # The same band-limited scene generated at 16 kHz gets nearly the same answer.
    native = classifier.classify_waveform(scene(2.5), RATE)
    assert np.abs(result.probabilities - native.probabilities).max() < 0.02


def test_stereo_files_are_mixed_to_mono(bundles: Bundles, tmp_path: Path) -> None:
    left, right = scene(2.0, seed=1), 0.5 * np.random.default_rng(2).standard_normal(2 * RATE).astype(np.float32)
    path = tmp_path / "stereo.flac"
    sf.write(path, np.stack([left, right], axis=1), RATE, subtype="PCM_24")
    classifier = Classifier(bundles.external)
    stereo = classifier.classify_file(path)
    decoded = sf.read(path, dtype="float32")[0].T
    mixed = classifier.classify_waveform(decoded.mean(axis=0), RATE)
    assert_close(stereo.probabilities, mixed.probabilities, 1e-6)
    assert_close(classifier.classify_waveform(decoded, RATE).probabilities, mixed.probabilities, 1e-6)
    left_only = classifier.classify_waveform(decoded[0], RATE)
    assert np.abs(left_only.probabilities - stereo.probabilities).max() > 1e-3


def test_bad_audio_raises_one_line_errors(bundles: Bundles, tmp_path: Path) -> None:
    classifier = Classifier(bundles.external)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all\n")
    for path, problem in ((empty, "empty"), (text, "not a readable audio file"), (tmp_path / "gone.wav", "not found")):
        with pytest.raises(AudioError, match=problem) as error:
            classifier.classify_file(path)
        assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)
    with pytest.raises(AscError, match="no samples"):
        classifier.classify_waveform(np.zeros(0, np.float32), RATE)
    with pytest.raises(AscError, match="NaN"):
        classifier.classify_waveform(np.full(RATE, np.nan, np.float32), RATE)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"threads": 0}, "threads"), ({"batch_size": 0}, "batch_size"), ({"hop_seconds": 0.0}, "hop")],
)
def test_bad_settings(bundles: Bundles, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Classifier(bundles.external, **kwargs)


# ---------------------------------------------------------------- bad bundles


def _copy_bundle(source: Path, target: Path, **changes: object) -> Path:
    shutil.copytree(source, target)
    manifest = replace(BundleManifest.read(target), **changes)
    (target / "bundle.json").write_text(manifest.to_json())
    return target


def test_unloadable_ort_file_falls_back_to_onnx(bundles: Bundles, tmp_path: Path) -> None:
    bundle = _copy_bundle(bundles.in_graph, tmp_path / "bundle")
    (bundle / "model.ort").write_bytes(b"\x00garbage")
    with pytest.warns(RuntimeWarning, match="model.ort.*using model.onnx"):
        classifier = Classifier(bundle)
    assert classifier.model_path.name == "model.onnx"
    clips = np.stack([scene(1.0)])
    assert_close(classifier.logits(clips), bundles.torch_logits(clips))
    wav = tmp_path / "scene.wav"
    sf.write(wav, scene(1.0), RATE)
    done = subprocess.run([sys.executable, "-m", "asc", "classify", str(bundle), str(wav), "-q"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    (warning,) = done.stderr.splitlines()  # the command's own format, not Python's file:line and source echo
    assert warning.startswith(f"asc: warning: {bundle / 'model.ort'}: onnxruntime cannot load the model")
    assert warning.endswith("; using model.onnx instead")


@pytest.mark.parametrize(
    ("changes", "corrupt_model", "match"),
    [
        ({"clip_samples": 2 * CLIP}, False, r"bundle.json: input_shape .* does not match"),
        ({"input_shape": ["batch", 1, FEATURES.n_mels, FRAMES + 1]}, False, "does not match"),
        ({"input_shape": [2, 1, FEATURES.n_mels, FRAMES]}, False, "model input shape"),
        ({"input_name": "audio"}, False, "model inputs"),
        ({"output_name": "scores"}, False, "no output named 'scores'"),
        ({"labels": LABELS[:3]}, False, "4 outputs but bundle.json lists 3 labels"),
        ({"sample_rate": 22050}, False, "front-end sample rate 16000"),
        ({}, True, "onnxruntime cannot load the model"),
    ],
)
def test_inconsistent_bundles_fail_clearly(
    bundles: Bundles, tmp_path: Path, changes: dict, corrupt_model: bool, match: str
) -> None:
    bundle = _copy_bundle(bundles.external, tmp_path / "bundle", **changes)
    if corrupt_model:
        (bundle / "model.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(AscError, match=match) as error:
        Classifier(bundle)
    assert "re-export" in str(error.value) and "\n" not in str(error.value)


def _container_only(source: Path, target: Path) -> Path:
    """``source`` as an app ships it when size matters: ``model.onnx`` only as its xz container."""
    from asc.export.onnx import pack_onnx

    bundle = _copy_bundle(source, target, container_file="model.onnx.xz")
    pack_onnx(bundle / "model.onnx")
    (bundle / "model.onnx").unlink()
    return bundle


def test_a_bundle_shipping_only_its_container_gives_the_same_logits(bundles: Bundles, tmp_path: Path) -> None:
    bundle = _container_only(bundles.external, tmp_path / "shipped")
    classifier = Classifier(bundle)
    assert classifier.model_path.name == "model.onnx.xz"
    clips = np.stack([scene(1.0, seed=s) for s in range(3)])
    np.testing.assert_array_equal(classifier.logits(clips), Classifier(bundles.external).logits(clips))
    (bundle / "model.onnx.xz").write_bytes(b"\xfd7zXZ\x00garbage")
    with pytest.raises(AscError, match="model.onnx.xz: onnxruntime cannot load the model"):
        Classifier(bundle)
    (bundle / "model.onnx.xz").unlink()
    with pytest.raises(AscError, match="model file is missing"):
        Classifier(bundle)


def test_missing_bundle_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(AscError, match=f"{tmp_path}/bundle.json: no bundle manifest"):
        Classifier(tmp_path)


# ---------------------------------------------------------------- torch-free

def test_runtime_and_classify_work_with_torch_blocked(bundles: Bundles, tmp_path: Path, without_torch) -> None:
    path = tmp_path / "scene.wav"
    sf.write(path, scene(2.5), RATE, subtype="FLOAT")
    script = (
        "import json, sys\n"
        "from asc.runtime import Classifier\n"
        "from asc.classify import classify_paths, format_results\n"
        "out = {}\n"
        "for name in sys.argv[2:]:\n"
        "    results, failures = classify_paths(Classifier(name), [sys.argv[1]], progress=False)\n"
        "    assert not failures, failures\n"
        "    out[name] = json.loads(format_results(results, 'json'))[0]\n"
        "out['blocked'] = BLOCKED\n"
        "out['asc_modules'] = sorted(m for m in sys.modules if m.startswith('asc'))\n"
        "print(json.dumps(out))\n"
    )
    shipped = _container_only(bundles.external, tmp_path / "shipped")  # unpacked with lzma, torch-free
    done = without_torch(script, path, bundles.in_graph, bundles.external, shipped)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["blocked"] == []  # nothing even tried to import torch
    assert "asc.features" not in out["asc_modules"]
    for bundle in (bundles.in_graph, bundles.external, shipped):
        expected = Classifier(bundle).classify_file(path)
        assert out[str(bundle)]["label"] == expected.label
        assert out[str(bundle)]["probability"] == pytest.approx(expected.probability, abs=1e-6)


def test_example_script_labels_wavs_without_torch(bundles: Bundles, tmp_path: Path, without_torch) -> None:
    good, empty = tmp_path / "good.wav", tmp_path / "empty.wav"
    sf.write(good, scene(1.5, rate=44100), 44100)
    empty.write_bytes(b"")
    script = (
        "import runpy, sys\n"
        "sys.argv = ['classify_wavs.py', *sys.argv[1:]]\n"
        f"runpy.run_path({str(REPO / 'export' / 'classify_wavs.py')!r}, run_name='__main__')\n"
    )
    done = without_torch(script, bundles.in_graph, good, empty)
    assert done.returncode == 1, done.stderr  # one file could not be read
    expected = Classifier(bundles.in_graph).classify_file(good)
    assert done.stdout.splitlines() == [f"{good}\t{expected.label}\t{expected.probability:.3f}"]
    assert done.stderr.splitlines() == [f"{empty}: file is empty (0 bytes); re-export or re-download the file"]
