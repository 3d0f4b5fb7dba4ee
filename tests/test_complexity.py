"""Model size and MAC accounting against published DCASE numbers, hand formulas and ONNX exports."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from asc.complexity import (
    Complexity,
    LayerCount,
    RuleResult,
    check_rules,
    complexity,
    format_table,
    onnx_complexity,
    run_complexity,
    run_complexity_command,
)
from asc.errors import AscError, ConfigError
from asc.features import FeatureConfig
from asc.models import DCASE2021Baseline, SubSpectralNorm, build_model


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine, as after training (fresh BNs fold to zero bias)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(c, generator=generator) - 0.5)
    return model.eval()


def test_dcase2021_baseline_matches_the_organisers_tables():
    c = complexity(DCASE2021Baseline(), (1, 1, 40, 51))
    assert c.keras_params == 46_246  # the Keras summary of the official baseline
    assert c.trained_params == 46_118  # its "trainable params"
    # BN folded into the convs (which have biases): the organisers' TFLite table, 45,990
    assert c.params == 45_990
    assert c.nonzero_params == 45_990
    # conv MACs on the 2022 input (40 x 51) as in the organisers' NeSsi table; the dense layers are
    # in * out (NeSsi adds pooling, which is not counted here)
    macs = {layer.name: layer.macs for layer in c.layers}
    assert macs["features.0.0"] == 1_599_360
    assert macs["features.1.0"] == 25_589_760
    assert macs["features.4.0"] == 2_007_040
    assert macs["classifier.1"] == 64 * 100 and macs["classifier.4"] == 100 * 10
    assert c.macs == 1_599_360 + 25_589_760 + 2_007_040 + 6_400 + 1_000
    assert macs["features.2"] == 0  # pooling is not counted
    folded = {layer.name: layer for layer in c.layers}["features.0.1"]
    assert folded.params == 0 and folded.trained_params == 32 and "folded into features.0.0" in folded.note


def test_bcresnet_mod_c80_counts():
    model = build_model("bcresnet_mod", 10, width=80)
    c = complexity(model, (1, 1, 256, 431))
    assert c.trained_params == 314_970
    # Bias-free convs followed by BN: folding drops the BN's 2C and adds a C bias. Folded BNs: head
    # (160) + transition of each stage (80 + 120 + 160 + 200) + the time conv of every block
    # (2*80 + 2*120 + 2*160 + 3*200).
    assert c.params == 314_970 - (160 + 560 + 1_320)
    # SubSpectralNorm keeps a scale and shift per (channel, sub-band): 2 * 80 * 4 in a stage-0 block
    ssn = {layer.name: layer for layer in c.layers}["stages.0.0.freq_conv.1.bn"]
    assert ssn.params == 2 * 80 * 4 and "sub-band" in ssn.note
    norms = [layer for layer in c.layers if layer.kind == "ResNorm"]
    assert len(norms) == 5 and all(layer.params == 0 for layer in norms)
    head = {layer.name: layer for layer in c.layers}["head.0"]
    assert head.macs == 160 * 25 * 128 * 216  # stride-2 5x5 conv on 256 x 431 -> 128 x 216


def test_conv_and_linear_macs_match_hand_formulas():
    conv = nn.Conv2d(6, 12, (3, 5), stride=2, padding=1, groups=3)
    # output 10 x 14; MACs = Cin/groups * Cout * kH * kW * Hout * Wout, per batch item
    for batch in (1, 3):
        c = complexity(conv, (batch, 6, 20, 30))
        assert c.layers[0].output_shape == (batch, 12, 10, 14)
        assert c.macs == 2 * 12 * 3 * 5 * 10 * 14
    assert c.params == 12 * 2 * 3 * 5 + 12
    linear = nn.Linear(7, 5)
    assert complexity(linear, (1, 7)).macs == 7 * 5
    assert complexity(linear, (2, 4, 7)).macs == 4 * 7 * 5  # applied at 4 positions


def test_nonzero_counting_after_zeroing_80_percent():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 10, 3, bias=False)  # 360 weights
    flat = conv.weight.data.view(-1)
    flat[torch.randperm(360)[:288]] = 0.0
    c = complexity(conv, (1, 4, 8, 8), weight_bytes=1)
    assert (c.params, c.nonzero_params) == (360, 72)
    assert (c.bytes, c.nonzero_bytes) == (360, 72)
    assert check_rules(c, "dcase2021")[0].value == 72


def test_pruning_masks_are_seen():
    from torch.nn.utils import prune

    conv = nn.Conv2d(4, 10, 3)
    prune.l1_unstructured(conv, "weight", amount=0.8)  # weight = weight_orig * mask
    c = complexity(conv, (1, 4, 8, 8))
    assert c.params == 360 + 10
    assert c.nonzero_params == 72 + int(torch.count_nonzero(conv.bias))


def test_byte_accounting_per_width():
    model = DCASE2021Baseline()
    assert complexity(model, (1, 1, 40, 51)).bytes == 45_990 * 4
    assert complexity(model, (1, 1, 40, 51), weight_bytes=1).bytes == 45_990
    assert complexity(model.half(), (1, 1, 40, 51)).bytes == 45_990 * 2  # stored dtype by default
    mixed = complexity(model.float(), (1, 1, 40, 51), weight_bytes={"": 1, "classifier": 4})
    assert mixed.bytes == (45_990 - 6_500 - 1_010) + 4 * (6_500 + 1_010)
    with pytest.raises(ConfigError, match="weight_bytes"):
        complexity(model, (1, 1, 40, 51), weight_bytes=0)


class _SharedOutput(nn.Module):
    """The conv output feeds the BN and a residual add, so the BN cannot be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.unused_head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_bn_is_kept_when_the_conv_output_is_read_elsewhere():
    c = complexity(randomise_norms(_SharedOutput()), (1, 3, 8, 8))
    rows = {layer.name: layer for layer in c.layers}
    assert rows["conv"].params == 81 and rows["bn"].params == 6
    assert "also read elsewhere" in rows["bn"].note
    assert c.unused_params == 3 * 2 + 2 and c.params == 87  # the never-run head is not deployed
    batch_stats = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, track_running_stats=False))
    rows = complexity(batch_stats, (1, 1, 4, 4)).layers
    assert [(r.params, r.note) for r in rows] == [(4, ""), (4, "kept: no running statistics")]


