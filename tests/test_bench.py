"""``asc.bench``: timings of real bundles built from tiny hand-made graphs (no timing asserts)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from asc.bench import (
    FRONTEND_PREFIX,
    THREAD_GAIN,
    BundleBench,
    ThreadResult,
    Timing,
    bench_bundle,
    cpu_line,
    format_bench,
    recommend_intra_op_threads,
    split_frontend,
)
from asc.bundle_manifest import MANIFEST_NAME, BundleManifest
from asc.errors import AscError, ConfigError
from asc.feature_spec import FeatureConfig

FEATURES = FeatureConfig(sample_rate=16000, n_fft=512, hop_length=256, n_mels=32)
CLIP = 16000
FRAMES = FEATURES.num_frames(CLIP)
LABELS = ["a", "b", "c"]


def _cnn_nodes(source: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Mean over time, then a linear layer to the labels: a stand-in CNN on (batch, 1, F, T)."""
    weight = np.random.default_rng(0).standard_normal((FEATURES.n_mels, len(LABELS))).astype(np.float32)
    nodes = [helper.make_node("ReduceMean", [source, "axes13"], ["pooled"], keepdims=0),
             helper.make_node("MatMul", ["pooled", "w"], ["logits"])]
    return nodes, [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.array([1, 3], np.int64), "axes13")]


def _save(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], inputs: list[onnx.ValueInfoProto],
          path: Path) -> None:
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(LABELS)])
    graph = helper.make_graph(nodes, "m", inputs, [output], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _manifest(in_graph: bool, **changes: object) -> BundleManifest:
    shape: list[int | str] = ["batch", CLIP] if in_graph else ["batch", 1, FEATURES.n_mels, FRAMES]
    manifest = BundleManifest(labels=LABELS, sample_rate=FEATURES.sample_rate, clip_samples=CLIP,
                              frontend=FEATURES.to_dict(), frontend_in_graph=in_graph, precision="fp32",
                              input_name="audio" if in_graph else "log_mel", input_shape=shape)
    return replace(manifest, **changes)


@pytest.fixture
def external_bundle(tmp_path: Path) -> Path:
    nodes, inits = _cnn_nodes("log_mel")
    _save(nodes, inits, [helper.make_tensor_value_info("log_mel", TensorProto.FLOAT,
                                                       ["batch", 1, FEATURES.n_mels, FRAMES])], tmp_path / "model.onnx")
    (tmp_path / MANIFEST_NAME).write_text(_manifest(False).to_json())
    return tmp_path


@pytest.fixture
def in_graph_bundle(tmp_path: Path) -> Path:
    """A 'front end' (frame the PCM into a 1 x F x T map, square it) named like the exporter names it."""
    usable = FEATURES.n_mels * FRAMES
    front = [
        helper.make_node("Slice", ["audio", "starts", "ends", "axes"], ["frontend.cut"], name="frontend.slice"),
        helper.make_node("Reshape", ["frontend.cut", "frontend.shape"], ["frontend.map"], name="frontend.reshape"),
        helper.make_node("Mul", ["frontend.map", "frontend.map"], ["log_mel"], name="frontend.square"),
    ]
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
             [("starts", [0]), ("ends", [usable]), ("axes", [1]), ("frontend.shape", [-1, 1, FEATURES.n_mels, FRAMES])]]
    nodes, cnn_inits = _cnn_nodes("log_mel")
    _save(front + nodes, inits + cnn_inits, [helper.make_tensor_value_info("audio", TensorProto.FLOAT,
                                                                           ["batch", CLIP])], tmp_path / "model.onnx")
    (tmp_path / MANIFEST_NAME).write_text(_manifest(True).to_json())
    return tmp_path


