"""Mixed-precision planning: exact rewrites, node groups, plans that really keep nodes float."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from asc.bench import Timing
from asc.errors import ConfigError
from asc.export import precision
from asc.export.onnx import (
    INT16_PAIR_LIMIT,
    Int8Options,
    int8_operands,
    int8_pair_peak,
    nodes_inside,
    ort_session,
    run_onnx,
    save_onnx,
    torch_to_onnx,
)
from asc.export.precision import (
    DEFAULT_FLOAT_GROUPS,
    GROUPS,
    NAIVE_PLAN,
    PlanMeasurement,
    PlanReport,
    PrecisionPlan,
    _next_step,
    node_groups,
    plan_precision,
    quantize_planned,
    rewrite_for_int8,
    share_concat_ranges,
)
from asc.export.search import keep_float, quantized_activations, quantized_weights
from asc.export.verify import Agreement, fusion_census
from asc.models import FreqNorm, build_model
from asc.onnx_graph import graph_constants, node_attribute

N_MELS, FRAMES = 32, 41  # odd frame count: the stem's space-to-depth needs an extra padding column
N_BLOCKS, N_NORMS = 9, 5  # BC-ResNet-Mod: 2+2+2+3 blocks, the input norm plus one per stage


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("bcresnet_mod", 10, width=8, freq_norm="resnorm")
    model.train()
    with torch.no_grad():  # non-trivial BN statistics, so folding them is really tested
        for _ in range(3):
            model(torch.randn(8, 1, N_MELS, FRAMES) * 2 + 1)
    return model.eval()


@pytest.fixture(scope="module")
def dynamo_exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The width-8 model exported as the exporter does (~15 s), plus its frequency-norm node names."""
    proto = torch_to_onnx(_model(), torch.zeros(2, 1, N_MELS, FRAMES), input_name="log_mel")
    norm_nodes = nodes_inside(proto, FreqNorm)
    return save_onnx(proto, tmp_path_factory.mktemp("precision") / "fp32.onnx"), norm_nodes


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model through the TorchScript exporter: under a second, and a harder graph for the
    rewrites (Shape/Gather-computed reshapes, weights shared through Identity nodes)."""
    path = tmp_path_factory.mktemp("precision-legacy") / "fp32.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_model(), (torch.zeros(1, 1, N_MELS, FRAMES),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "b"}})
    return path


def _inputs(n: int, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, 1, N_MELS, FRAMES)) * 2 + 1).astype(np.float32)


def _run(path_or_model: Path | onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    if isinstance(path_or_model, onnx.ModelProto):
        import onnxruntime as ort

        session = ort.InferenceSession(path_or_model.SerializeToString(), providers=["CPUExecutionProvider"])
    else:
        session = ort_session(path_or_model)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _check_rewrites_are_exact(path: Path) -> None:
    original = onnx.load(str(path))
    rewritten, report = rewrite_for_int8(original)
    assert report.applied == {"subspectral_bands": N_BLOCKS, "stem_space_to_depth": 1, "freq_mean_conv": N_BLOCKS,
                              "norm_affine_on_input": N_NORMS}
    onnx.checker.check_model(rewritten, full_check=True)
    ops, before = Counter(n.op_type for n in rewritten.graph.node), Counter(n.op_type for n in original.graph.node)
    assert ops["BatchNormalization"] == 0  # every sub-spectral norm folded into band convs
    assert ops["SpaceToDepth"] == 1
    assert sum(n.op_type == "Concat" and ".asc_band" in n.name for n in rewritten.graph.node) == N_BLOCKS
    assert ops["Conv"] == before["Conv"] + N_BLOCKS * 3 + N_BLOCKS  # 4 band convs replace 1, + one mean conv each
    assert ops["ReduceMean"] == before["ReduceMean"] - N_BLOCKS
    x = _inputs(4)
    expected, got = _run(path, x), _run(rewritten, x)
    assert np.abs(got - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())


def test_rewrites_are_exact(exported: Path) -> None:
    _check_rewrites_are_exact(exported)


@pytest.mark.slow
def test_rewrites_are_exact_on_the_exporters_graph(dynamo_exported: tuple[Path, list[str]]) -> None:
    _check_rewrites_are_exact(dynamo_exported[0])


def test_rewrites_can_be_chosen_one_by_one(exported: Path) -> None:
    original = onnx.load(str(exported))
    for name, op in [("stem_space_to_depth", "SpaceToDepth"), ("subspectral_bands", "Concat")]:
        rewritten, report = rewrite_for_int8(original, [name])
        assert set(report.applied) == {name}
        assert Counter(n.op_type for n in rewritten.graph.node)[op] >= 1
    untouched, report = rewrite_for_int8(original, ())
    assert report.applied == {}
    assert len(untouched.graph.node) == len(original.graph.node)
    with pytest.raises(ConfigError, match="unknown int8 rewrites"):
        rewrite_for_int8(original, ["fold_everything"])


def test_node_groups_partition_the_graph(exported: Path) -> None:
    rewritten, _ = rewrite_for_int8(onnx.load(str(exported)))
    groups = node_groups(rewritten)
    names = [n.name for n in rewritten.graph.node]
    assert sorted(name for members in groups.values() for name in members) == sorted(names)
    convs = {n.name for n in rewritten.graph.node if n.op_type == "Conv"}
    assert len([n for n in groups["band_conv"] if n in convs]) == N_BLOCKS * 4
    assert len(groups["freq_mean"]) == N_BLOCKS
    assert len(groups["stem"]) == 1
    assert len(groups["norm_output"]) == 2 * (N_NORMS - 1)  # the input norm is in the prefix
    assert all(n.op_type not in ("Conv",) for n in rewritten.graph.node if n.name in groups["prefix"])
    assert len(groups["pointwise"]) == 4 + N_BLOCKS + 1  # transitions, block pointwise convs, classifier


def _consumer_ops(model: onnx.ModelProto, node_name: str) -> set[str]:
    node = next(n for n in model.graph.node if n.name == node_name)
    return {n.op_type for n in model.graph.node if node.output[0] in n.input}


def test_plan_keeps_its_groups_float(exported: Path, tmp_path: Path) -> None:
    path = exported
    calibration = [_inputs(4, seed=s) for s in range(2)]
    default = quantize_planned(path, tmp_path / "default.onnx", calibration)
    moved = quantize_planned(path, tmp_path / "moved.onnx", calibration, PrecisionPlan().toggled("norm_output"))
    default_model, moved_model = onnx.load(str(default)), onnx.load(str(moved))
    prefix = set(node_groups(rewrite_for_int8(onnx.load(str(path)))[0])["prefix"])
    output_muls = [n.name for n in default_model.graph.node if n.name.endswith(".asc_norm_output_mul")]
    assert len(output_muls) == N_NORMS and len(prefix.intersection(output_muls)) == 1  # the input norm's
    for name in output_muls:
        assert "QuantizeLinear" not in _consumer_ops(default_model, name)  # float: feeds the float add
        quantized = "QuantizeLinear" in _consumer_ops(moved_model, name)
        assert quantized == (name not in prefix)  # moved to int8, except the input norm (prefix stays float)
    census = fusion_census(default)
    assert census.float_convs == 0
    rewritten = rewrite_for_int8(onnx.load(str(path)))[0]
    assert census.qlinear_convs == sum(n.op_type == "Conv" for n in rewritten.graph.node)
    x = _inputs(8, seed=5)
    reference = _run(path, x)
    assert np.abs(_run(default, x) - reference).max() < 0.25 * np.abs(reference).max()


def test_int8_files_compute_the_same_on_every_x86_cpu(exported: Path, tmp_path: Path) -> None:
    """The verdict must not depend on the CPU running it (VNNI Xeon here, AVX2-only EPYC elsewhere).

    Checked two CPU-independent ways: the weights leave every u8*s8 pair sum inside int16, which
    is what non-VNNI kernels saturate (docs/export-latency.md §10); and onnxruntime's integer
    kernels compute what the Q/DQ graph means, i.e. the same graph run with float ops. With
    8-bit weights, emulated AVX2 missed that reference by 0.47 of the logit scale, AMX by 0.0007.
    """
    calibration = [_inputs(4, seed=s) for s in range(2)]
    path = quantize_planned(exported, tmp_path / "int8.onnx", calibration)
    model = onnx.load(str(path))
    assert int8_pair_peak(model) == 255 * 128 <= INT16_PAIR_LIMIT  # weights in [-64, 64], the 64 reached
    assert int8_operands(path) == {"format": "QDQ", "activations": "uint8 per-tensor",
                                   "weights": "int8 per-channel symmetric", "weight_range": [-64, 64],
                                   "weight_bits": 7, "int16_pair_peak": 32640, "int16_safe": True}
    x = _inputs(64, seed=11)
    integer, meaning = run_onnx(path, x), run_onnx(path, x, fused=False)
    scale = float(np.abs(meaning).max())
    # measured 0 on AMX and emulated AVX2; decisions may differ only where the top two logits are
    # within 0.02 * scale, so their equality is not asserted: a near-tie would make it the CPU's call
    assert scale > 0.5 and np.abs(integer - meaning).max() < 0.01 * scale

    eight = quantize_planned(exported, tmp_path / "int8_w8.onnx", calibration, PrecisionPlan(weight_bits=8))
    record = int8_operands(eight)
    assert record is not None and record["weight_range"] == [-127, 127] and record["weight_bits"] == 8
    assert record["int16_pair_peak"] == int8_pair_peak(onnx.load(str(eight))) == 255 * 254 > INT16_PAIR_LIMIT
    assert not record["int16_safe"]
    with pytest.raises(ConfigError, match="weight_bits"):
        Int8Options(weight_bits=6)  # type: ignore[arg-type]


@pytest.mark.slow
def test_exporter_float_nodes_survive_the_rewrites(dynamo_exported: tuple[Path, list[str]], tmp_path: Path) -> None:
    path, norm_nodes = dynamo_exported
    rewritten, report = rewrite_for_int8(onnx.load(str(path)))
    translated = report.translate(norm_nodes, rewritten.graph)
    names = {n.name for n in rewritten.graph.node}
    assert translated and set(translated) <= names
    assert {n for n in names if ".asc_norm_output" in n} <= set(translated)  # the rewritten output ops
    out = quantize_planned(path, tmp_path / "int8.onnx", [_inputs(2)], PrecisionPlan(float_groups=()),
                           float_nodes=norm_nodes)
    quantized = onnx.load(str(out))
    first_mul = next(n.name for n in quantized.graph.node if n.name.endswith(".asc_norm_output_mul"))
    assert "QuantizeLinear" not in _consumer_ops(quantized, first_mul)


def test_band_concats_share_one_range(exported: Path, tmp_path: Path) -> None:
    out = quantize_planned(exported, tmp_path / "int8.onnx", [_inputs(4)])
    model = onnx.load(str(out))
    producer = {o: n for n in model.graph.node for o in n.output}
    concats = [n for n in model.graph.node if n.op_type == "Concat" and ".asc_band" in n.name]
    assert len(concats) == N_BLOCKS
    for concat in concats:
        scales = {producer[name].input[1] for name in concat.input}
        assert len(scales) == 1  # every band's DequantizeLinear uses the shared scale
    assert share_concat_ranges(model) == N_BLOCKS  # idempotent: already shared, shared again identically
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    scale = next(iter({producer[name].input[1] for name in concats[0].input}))
    assert constants[scale].dtype == np.float32 and float(constants[scale]) > 0


def test_plan_validation_and_round_trip() -> None:
    plan = PrecisionPlan(float_groups=("prefix", "depthwise"), calibration="minmax", weight_bits=8)
    assert PrecisionPlan.from_dict(plan.to_dict()) == plan
    stored_before_weight_bits = {k: v for k, v in plan.to_dict().items() if k != "weight_bits"}
    assert PrecisionPlan.from_dict(stored_before_weight_bits).weight_bits == 7 == PrecisionPlan().weight_bits
    assert "8-bit weights" in plan.describe() and plan.int8_options().weight_bits == 8
    assert set(plan.toggled("depthwise").float_groups) == {"prefix"}
    assert set(PrecisionPlan().toggled("stem").float_groups) == {*DEFAULT_FLOAT_GROUPS, "stem"}
    assert set(GROUPS) >= set(DEFAULT_FLOAT_GROUPS)
    with pytest.raises(ConfigError, match="unknown precision groups"):
        PrecisionPlan(float_groups=("norms",))
    assert PrecisionPlan(calibration="entropy").int8_options().calibration == "entropy"
    with pytest.raises(ConfigError, match="calibration must be one of minmax, percentile, entropy"):
        PrecisionPlan(calibration="kl")  # type: ignore[arg-type]
    assert NAIVE_PLAN.rewrites == () and NAIVE_PLAN.float_groups == ()


@pytest.mark.slow
def test_plan_precision_measures_and_chooses(exported: Path, tmp_path: Path) -> None:
    path = exported
    report = plan_precision(path, [_inputs(4, seed=s) for s in range(2)], _inputs(12, seed=9), rounds=1,
                            repeats=3, min_agreement=0.5, work_dir=tmp_path)
    names = [c.name for c in report.candidates]
    assert names[:3] == ["fp32", "naive", "start"]
    assert len(names) > 3 and all(n.startswith("r1 ") for n in names[3:])
    for candidate in report.candidates:
        assert candidate.latency_ms > 0 and candidate.fp32_ms > 0
        assert candidate.ratio == pytest.approx(candidate.latency_ms / candidate.fp32_ms)
        if candidate.plan is not None:
            assert candidate.agreement is not None and candidate.agreement.clips == 12
            assert 0.0 <= candidate.agreement.top1_agreement <= 1.0
    text = report.format()
    assert "fp32" in text and "naive" in text
    with pytest.raises(ConfigError, match="min_agreement"):
        plan_precision(path, [_inputs(1)], _inputs(1), min_agreement=1.5)


def test_plan_precision_ships_the_fastest_plan_and_fp32_when_none_beats_it(exported: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The choice, with the timings fixed (the graphs still run, and the bar is 0, so the CPU's
    speed and int8 rounding cannot move the verdict)."""
    def timed(medians: dict[str, float]):
        def interleaved(calls, repeats):
            for call in calls.values():
                call()
            return {name: Timing(medians.get(name, medians["other"]), 0.0, repeats) for name in calls}
        return interleaved

    def choose() -> PlanReport:
        return plan_precision(exported, [_inputs(4, seed=s) for s in range(2)], _inputs(4, seed=9), rounds=1,
                              repeats=1, min_agreement=0.0, work_dir=tmp_path)

    monkeypatch.setattr(precision, "interleaved", timed({"fp32": 10.0, "naive": 9.0, "start": 6.0, "other": 8.0}))
    report = choose()  # no move is 3 % faster than the start, so the start is the fastest plan
    assert report.int8_wins and report.chosen.name == "start" and report.chosen.ratio == pytest.approx(0.6)
    monkeypatch.setattr(precision, "interleaved", timed({"fp32": 5.0, "other": 6.0}))
    report = choose()
    assert not report.int8_wins and report.chosen.name == "fp32" and report.chosen.plan is None