def _rule_complexity(params: int, macs_1s: int | None, bytes_per_param: int = 1) -> Complexity:
    row = LayerCount("w", "Conv2d", params, params, params * bytes_per_param, params * bytes_per_param, 0, None)
    return Complexity("test", (1, 1, 1, 1), (row,), macs_1s=macs_1s)


@pytest.mark.parametrize(("params", "passed"), [(128_000, True), (128_001, False)])
def test_parameter_limits_at_the_boundary(params: int, passed: bool):
    for rule in ("dcase2021", "dcase2022", "dcase2023", "dcase2024", "dcase2025"):
        assert check_rules(_rule_complexity(params, 0), rule)[0].passed is passed
    # at float16 the 2023+ memory limit halves the parameter budget; the 2022 count does not change
    half = _rule_complexity(64_001, 0, bytes_per_param=2)
    assert check_rules(half, "dcase2023")[0].passed is False
    assert check_rules(half, "dcase2022")[0].passed is True


def test_mac_limits_at_the_boundary_and_unknown():
    at, over, unknown = (_rule_complexity(1, m) for m in (30_000_000, 30_000_001, None))
    assert [r.passed for r in check_rules(at, "dcase2022")] == [True, True]
    assert [r.passed for r in check_rules(over, ["dcase2022", "dcase2024"])] == [True, False, True, False]
    result = check_rules(unknown, "dcase2025")[1]
    assert result.passed is None and "UNKNOWN" in str(result)
    assert check_rules(at, "dcase2021") == [RuleResult("dcase2021", "nonzero_bytes", 1, 128_000)]
    with pytest.raises(ConfigError, match="dcase2026"):
        check_rules(at, "dcase2026")