def test_external_bundle_timings_and_real_time_factor(external_bundle: Path) -> None:
    bench = bench_bundle(external_bundle, threads=(1, 2), repeats=3, load_repeats=2)
    assert [r.threads for r in bench.results] == [1, 2]
    assert bench.clip_seconds == pytest.approx(1.0) and not bench.frontend_in_graph
    for r in bench.results:
        assert r.end_to_end.runs == 3 and r.end_to_end.median_ms > 0 and r.end_to_end.p90_ms >= r.end_to_end.median_ms
        assert r.frontend is not None and r.model is not None and r.frontend.median_ms > 0 and r.model.median_ms > 0
        assert r.clip_seconds == pytest.approx(1.0) and 0 < r.real_time_factor and 0 < r.frontend_share < 1
    assert [load.file for load in bench.loads] == ["model.onnx"]
    assert bench.loads[0].size_bytes == (external_bundle / "model.onnx").stat().st_size
    assert bench.loads[0].load.runs == 2 and bench.loads[0].load.median_ms > 0
    text = format_bench(bench)
    assert "RTF" in text and "external" in text and "load model.onnx" in text and len(text.splitlines()) == 7
    assert f"cpu: {cpu_line()}" in text
    assert f"threads for this machine: {bench.recommended_threads} " in text


def test_real_time_factor_and_front_end_share_of_fixed_timings() -> None:
    result = ThreadResult(threads=1, end_to_end=_ms(25.0), model=_ms(15.0), frontend=_ms(5.0), clip_seconds=10.0)
    assert result.real_time_factor == pytest.approx(0.0025)  # 25 ms for 10 s of audio
    assert result.frontend_share == pytest.approx(0.25)  # 5 of the 5 + 15 ms measured alone
    assert replace(result, model=None).frontend_share is None
    two = replace(result, threads=2, end_to_end=_ms(12.0))  # twice as fast on 2 threads: worth the core
    bench = BundleBench(Path("b"), "int8", False, 10.0, (result, two), ())
    assert bench.recommended_threads == 2 and replace(bench, results=(result,)).recommended_threads == 1


def test_in_graph_bundle_is_cut_at_the_front_end(in_graph_bundle: Path) -> None:
    model = onnx.load(str(in_graph_bundle / "model.onnx"))
    parts = split_frontend(model)
    assert parts is not None
    front, cnn, boundary = parts
    assert boundary == "log_mel"
    assert {n.name for n in front.graph.node} == {"frontend.slice", "frontend.reshape", "frontend.square"}
    assert [n.op_type for n in cnn.graph.node] == ["ReduceMean", "MatMul"]
    bench = bench_bundle(in_graph_bundle, threads=(1,), repeats=3, load_repeats=1)
    (r,) = bench.results
    assert r.frontend is not None and r.model is not None and r.frontend_share is not None
    assert 0 < r.frontend_share < 1
    assert "in the graph" in format_bench(bench)


def test_in_graph_bundle_without_named_front_end_still_times_end_to_end(in_graph_bundle: Path) -> None:
    model = onnx.load(str(in_graph_bundle / "model.onnx"))
    for node in model.graph.node:
        node.name = node.name.removeprefix(FRONTEND_PREFIX)
    onnx.save(model, str(in_graph_bundle / "model.onnx"))
    assert split_frontend(model) is None
    (r,) = bench_bundle(in_graph_bundle, threads=(1,), repeats=2, load_repeats=1).results
    assert r.frontend is None and r.model is None and r.frontend_share is None and r.end_to_end.median_ms > 0
    assert "n/a" in format_bench(bench_bundle(in_graph_bundle, threads=(1,), repeats=1, load_repeats=1))