def _measured(name: str, ratio: float, agreement: float | None) -> PlanMeasurement:
    agree = None if agreement is None else Agreement("fp32", name, 100, agreement, 0.1, 0.05, 3.0)
    return PlanMeasurement(name, PrecisionPlan() if agreement is not None else None, ratio, 1.0, agree)


def test_search_steps_follow_speed_then_agreement() -> None:
    fast_ok, slow_ok = _measured("fast", 0.5, 0.995), _measured("slow", 0.9, 0.999)
    fast_bad, closer = _measured("fast bad", 0.4, 0.90), _measured("closer", 0.6, 0.97)
    assert _next_step(_measured("now", 0.8, 0.995), [fast_ok, slow_ok, fast_bad], 0.99, 0.03) is fast_ok
    assert _next_step(_measured("now", 0.51, 0.995), [fast_ok], 0.99, 0.03) is None  # gain below 3 %
    assert _next_step(_measured("now", 0.3, 0.95), [slow_ok, fast_bad], 0.99, 0.03) is slow_ok  # reach the bar
    assert _next_step(_measured("now", 0.3, 0.95), [fast_bad, closer], 0.99, 0.03) is closer  # climb toward it
    assert _next_step(_measured("now", 0.3, 0.98), [fast_bad, closer], 0.99, 0.03) is None  # no move helps