class _Small(nn.Module):
    """Conv + BN (foldable), depthwise conv + SubSpectralNorm (not foldable), a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, (3, 1), padding=(1, 0), groups=8, bias=False)
        self.ssn = SubSpectralNorm(8, 2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.ssn(self.dw(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _export(model: nn.Module, path: Path, shape: tuple[int, ...], dynamic_time: bool = False) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {0: "batch", 3: "time"}} if dynamic_time else None)
    return path


def test_onnx_export_counts_like_torch(tmp_path: Path):
    model = randomise_norms(_Small())
    path = _export(model, tmp_path / "small.onnx", (1, 1, 16, 20), dynamic_time=True)
    torch_c = complexity(model, (1, 1, 16, 20), one_second_shape=(1, 1, 16, 7))
    onnx_c = onnx_complexity(path, (1, 1, 16, 20), one_second_shape=(1, 1, 16, 7))
    # conv 72 + folded bias 8; depthwise 24; SSN scale + shift 2 * 8 * 2; linear 80 + 10
    assert torch_c.params == onnx_c.params == 80 + 24 + 32 + 90
    assert torch_c.nonzero_params == onnx_c.nonzero_params
    assert torch_c.bytes == onnx_c.bytes == 4 * 226
    assert torch_c.macs == onnx_c.macs == 72 * 320 + 24 * 320 + 80
    assert torch_c.macs_1s == onnx_c.macs_1s == 72 * 112 + 24 * 112 + 80
    assert sorted(layer.kind for layer in onnx_c.layers) == ["BatchNormalization", "Conv", "Conv", "Gemm"]
    with pytest.raises(AscError, match="time"):
        onnx_complexity(path)  # a free time axis needs an input shape


def test_onnx_matmul_bias_and_bundle_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    model = nn.Sequential(nn.Flatten(2), nn.Linear(6, 4))  # (N, C, F*T) @ W + b: MatMul then Add
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    _export(model, bundle / "model.onnx", (1, 3, 2, 3))
    c = onnx_complexity(bundle)
    assert [layer.kind for layer in c.layers] == ["MatMul"]
    assert c.params == 6 * 4 + 4 and c.macs == 3 * 6 * 4 == complexity(model, (1, 3, 2, 3)).macs
    assert run_complexity_command(bundle, ["dcase2022"], per_layer=False) == 0
    out = capsys.readouterr().out
    assert "parameters after BN folding 28 <= 128,000: PASS" in out and "MACs per 1-s input unknown" in out


def test_onnx_int8_qdq_counts_weights_not_scales(tmp_path: Path):
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.batches = iter([{"x": rng.standard_normal((1, 1, 16, 20), dtype=np.float32)} for _ in range(2)])

        def get_next(self):
            return next(self.batches, None)

    model = randomise_norms(_Small())
    fp32 = _export(model, tmp_path / "fp32.onnx", (1, 1, 16, 20))
    int8 = tmp_path / "int8.onnx"
    quantize_static(str(fp32), str(int8), Calibration(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    op_types_to_quantize=["Conv", "Gemm"])
    c = onnx_complexity(int8)
    assert c.params == 226 and c.macs == onnx_complexity(fp32).macs
    rows = {layer.kind: layer for layer in c.layers}
    # int8 weights (1 byte) and int32 biases (4 bytes); SSN's BatchNormalization stays float
    assert rows["Gemm"].bytes == 80 + 4 * 10
    assert rows["BatchNormalization"].bytes == 4 * 32
    assert c.bytes == (72 + 24 + 80) + 4 * (8 + 10) + 4 * 32


def _hand_made_run(run: Path, features: FeatureConfig, num_samples: int) -> None:
    """A run folder with the checkpoint keys the trainer writes and load_run_model reads."""
    model = build_model("bcresnet_mod", 10, width=8)
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model_spec": {"name": "bcresnet_mod", "args": {"width": 8}, "num_classes": 10},
                "model": model.state_dict(), "features": features.to_dict(), "num_samples": num_samples,
                "labels": [str(i) for i in range(10)]}, run / "checkpoints" / "last.pt")


def test_run_folder_counts_clip_and_one_second(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    features = FeatureConfig(sample_rate=16000, n_fft=512, hop_length=256, n_mels=32)
    run = tmp_path / "run"
    _hand_made_run(run, features, num_samples=4 * 16000)
    c = run_complexity(run)
    assert c.input_shape == (1, 1, 32, 1 + 64000 // 256)
    assert c.one_second_shape == (1, 1, 32, 1 + 16000 // 256)
    model = build_model("bcresnet_mod", 10, width=8)
    assert c.macs_1s == complexity(model, c.one_second_shape).macs
    assert c.macs > 3 * c.macs_1s and c.trained_params == sum(p.numel() for p in model.parameters())
    assert run_complexity_command(run, ["dcase2022", "dcase2024"], per_layer=True) == 0
    out = capsys.readouterr().out
    assert "stages.0.0.freq_conv.1.bn" in out and "MACs per 1-s input 1x1x32x63" in out
    assert out.count(": PASS") == 4
    # int8 marking changes the memory line, not the parameter count
    assert run_complexity_command(run, ["dcase2023"], per_layer=False, weight_bytes=1) == 0
    out = capsys.readouterr().out
    assert f"parameter memory (bytes) {c.params:,} <= 128,000: PASS" in out and "stages.0" not in out


def test_bad_targets_are_one_line_errors(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    for target, message in [(tmp_path / "missing", "not a run folder"), (tmp_path / "empty", "not a run folder"),
                            (tmp_path / "junk.onnx", "not a readable ONNX model")]:
        with pytest.raises(AscError, match=message) as error:
            run_complexity_command(target, ["dcase2022"], per_layer=False)
        assert "\n" not in str(error.value) and str(target) in str(error.value)
    with pytest.raises(ConfigError, match="unknown complexity rule set 'dcase'"):
        run_complexity_command(tmp_path / "empty", ["dcase"], per_layer=False)


def test_format_table_has_rows_totals_and_verdicts():
    c = complexity(DCASE2021Baseline(), (1, 1, 40, 51), weight_bytes=1, one_second_shape=(1, 1, 40, 51))
    text = format_table(c, check_rules(c, ["dcase2021", "dcase2022"]))
    assert "features.1.0" in text and "folded into features.1.0" in text
    assert "parameters (Keras-style, + BN running stats)  46,246" in text
    assert "parameters after BN folding" in text and "45,990" in text
    assert text.rstrip().endswith("dcase2022: MACs per 1-s input 29,203,560 <= 30,000,000: PASS")
    assert "features.1.0" not in format_table(c, per_layer=False)


def _bundle(folder: Path, model: nn.Module, features: FeatureConfig, clip_seconds: int, dynamic_time: bool) -> Path:
    """A bundle folder around ``model`` exported for ``clip_seconds`` of log-mel input."""
    from asc.bundle_manifest import BundleManifest

    folder.mkdir()
    frames = features.num_frames(clip_seconds * features.sample_rate)
    if dynamic_time:
        _export(model, folder / "model.onnx", (1, 1, features.n_mels, frames), dynamic_time=True)
    else:  # what asc export writes: static shapes after the batch axis
        from asc.export.onnx import save_onnx, torch_to_onnx

        save_onnx(torch_to_onnx(model, torch.zeros(2, 1, features.n_mels, frames), input_name="x"),
                  folder / "model.onnx")
    manifest = BundleManifest(labels=[str(i) for i in range(10)], sample_rate=features.sample_rate,
                              clip_samples=clip_seconds * features.sample_rate, frontend=features.to_dict(),
                              frontend_in_graph=False, precision="fp32", input_name="x",
                              input_shape=["batch", 1, features.n_mels, frames])
    (folder / "bundle.json").write_text(manifest.to_json())
    return folder


@pytest.mark.slow
def test_a_bundle_answers_the_1s_rules_from_its_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from asc.cli import main

    features = FeatureConfig(sample_rate=16000, n_fft=512, hop_length=256, n_mels=32)
    model = randomise_norms(build_model("bcresnet_mod", 10, width=8))  # sub-spectral norms reshape
    second = (1, 1, 32, features.num_frames(16000))
    free = _bundle(tmp_path / "free", model, features, clip_seconds=3, dynamic_time=True)
    assert main(["complexity", str(free), "--rules", "dcase2024"]) == 0
    out = capsys.readouterr().out
    macs_1s = complexity(model, second).macs
    assert f"MACs per 1-s input 1x1x32x63  {macs_1s:,}" in out and "scaled" not in out
    assert "UNKNOWN" not in out and out.count(": PASS") == 2

    # the exporter's graphs fix the time axis: the 1-s figure is scaled from the clip, and says so
    fixed = _bundle(tmp_path / "fixed", model, features, clip_seconds=3, dynamic_time=False)
    with pytest.raises(AscError, match="shape inference failed"):
        onnx_complexity(fixed / "model.onnx", (1, 1, 32, 188), one_second_shape=second)
    assert main(["complexity", str(fixed), "--rules", "dcase2024"]) == 0
    out = capsys.readouterr().out
    clip_macs = complexity(model, (1, 1, 32, 188)).macs
    assert f"MACs per 1-s input 1x1x32x63  {round(clip_macs * 63 / 188):,}" in out
    assert "scaled from the 1x1x32x188 input: the graph fixes its time axis" in out
    assert abs(round(clip_macs * 63 / 188) - macs_1s) < 0.03 * macs_1s  # stride rounding: a few per cent


@pytest.mark.parametrize("spelling", ["1x1x16x63", "1,1,16,63", "1×1×16×63"])
def test_shapes_are_accepted_as_printed(tmp_path: Path, spelling: str, capsys: pytest.CaptureFixture[str]):
    from asc.cli import main

    features = FeatureConfig(sample_rate=16000, n_fft=512, hop_length=256, n_mels=16)
    free = _bundle(tmp_path / "free", randomise_norms(_Small()), features, clip_seconds=1, dynamic_time=True)
    assert main(["complexity", str(free / "model.onnx"), "--input-shape", spelling, "--one-second-shape",
                 spelling, "--rules", "dcase2022"]) == 0
    assert "MACs per 1-s input 1x1x16x63" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main(["complexity", str(free), "--one-second-shape", "1x1xsixteen"])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "'1x1xsixteen' is not a shape such as 1x1x256x431" in error


def test_a_bundle_shipping_only_its_xz_container_is_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    import json

    from asc.cli import main
    from asc.export.onnx import pack_onnx

    features = FeatureConfig(sample_rate=16000, n_fft=512, hop_length=256, n_mels=16)
    bundle = _bundle(tmp_path / "b", randomise_norms(_Small()), features, clip_seconds=1, dynamic_time=True)
    assert main(["complexity", str(bundle), "--rules", "dcase2022"]) == 0
    plain = capsys.readouterr().out
    pack_onnx(bundle / "model.onnx")
    (bundle / "model.onnx").unlink()
    manifest = json.loads((bundle / "bundle.json").read_text())
    (bundle / "bundle.json").write_text(json.dumps({**manifest, "container_file": "model.onnx.xz"}))
    assert main(["complexity", str(bundle), "--rules", "dcase2022"]) == 0
    shipped = capsys.readouterr().out
    assert shipped.replace("model.onnx.xz", "model.onnx") == plain and "MACs per 1-s input 1x1x16x63" in shipped
    assert main(["complexity", str(bundle / "model.onnx.xz"), "--input-shape", "1x1x16x63", "--one-second-shape",
                 "1x1x16x63", "--rules", "dcase2022"]) == 0  # the container file itself
    assert capsys.readouterr().out.splitlines()[-4:] == shipped.splitlines()[-4:]  # same totals and verdicts


def test_the_cli_lists_every_rule_set_without_importing_them():
    from asc.cli.complexity import RULE_SET_NAMES
    from asc.complexity import rule_names

    assert RULE_SET_NAMES == rule_names()
