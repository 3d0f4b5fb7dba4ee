"""Export of a really trained tiny run: ONNX parity with torch, int8 census and gate, bundle folder."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from asc.bench import split_frontend
from asc.bundle_manifest import MANIFEST_NAME, PARITY_NAME, BundleManifest
from asc.config import RunConfig, load_config
from asc.errors import AscError, ConfigError
from asc.export import (
    Int8Options,
    export_onnx,
    export_run,
    export_trained,
    format_summary,
    fusion_census,
    open_run,
    ort_session,
    quantize_int8,
    run_clipset,
    sample_clips,
    split_dataset,
)
from asc.export.precision import PrecisionPlan
from asc.features import LogMel
from asc.train.checkpoint import load_checkpoint, save_checkpoint
from asc.train.loop import train_or_resume

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 6  # fewer leave a model that predicts one class, where any int8 graph agrees with it


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_overrides) -> SimpleNamespace:
    """A BC-ResNet-Mod (width 8) trained for a few epochs on the tiny synthetic corpus."""
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("export") / "run"
    train_or_resume(load_config(RunConfig, overrides=tiny_overrides(EPOCHS)), run_dir, progress=False)
    run = open_run(run_dir)
    clipset = run_clipset(run, progress=False)
    waves = split_dataset(run, clipset, "evaluate", as_features=False, progress=False)
    mels = split_dataset(run, clipset, "evaluate", as_features=True, progress=False)
    train_mels = split_dataset(run, clipset, "train", as_features=True, progress=False)
    # every eval clip, so the tests can recompute what parity.json claims
    audio = torch.from_numpy(np.stack([waves[i][0].numpy() for i in range(len(waves))]))
    log_mel = torch.from_numpy(np.stack([mels[i][0].numpy() for i in range(len(mels))]))
    with torch.no_grad():
        reference = run.model(log_mel).numpy()
    return SimpleNamespace(run_dir=run_dir, run=run, audio=audio, log_mel=log_mel, reference=reference,
                           targets=np.asarray(waves.targets), eval_size=len(waves), train_mels=train_mels,
                           convs=sum(isinstance(m, nn.Conv2d) for m in run.model.modules()))


def run_file(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort_session(path)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def leftovers(bundle: Path) -> list[str]:
    """Hidden staging folders of ``bundle`` that an export left behind."""
    return sorted(p.name for p in bundle.parent.glob(f".{bundle.name}.*"))


@pytest.fixture(scope="module")
def fp32_in_graph(trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "fp32"
    export_trained(trained.run, out, precision="fp32", frontend="in-graph", parity_clips=None, progress=False)
    return out


@pytest.fixture(scope="module")
def int8_in_graph(trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "int8"
    # a model this small and short-trained has small logit margins, so int8 flips ~10 % of its
    # decisions; the gate itself is tested below with a really bad calibration
    export_trained(trained.run, out, precision="int8", frontend="in-graph", calibration_clips=64, parity_clips=None,
                   min_agreement=0.6, progress=False)
    return out


# --------------------------------------------------------------------------------------- inputs


def test_a_folder_that_is_not_a_run_is_refused(tmp_path: Path):
    with pytest.raises(AscError, match="no such run folder") as error:
        export_run(tmp_path / "missing", tmp_path / "b")
    assert str(error.value).startswith(str(tmp_path / "missing")) and "\n" not in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AscError, match=r"not a run folder \(no config.yaml\)"):
        export_run(tmp_path / "empty", tmp_path / "b")
    with pytest.raises(ConfigError, match="percentile"):
        Int8Options(calibration="percentile", percentile=0.0)
    with pytest.raises(ConfigError, match="calibration must be one of minmax, percentile, entropy"):
        Int8Options(calibration="kl")  # type: ignore[arg-type]
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_bad_inputs_are_one_line_errors(trained, tmp_path: Path):
    assert trained.run.features.n_mels == 32  # the tiny preset the tests rely on
    with pytest.raises(AscError, match=r"nope.pt: checkpoint not found; this run has best, last$"):
        export_run(trained.run_dir, tmp_path / "b", checkpoint="nope")
    with pytest.raises(ConfigError, match="checkpoint must be a name"):
        export_run(trained.run_dir, tmp_path / "b", checkpoint="../last")
    (tmp_path / "file").write_text("x")
    with pytest.raises(AscError, match="is a file"):
        export_trained(trained.run, tmp_path / "file")
    with pytest.raises(AscError, match="not an asc bundle"):
        export_trained(trained.run, trained.run_dir)  # never replaces a folder that is not a bundle
    with pytest.raises(ConfigError, match="precision"):
        export_trained(trained.run, tmp_path / "b", precision="int4")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="frontend"):
        export_trained(trained.run, tmp_path / "b", frontend="inside")  # type: ignore[arg-type]
    assert not (tmp_path / "b").exists() and not leftovers(tmp_path / "b")


@pytest.mark.slow
def test_incompatible_checkpoint_is_refused(trained, tmp_path: Path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained.run_dir, run_dir)
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    state["model_spec"]["args"]["width"] = 16
    save_checkpoint(state, run_dir / "checkpoints" / "last.pt")
    with pytest.raises(AscError, match="incompatible asc version") as error:
        export_run(run_dir, tmp_path / "b")
    assert "\n" not in str(error.value) and str(run_dir / "checkpoints" / "last.pt") in str(error.value)


# ----------------------------------------------------------------------------------------- fp32


@pytest.mark.slow
def test_fp32_bundle_matches_torch_on_raw_audio(trained, fp32_in_graph: Path):
    manifest = BundleManifest.read(fp32_in_graph)
    run = trained.run
    assert (manifest.precision, manifest.frontend_in_graph, manifest.input_name) == ("fp32", True, "audio")
    assert manifest.input_shape == ["batch", 16000] and manifest.clip_samples == 16000
    assert manifest.labels == run.labels and manifest.features == run.features and manifest.sample_rate == 16000
    assert manifest.source["run"] == str(trained.run_dir.resolve()) and manifest.source["epoch"] == EPOCHS
    assert manifest.asc_version and manifest.source["quantization"] is None

    # the whole graph (STFT front end + CNN) against torch LogMel + model on the same PCM
    with torch.no_grad():
        expected = run.model(LogMel(run.features)(trained.audio)).numpy()
    np.testing.assert_allclose(expected, trained.reference, rtol=0, atol=1e-4)  # cached log-mels == LogMel
    logits = run_file(fp32_in_graph / "model.onnx", trained.audio)
    scale = np.abs(expected).max()
    assert scale > 0.5 and np.abs(logits - expected).max() < 1e-4 * scale
    assert (logits.argmax(1) == expected.argmax(1)).all()

    parity = json.loads((fp32_in_graph / PARITY_NAME).read_text())
    assert parity["clips"] == trained.eval_size == 90 and parity["split"] == "evaluate"
    first = parity["comparisons"][0]
    assert (first["candidate"], first["reference"], first["top1_agreement"]) == ("onnx_fp32", "torch", 1.0)
    assert first["max_abs_diff"] < 1e-4 * first["reference_scale"]
    assert parity["frontend_max_abs_diff"] < 1e-3  # ONNX STFT vs torch.stft, in log-mel units
    assert parity["accuracy"]["onnx_fp32"]["accuracy"] == parity["accuracy"]["torch"]["accuracy"]
    assert set(parity["accuracy"]["torch"]["per_group"]) == {"real", "seen", "unseen"}
    assert manifest.metrics["accuracy"] == parity["accuracy"]["onnx_fp32"]
    assert parity["gate"]["passed"] and parity["census"]["qlinear_convs"] == 0


@pytest.mark.slow
def test_fp32_file_is_one_small_stripped_graph_with_a_dynamic_batch(fp32_in_graph: Path):
    assert sorted(p.name for p in fp32_in_graph.iterdir()) == [
        "bundle.json", "model.onnx", "model.onnx.xz", "model.ort", "parity.json", "required_operators.config"]
    model = onnx.load(str(fp32_in_graph / "model.onnx"))
    assert model.opset_import[0].version >= 17 and [o.domain for o in model.opset_import] == [""]
    assert all(not node.metadata_props for node in model.graph.node) and not model.graph.value_info
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert "STFT" in {node.op_type for node in model.graph.node}
    assert (fp32_in_graph / "model.onnx").stat().st_size < 150_000  # ~88 KB; 36 KB is the mel filterbank
    # compacted names keep the front end's scope: `asc bench` times the front end apart by it
    assert split_frontend(model) is not None


@pytest.mark.slow
def test_ort_format_file_is_written_and_computes_the_same(trained, fp32_in_graph: Path):
    manifest = BundleManifest.read(fp32_in_graph)
    assert manifest.ort_file == "model.ort"
    ort_logits = run_file(fp32_in_graph / "model.ort", trained.audio[:5])  # batch 5: the batch is dynamic
    np.testing.assert_allclose(ort_logits, run_file(fp32_in_graph / "model.onnx", trained.audio[:5]), atol=1e-5)
    operators = (fp32_in_graph / "required_operators.config").read_text()
    assert "STFT" in operators and "Conv" in operators and "/tmp/asc-ort" not in operators


# ----------------------------------------------------------------------------------------- int8


@pytest.mark.slow
def test_int8_parity_is_measured_and_stored(trained, int8_in_graph: Path):
    manifest = BundleManifest.read(int8_in_graph)
    assert (manifest.precision, manifest.input_name) == ("int8", "audio")
    assert manifest.source["quantization"] == "ptq-minmax" and manifest.source["calibration_clips"] == 64
    parity = json.loads((int8_in_graph / PARITY_NAME).read_text())
    comparisons = {c["candidate"]: c for c in parity["comparisons"]}
    assert set(comparisons) == {"onnx_fp32", "onnx_int8", "ort"}
    int8 = comparisons["onnx_int8"]
    assert int8["reference"] == "onnx_fp32" and int8["clips"] == 90
    assert 0.6 <= int8["top1_agreement"] <= 1.0 and 0 < int8["max_abs_diff"] < int8["reference_scale"]
    assert manifest.metrics["top1_agreement"] == int8["top1_agreement"]
    assert manifest.metrics["max_abs_logit_diff"] == int8["max_abs_diff"]

    # recompute: the int8 file against torch, which the fp32 file matches decision for decision
    assert comparisons["onnx_fp32"]["top1_agreement"] == 1.0
    logits = run_file(int8_in_graph / "model.onnx", trained.audio)
    assert (logits.argmax(1) == trained.reference.argmax(1)).mean() == pytest.approx(int8["top1_agreement"])
    assert np.abs(logits - trained.reference).max() == pytest.approx(int8["max_abs_diff"], abs=1e-4)
    accuracy = (logits.argmax(1) == trained.targets).mean()
    assert parity["accuracy"]["onnx_int8"]["accuracy"] == pytest.approx(accuracy)
    assert manifest.metrics["accuracy"] == parity["accuracy"]["onnx_int8"]
    assert manifest.metrics["reference_accuracy"]["accuracy"] == pytest.approx(
        (trained.reference.argmax(1) == trained.targets).mean())


@pytest.mark.slow
def test_every_conv_runs_as_qlinearconv_and_the_norms_stay_float(trained, int8_in_graph: Path):
    census = fusion_census(int8_in_graph / "model.onnx")
    # the int8 plan's exact rewrites add convs: one depthwise conv per sub-spectral band and the
    # frequency means as depthwise convs, beside the model's own 33
    assert census.qlinear_convs == census.quantized_convs == census.convs > trained.convs == 33
    assert census.float_convs == 0
    parity = json.loads((int8_in_graph / PARITY_NAME).read_text())
    assert parity["census"]["qlinear_convs"] == parity["census"]["quantized_convs"] == census.convs
    # the only int8 multiplies are the SiLUs' x * sigmoid(x); every frequency-norm Mul runs float
    silus = sum(isinstance(m, nn.SiLU) for m in trained.run.model.modules())
    assert census.op_counts["QLinearMul"] == silus == 9
    assert census.op_counts["STFT"] == 1  # the front end stays float inside the int8 graph
    assert json.loads((int8_in_graph / MANIFEST_NAME).read_text())["metrics"]["qlinear_convs"] == census.convs


@pytest.mark.slow
def test_a_plan_keeps_chosen_nodes_float(trained, tmp_path: Path):
    """The mixed-precision hook: a callable picks nodes of the pre-processed graph to keep float."""
    cnn = export_onnx(trained.run.model, trained.log_mel[:2], tmp_path / "cnn.onnx", input_name="log_mel")

    def depthwise(model: onnx.ModelProto) -> list[str]:
        return [n.name for n in model.graph.node if n.op_type == "Conv"
                and next(a.i for a in n.attribute if a.name == "group") > 1]

    calibration = sample_clips(trained.train_mels, 16, split="train")
    with pytest.raises(ConfigError, match="not in the graph"):
        quantize_int8(cnn, tmp_path / "bad.onnx", calibration.batches(), Int8Options(keep_float=("no_such_node",)))
    out = quantize_int8(cnn, tmp_path / "int8.onnx", calibration.batches(), Int8Options(keep_float=depthwise),
                        float_nodes=())
    census = fusion_census(out)
    kept = len(depthwise(onnx.load(str(cnn))))
    assert kept == 18  # frequency and temporal depthwise convs of the 9 blocks
    assert census.quantized_convs == 33 - kept  # the quantizer left their weights float
    # onnxruntime quantizes a float-weight conv at load time when its input and output are
    # quantized anyway (the frequency convs); the census shows what really runs
    assert census.qlinear_convs + census.float_convs == 33 and census.float_convs == 9


# ----------------------------------------------------------------------------------------- gate


@pytest.mark.slow
def test_parity_gate_refuses_a_bad_int8_model_and_force_writes_it(trained, fp32_in_graph: Path, tmp_path: Path):
    bundle = tmp_path / "gate"
    shutil.copytree(fp32_in_graph, bundle)  # an older bundle at the destination
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    clipped = PrecisionPlan(calibration="percentile", percentile=90.0)  # clips 10 % of every activation
    options = dict(precision="int8", frontend="external", int8=clipped, calibration_clips=8, min_agreement=0.6,
                   ort_format=False, progress=False)
    with pytest.raises(AscError) as error:
        export_trained(trained.run, bundle, **options)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{bundle}: top-1 agreement onnx_int8 vs onnx_fp32 is ")
    assert "below the 60% gate" in message and "--force" in message and "QAT" in message
    # refused after everything was written to the staging folder: nothing of it is left, the old bundle is intact
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before and not leftovers(bundle)

    manifest = export_trained(trained.run, bundle, force=True, **options)
    parity = json.loads((bundle / PARITY_NAME).read_text())
    assert parity["gate"] == {"comparison": "onnx_int8 vs onnx_fp32", "agreement": manifest.metrics["top1_agreement"],
                              "min_agreement": 0.6, "forced": True, "passed": False}
    assert manifest.metrics["top1_agreement"] < 0.6 and manifest.metrics["forced"]
    assert BundleManifest.read(bundle) == manifest and manifest.ort_file is None
    assert sorted(p.name for p in bundle.iterdir()) == ["bundle.json", "frontend.npz", "model.onnx", "model.onnx.xz",
                                                        "parity.json"]
    assert manifest.input_shape == ["batch", 1, 32, 63] and manifest.input_name == "log_mel"
    assert manifest.frontend_file == "frontend.npz"
    operands = manifest.source["int8_operands"]  # the weight range that keeps AVX2 kernels exact
    assert operands["weight_bits"] == 7 and operands["int16_safe"]
    assert not leftovers(bundle)


# ------------------------------------------------------------------------------------------ QAT


@pytest.mark.slow
def test_a_qat_graph_ships_its_trained_int8_rewritten_for_the_kernels(trained, tmp_path: Path):
    from asc.compress.quant import int8_conv_weights, observed_int8_graph

    run = trained.run
    graph = observed_int8_graph(copy.deepcopy(run.model), (1, 32, 63),
                                sample_clips(trained.train_mels, 32, split="train").batches())
    qat_run = dataclasses.replace(run, model=graph)
    with pytest.raises(AscError, match="--int8"):
        export_trained(qat_run, tmp_path / "fp32", precision="fp32", progress=False)
    manifest = export_trained(qat_run, tmp_path / "qat", precision="int8", frontend="external", min_agreement=0.6,
                              ort_format=False, parity_clips=48, progress=False)
    parity = json.loads((tmp_path / "qat" / PARITY_NAME).read_text())
    assert [(c["candidate"], c["reference"]) for c in parity["comparisons"]] == [("onnx_int8", "torch")]
    assert manifest.source["quantization"] == "qat" and manifest.source["calibration_clips"] is None
    assert any("rewritten for the int8 kernels (" in note and "stem_space_to_depth x1" in note
               and "norm_affine_on_input" not in note for note in parity["notes"])  # QAT_REWRITES
    # not re-quantized: the graph's own int8 weights and scales, every conv fused; each depthwise
    # conv and its sub-spectral norm became one conv over the 4 bands stacked on channels, each mean
    # over frequency a conv
    assert manifest.metrics["qlinear_convs"] == manifest.metrics["convs"] == 33 + 9
    model = onnx.load(str(tmp_path / "qat" / "model.onnx"))
    assert [n.op_type for n in model.graph.node].count("SpaceToDepth") == 1
    stored = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer]
    int8_arrays = [a.tobytes() for a in stored if a.dtype == np.int8]
    scales = [a.tobytes() for a in stored if a.dtype == np.float32]
    deployed = int8_conv_weights(graph)
    assert len(deployed) == 33
    # a stacked band conv: per band (band-major) the codes times the sign of the band's norm scale
    band_codes = [[np.abs(band).tobytes() for band in np.split(a, 4)] for a in stored
                  if a.dtype == np.int8 and a.shape[2:] == (3, 1)]
    for expected in deployed[1:]:  # the stem's codes are moved by space-to-depth (tests/test_precision.py)
        if expected.q.shape[2:] == (3, 1):
            assert [np.abs(expected.q.numpy()).tobytes()] * 4 in band_codes
            continue
        assert expected.q.numpy().tobytes() in int8_arrays
        assert expected.scale.numpy().astype(np.float32).tobytes() in scales
    # and it computes what the graph computes, up to requantization ties (x / s in ONNX, x * (1/s) in torch)
    session = ort_session(tmp_path / "qat" / "model.onnx", fused=False)
    unfused = session.run(None, {"log_mel": trained.log_mel.numpy()})[0]
    with torch.no_grad():
        reference = graph(trained.log_mel).numpy()
    per_clip = np.abs(unfused - reference).max(axis=1)
    assert np.median(per_clip) < 1e-4 and per_clip.max() < 0.1


# ---------------------------------------------------------------------------------- phone script


@pytest.mark.slow
def test_phone_bundle_script(trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    spec = importlib.util.spec_from_file_location("phone_bundle", REPO / "export" / "phone_bundle.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "phone"
    assert script.main([str(trained.run_dir), "--out", str(out), "--frontend", "external", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "fp32, front end external, input log_mel batchx1x32x63" in printed
    assert "model.ort" in printed and "ORT Mobile usability:" in printed and "NNAPI EP" in printed
    manifest = BundleManifest.read(out)
    assert manifest.ort_file == "model.ort" and (out / "required_operators.config").is_file()
    assert manifest.metrics["top1_agreement"] == 1.0
    np.testing.assert_allclose(run_file(out / "model.ort", trained.log_mel), trained.reference, atol=1e-4)
    assert script.main([str(trained.run_dir / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "phone_bundle: error:" in capsys.readouterr().err


# ------------------------------------------------------------------- accuracy-aware int8 search


@pytest.mark.slow
def test_search_keeps_few_tensors_float_and_lowers_the_flip_loss_it_minimizes(trained, tmp_path: Path):
    """The plan search on a really trained model, with the bar one search clip above what the plain
    planned int8 reaches. Whether that one clip comes back depends on the CPU's int8 rounding (it did
    on a Xeon with AMX, not on an AVX-512 VNNI EPYC), and so does how the searched file does on clips
    the search never saw, so this asserts what the search guarantees on every CPU: it keeps a few
    tensors float (not all of them), one per step and only when the step helps, never loses
    agreement, and lowers the flip loss it minimizes."""
    from asc.export.precision import quantize_planned
    from asc.export.search import _flip_loss, search_int8

    cnn = export_onnx(trained.run.model, trained.log_mel[:2], tmp_path / "cnn.onnx", input_name="log_mel")
    calibration = list(sample_clips(trained.train_mels, 16, split="train").batches())
    search = np.random.default_rng(0).permutation(trained.eval_size)[: trained.eval_size // 2]
    x = trained.log_mel.numpy()
    fp32 = run_file(cnn, trained.log_mel)
    plain = run_file(quantize_planned(cnn, tmp_path / "plain.onnx", calibration), trained.log_mel)
    start = float((plain[search].argmax(1) == fp32[search].argmax(1)).mean())
    assert _flip_loss(plain[search], fp32[search]) > 0  # int8 moved some decisions toward flipping: work to do
    bar = start + 1 / len(search)
    report = search_int8(cnn, tmp_path / "searched.onnx", calibration, x[search], calibrations=("minmax",),
                         min_agreement=bar, sensitivity_clips=16, expand_groups=2, max_float=4)
    assert report.calibrations == {"minmax": pytest.approx(start)} and report.steps[0] == (0, pytest.approx(start))
    assert report.agreement >= start and report.reached == (report.agreement >= bar - 1e-9)
    assert [count for count, _ in report.steps] == list(range(len(report.steps)))  # one tensor per step
    agreements = [value for _, value in report.steps]
    assert agreements == sorted(agreements)  # a step is taken only when it helps
    assert 0 < len(report.float_tensors) <= 4 and report.candidates > 100  # a few of >100 quantized tensors
    assert all(t.error_removed > 0 for t in report.float_tensors)
    searched = run_file(tmp_path / "searched.onnx", trained.log_mel)
    assert float((searched[search].argmax(1) == fp32[search].argmax(1)).mean()) == pytest.approx(report.agreement)
    assert _flip_loss(searched[search], fp32[search]) < _flip_loss(plain[search], fp32[search])
    text = report.format()
    assert "kept float" in text and report.float_tensors[0].tensor in text


@pytest.mark.slow
def test_auto_precision_ships_int8_when_it_passes_else_fp32_with_the_reason(trained, tmp_path: Path, capsys):
    options = {"frontend": "external", "calibration_clips": 16, "parity_clips": 60, "ort_format": False,
               "progress": False}
    manifest = export_trained(trained.run, tmp_path / "auto", min_agreement=0.5, **options)  # "auto" is the default
    decision = manifest.source["precision_decision"]
    assert manifest.precision == "int8" and decision["chosen"] == "int8" and decision["requested"] == "auto"
    assert decision["int8_top1_agreement"] == pytest.approx(manifest.metrics["top1_agreement"])
    assert decision["clips"] == 60 and "shipped int8" in decision["reason"]
    searched = manifest.source["int8_search"]
    assert searched["search_clips"] == trained.eval_size - 60  # the eval clips outside the parity sample
    assert searched["reached"] and searched["plan"]["calibration"] == "minmax"
    assert "precision: int8 agrees" in format_summary(tmp_path / "auto", manifest)

    clipped = PrecisionPlan(calibration="percentile", percentile=90.0)  # clips 10 % of every activation
    manifest = export_trained(trained.run, tmp_path / "fp32", int8=clipped, search_clips=0, min_agreement=0.6,
                              **options)
    decision = manifest.source["precision_decision"]
    assert manifest.precision == "fp32" and decision["chosen"] == "fp32" and decision["int8_top1_agreement"] < 0.6
    assert manifest.metrics["agreement_with"] == "torch" and manifest.metrics["parity_gate_passed"]
    assert manifest.source["int8_search"] is None and manifest.source["quantization"] is None
    err = capsys.readouterr().err
    assert f"asc export: {decision['reason']}" in err and "shipped fp32" in decision["reason"]
    assert json.loads((tmp_path / "fp32" / MANIFEST_NAME).read_text())["source"]["precision_decision"] == decision
    with pytest.raises(ConfigError, match="search_clips"):
        export_trained(trained.run, tmp_path / "bad", search_clips=-1, **options)