def test_ort_format_file_load_is_timed(external_bundle: Path) -> None:
    from asc.export.onnx import convert_to_ort

    files = convert_to_ort(external_bundle / "model.onnx", external_bundle)
    manifest = json.loads((external_bundle / MANIFEST_NAME).read_text())
    manifest["ort_file"] = files.model.name
    (external_bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
    bench = bench_bundle(external_bundle, threads=(1,), repeats=1, load_repeats=2)
    assert [load.file for load in bench.loads] == ["model.onnx", "model.ort"]
    assert all(load.load.median_ms > 0 for load in bench.loads)


def _ms(median: float) -> Timing:
    return Timing(median, median, 20)


@pytest.mark.parametrize(("medians", "chosen"), [
    ({1: 10.0, 2: 9.0}, 1),  # 10 % faster: not worth a core
    ({1: 10.0, 2: 10.0 * (1 - THREAD_GAIN)}, 2),  # exactly the gain
    ({1: 10.0, 2: 6.0, 4: 5.5}, 2),  # 4 threads are only 8 % faster than 2
    ({1: 10.0, 2: 12.0, 4: 7.0}, 4),  # measured against the count chosen so far, not the next one
    ({2: 5.0}, 2),
])
def test_thread_policy_takes_more_threads_only_for_a_real_gain(medians: dict[int, float], chosen: int) -> None:
    assert recommend_intra_op_threads({count: _ms(ms) for count, ms in medians.items()}) == chosen
    with pytest.raises(ConfigError, match="no timings"):
        recommend_intra_op_threads({})


@pytest.mark.parametrize("kind", ["external_bundle", "in_graph_bundle"])
def test_bundles_shipping_only_their_xz_container_are_timed(kind: str, request: pytest.FixtureRequest) -> None:
    from asc.export.onnx import pack_onnx

    bundle: Path = request.getfixturevalue(kind)
    pack_onnx(bundle / "model.onnx")
    (bundle / "model.onnx").unlink()
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    (bundle / MANIFEST_NAME).write_text(json.dumps({**manifest, "container_file": "model.onnx.xz"}))
    bench = bench_bundle(bundle, threads=(1,), repeats=2, load_repeats=1)
    assert [load.file for load in bench.loads] == ["model.onnx.xz"]
    (r,) = bench.results
    assert r.end_to_end.median_ms > 0 and r.model is not None and r.frontend_share is not None  # cut as before


def test_cpu_line_names_the_model_and_int8_flags(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu sse avx2 avx512f avx512bw "
                   "avx512_vnni sha_ni\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 9B14\n")
    assert cpu_line(x86) == "AMD EPYC 9B14; int8 flags: avx2 avx512f avx512bw avx512_vnni"
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd asimddp i8mm\n")
    assert cpu_line(arm) == "unknown CPU; int8 flags: asimddp i8mm"
    assert cpu_line(tmp_path / "missing") == "unknown CPU; int8 flags: none"


def test_timing_statistics() -> None:
    timing = Timing.of([0.001, 0.002, 0.003, 0.004, 0.010])
    assert timing.median_ms == pytest.approx(3.0)
    assert timing.p90_ms == pytest.approx(7.6)
    assert timing.p10_ms == pytest.approx(1.4)
    assert timing.runs == 5


def test_bad_arguments(external_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="thread counts"):
        bench_bundle(external_bundle, threads=(0,))
    with pytest.raises(ConfigError, match="repeats"):
        bench_bundle(external_bundle, repeats=0)
    with pytest.raises(AscError, match="no bundle manifest"):
        bench_bundle(tmp_path / "missing")


@pytest.mark.slow
def test_exporter_composed_bundle_splits_at_the_log_mel(tmp_path: Path) -> None:
    """The naming convention split_frontend relies on holds for the exporter's own front end."""
    from asc.export.onnx import FEATURE_INPUT, compose_frontend, export_frontend

    nodes, inits = _cnn_nodes(FEATURE_INPUT)
    _save(nodes, inits, [helper.make_tensor_value_info(FEATURE_INPUT, TensorProto.FLOAT,
                                                       ["batch", 1, FEATURES.n_mels, FRAMES])], tmp_path / "cnn.onnx")
    frontend = export_frontend(FEATURES, CLIP, tmp_path / "frontend.onnx")
    cnn = onnx.load(str(tmp_path / "cnn.onnx"))
    cnn.ir_version = onnx.load(str(frontend)).ir_version  # compose needs equal IR and opset versions
    onnx.save(cnn, str(tmp_path / "cnn.onnx"))
    compose_frontend(frontend, tmp_path / "cnn.onnx", tmp_path / "model.onnx")
    (tmp_path / MANIFEST_NAME).write_text(_manifest(True).to_json())
    parts = split_frontend(onnx.load(str(tmp_path / "model.onnx")))
    assert parts is not None and parts[2] == FEATURE_INPUT
    (r,) = bench_bundle(tmp_path, threads=(1,), repeats=3, load_repeats=1).results
    assert r.frontend is not None and r.model is not None and 0 < r.frontend_share < 1


def test_bench_runs_without_torch(without_torch) -> None:
    """Deployment machines have onnxruntime but not torch."""
    result = without_torch("import asc.bench\nassert not BLOCKED, BLOCKED\n")
    assert result.returncode == 0, result.stderr