# ------------------------------------------------------------------------------------ QAT graphs


@pytest.fixture(scope="module")
def qat_exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The width-8 model through the project's QAT path (PT2E, ranges observed with BN frozen), as
    ``asc export`` writes it: int8 QDQ with the trained scales (~35 s)."""
    from asc.compress.quant import Int8QAT
    from asc.export.onnx import export_onnx

    hook = Int8QAT((1, N_MELS, FRAMES))
    qat = hook.wrap_model(_model())
    qat.train()
    qat.freeze(bn=True, observers=False)  # observe ranges without moving BN statistics
    with torch.no_grad():
        for seed in range(4):
            qat(torch.from_numpy(_inputs(8, seed=10 + seed)))
    qat.eval()
    return export_onnx(hook.finalize(qat), torch.zeros(2, 1, N_MELS, FRAMES),
                       tmp_path_factory.mktemp("qat") / "qat.onnx", input_name="log_mel")


def _trained_quantizers(model: onnx.ModelProto) -> Counter[tuple[float, int]]:
    """(scale, zero point) of every activation QuantizeLinear: what QAT trained."""
    values = graph_constants(model.graph)
    return Counter((float(values[n.input[1]]), int(values[n.input[2]]))
                   for n in model.graph.node if n.op_type == "QuantizeLinear")


def _with_outputs(model: onnx.ModelProto, outputs: dict[str, int], path: Path) -> Path:
    """``model`` with intermediate tensors (name -> ONNX element type) as extra graph outputs, saved."""
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(name, kind, None) for name, kind in outputs.items())
    onnx.save_model(probe, str(path))
    return path


def _stem_codes(model: onnx.ModelProto, x: np.ndarray, path: Path, *, fused: bool) -> np.ndarray:
    """The uint8 codes of the stem's (first conv's) output quantizer, past its ReLU."""
    readers = {i: n for n in model.graph.node for i in n.input}
    quantizer = readers[next(n for n in model.graph.node if n.op_type == "Conv").output[0]]
    while quantizer.op_type != "QuantizeLinear":
        quantizer = readers[quantizer.output[0]]
    session = ort_session(_with_outputs(model, {quantizer.output[0]: onnx.TensorProto.UINT8}, path), fused=fused)
    return session.run([quantizer.output[0]], {session.get_inputs()[0].name: x})[0]


@pytest.mark.slow
def test_rewrites_keep_a_qat_graph_exact(qat_exported: Path, tmp_path: Path) -> None:
    """Issue 13 item 1: every int8-friendly rewrite runs on a PT2E QAT graph (int8 QDQ with its
    trained scales) and keeps it int8 between the trained quantizers, with its logits unchanged."""
    original = onnx.load(str(qat_exported))
    rewritten, report = rewrite_for_int8(original)
    assert report.applied == {"subspectral_bands": N_BLOCKS, "stem_space_to_depth": 1, "freq_mean_conv": N_BLOCKS,
                              "norm_affine_on_input": N_NORMS}
    onnx.checker.check_model(rewritten, full_check=True)
    ops = Counter(n.op_type for n in rewritten.graph.node)
    assert ops["BatchNormalization"] == 0 and ops["SpaceToDepth"] == 1 and ops["ReduceMean"] == 4 * N_NORMS + 1
    # no new activation scale and none dropped: the band convs write the norm output's trained quantizer
    assert set(_trained_quantizers(rewritten)) == set(_trained_quantizers(original))
    path = save_onnx(rewritten, tmp_path / "rewritten.onnx")
    census = fusion_census(path)
    assert census.float_convs == 0 and census.qlinear_convs == sum(n.op_type == "Conv" for n in rewritten.graph.node)
    # each depthwise conv becomes one conv over the bands stacked on channels, and a mean conv is added
    assert census.qlinear_convs == fusion_census(qat_exported).convs + N_BLOCKS
    assert census.op_counts.get("QLinearConcat") == census.op_counts.get("Split") == N_BLOCKS

    # the stem reads the SpaceToDepth of the dequantized input, quantized again with the input
    # quantizer's trained scale; its weight is the same int8 codes, moved, with the same scales
    values, producer = graph_constants(rewritten.graph), {o: n for n in rewritten.graph.node for o in n.output}
    before = {o: n for n in original.graph.node for o in n.output}
    stem, old_stem = (next(n for n in g.node if n.op_type == "Conv") for g in (rewritten.graph, original.graph))
    weight, old_weight = producer[stem.input[1]], before[old_stem.input[1]]
    assert weight.op_type == old_weight.op_type == "DequantizeLinear"
    codes, old_codes = values[weight.input[0]], graph_constants(original.graph)[old_weight.input[0]]
    assert codes.dtype == np.int8 and codes.shape == (old_codes.shape[0], 4, 3, 3)
    assert weight.input[1:] == old_weight.input[1:]  # per-channel scales and zero points unchanged
    assert sorted(codes.ravel().tolist()) == sorted(old_codes.ravel().tolist() + [0] * (codes.size - old_codes.size))
    requantize = producer[producer[stem.input[0]].input[0]]  # the same grid again after the float SpaceToDepth
    s2d = producer[requantize.input[0]]
    assert requantize.op_type == "QuantizeLinear" and s2d.op_type == "SpaceToDepth"
    assert requantize.input[1:] == producer[stem.input[0]].input[1:] == before[old_stem.input[0]].input[1:]
    assert producer[s2d.input[0]].op_type == "Pad" and producer[s2d.input[0]].input[0] == old_stem.input[0]

    # Integer kernels: the same u8*s8 products summed in int32 (7-bit weights: no int16 saturation on
    # any x86 class) and requantized with the same per-channel scales, so the stem's codes are equal.
    # As Q/DQ float ops the conv sums 36 instead of 25 products in another order: a sum within an
    # ulp of a rounding boundary may move one code by one step.
    x = _inputs(16)
    stem_alone = rewrite_for_int8(original, ["stem_space_to_depth"])[0]
    assert (_stem_codes(stem_alone, x, tmp_path / "a.onnx", fused=True)
            == _stem_codes(original, x, tmp_path / "b.onnx", fused=True)).all()
    moved = (_stem_codes(stem_alone, x, tmp_path / "a.onnx", fused=False).astype(int)
             - _stem_codes(original, x, tmp_path / "b.onnx", fused=False))
    assert np.abs(moved).max() <= 1 and np.mean(moved != 0) < 1e-3  # measured: 0 of 86016 (1 in 4x as many)
    stem_path = save_onnx(stem_alone, tmp_path / "stem.onnx")
    assert np.array_equal(run_onnx(stem_path, x), run_onnx(qat_exported, x))

    for fused in (True, False):
        expected, got = run_onnx(qat_exported, x, fused=fused), run_onnx(path, x, fused=fused)
        per_clip, scale = np.abs(got - expected).max(axis=1), np.abs(expected).max()
        # identical here (0.0 both ways; over 64 clips one clip moved by 0.003 of 1.05): float ops that
        # round one ulp differently (the band convs' folded affine, the mean as a sum) may move a
        # value across a uint8 step in a few clips, never in most
        assert np.median(per_clip) <= 1e-5 * scale and per_clip.max() <= 0.05 * scale


@pytest.mark.slow
def test_qat_band_and_mean_convs_compute_the_trained_norm_and_mean(qat_exported: Path, tmp_path: Path) -> None:
    """A QAT graph has no quantizer between a depthwise conv and its sub-spectral norm, so the pair
    becomes one int8 conv over the bands stacked on channels, band-major: per band the conv's codes
    (sign flipped where the band scale is negative), the weight scale times |band scale|, and a band
    bias on its int32 grid (QAT snapped the norm's shift).
    The mean over frequency reads that norm's quantized output, as in the trained graph, through
    int8 weights that dequantize to exactly 1/F. Both give the original graph's codes."""
    original = onnx.load(str(qat_exported))
    rewritten, _ = rewrite_for_int8(original)
    values, producer = graph_constants(rewritten.graph), {o: n for n in rewritten.graph.node for o in n.output}
    old_values = graph_constants(original.graph)
    old_producer = {o: n for n in original.graph.node for o in n.output}
    norms = [n for n in original.graph.node if n.op_type == "BatchNormalization"]
    assert len(norms) == N_BLOCKS
    bands = [n for n in rewritten.graph.node if n.op_type == "Conv" and n.name.endswith(".asc_bands_conv")]
    assert len(bands) == N_BLOCKS
    for conv in bands:
        weight, source = producer[conv.input[1]], producer[conv.input[0]]
        w_codes, w_scale, bias = values[weight.input[0]], values[weight.input[1]], values[conv.input[2]]
        step = np.float32(values[source.input[1]]) * w_scale  # what onnxruntime divides the bias by
        assert w_codes.dtype == np.int8 and np.abs(w_codes).max() <= 64
        assert np.abs(bias / step - np.rint(bias / step)).max() < 1e-3  # snapped: no rounding left to the kernel
    for bn in norms:  # each norm's band convs: the conv's codes and scales times the band's affine
        conv = old_producer[old_producer[bn.input[0]].input[0]]
        old_weight = old_producer[conv.input[1]]
        codes, scales = old_values[old_weight.input[0]], old_values[old_weight.input[1]].astype(np.float64)
        gamma, var = (old_values[bn.input[i]].astype(np.float64) for i in (1, 4))
        band_scale = (gamma / np.sqrt(var + node_attribute(bn, "epsilon", 1e-5))).reshape(codes.shape[0], 4)
        band_conv = next(n for n in bands if n.name == (bn.name or bn.output[0]) + ".asc_bands_conv")
        assert node_attribute(band_conv, "group") == 4 * codes.shape[0]
        weight = producer[band_conv.input[1]]
        stacked_codes = np.split(values[weight.input[0]], 4)
        stacked_scales = np.split(values[weight.input[1]], 4)
        for band in range(4):
            sign = np.sign(band_scale[:, band]).reshape(-1, 1, 1, 1)
            assert np.array_equal(stacked_codes[band], (codes * sign).astype(np.int8))
            np.testing.assert_allclose(stacked_scales[band], scales * np.abs(band_scale[:, band]), rtol=1e-6)

    means = [n for n in rewritten.graph.node if n.name.endswith(".asc_fmean_conv")]
    assert len(means) == N_BLOCKS
    probes: dict[str, int] = {}
    for conv in means:
        weight, source = producer[conv.input[1]], producer[conv.input[0]]
        codes, w_scale = values[weight.input[0]], values[weight.input[1]]
        freq = codes.shape[2]
        assert codes.dtype == np.int8 and (codes == 64).all() and (w_scale * 64 == np.float32(1 / freq)).all()
        assert source.op_type == "DequantizeLinear" and producer[source.input[0]].op_type == "QuantizeLinear"
        out = next(n for n in rewritten.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == conv.output[0])
        probes[out.output[0]] = onnx.TensorProto.UINT8
    # every norm output's and mean output's codes, Q/DQ float simulation against the original graph
    norm_codes = {n.output[0] for n in rewritten.graph.node if n.op_type == "QuantizeLinear"
                  and producer[n.input[0]].op_type == "Concat"}
    assert len(norm_codes) == N_BLOCKS
    probes |= dict.fromkeys(norm_codes, onnx.TensorProto.UINT8)
    assert all(name in {o for n in original.graph.node for o in n.output} for name in probes)
    x = _inputs(16)
    got = {}
    for name, model in (("original", original), ("rewritten", rewritten)):
        session = ort_session(_with_outputs(model, probes, tmp_path / f"{name}.onnx"), fused=False)
        got[name] = session.run(list(probes), {session.get_inputs()[0].name: x})
    for before_codes, after_codes in zip(got["original"], got["rewritten"], strict=True):
        moved = np.abs(after_codes.astype(int) - before_codes)
        assert moved.max() <= 1 and np.mean(moved > 0) < 1e-3  # measured: 0 of 162,752 codes, fused alike


# ------------------------------------------------------------------------ accuracy-aware search


def test_keeping_every_tensor_float_gives_back_the_float_model(exported: Path, tmp_path: Path) -> None:
    """``keep_float`` undoes exactly the quantization of what it is given: with every activation
    and weight float, the Q/DQ simulation is the fp32 graph up to the int32 biases' rounding.
    Float arithmetic only (``fused=False``), so the numbers do not depend on the CPU's int8 kernels;
    the ReLUs that the quantizer folded into zero-point clamps must come back for this to hold."""
    int8 = quantize_planned(exported, tmp_path / "int8.onnx", [_inputs(4, seed=s) for s in range(2)])
    model = onnx.load(str(int8))
    values = graph_constants(rewrite_for_int8(onnx.load(str(exported)))[0].graph)
    activations, weights = quantized_activations(model), quantized_weights(model, values)
    assert len(activations) > 50 and len(weights) == fusion_census(int8).quantized_convs
    everything = keep_float(model, [*activations, *weights], values)
    ops = Counter(n.op_type for n in everything.graph.node)
    assert ops["QuantizeLinear"] == 0 and ops["Relu"] > 0  # only the int32 bias DequantizeLinears are left
    x = _inputs(8, seed=5)
    reference = _run(exported, x)
    path = tmp_path / "float.onnx"
    onnx.save_model(everything, str(path))
    scale = np.abs(reference).max()
    assert np.abs(run_onnx(path, x, fused=False) - reference).max() < 1e-3 * scale
    assert np.abs(run_onnx(int8, x, fused=False) - reference).max() > 1e-2 * scale  # the quantization it undid
    one = keep_float(model, activations[:1])
    assert sum(n.op_type == "QuantizeLinear" for n in one.graph.node) == ops_count(model, "QuantizeLinear") - 1
    with pytest.raises(ConfigError, match="not quantized activations or weights"):
        keep_float(model, ["no_such_tensor"])


def ops_count(model: onnx.ModelProto, op: str) -> int:
    return sum(n.op_type == op for n in model.graph.node)
