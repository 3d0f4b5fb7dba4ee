"""Model family: exact parameter counts, shapes, gradients, export-friendliness, registry errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from asc.errors import ConfigError
from asc.models import (
    BCResBlock,
    BCResNet,
    BCResNetMod,
    DCASE2021Baseline,
    SubSpectralNorm,
    build_model,
    keras_param_count,
    model_names,
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize(
    ("width", "expected"),
    [(1, 9_232), (1.5, 17_154), (2, 27_284), (3, 54_168), (6, 187_812), (8, 321_068)],
)
def test_bcresnet_parameter_count(width: float, expected: int) -> None:
    assert n_params(BCResNet(width, 12)) == expected


@pytest.mark.parametrize(("width", "expected"), [(10, 8_055), (20, 25_050), (40, 85_890), (80, 314_970)])
def test_bcresnet_mod_parameter_count(width: int, expected: int) -> None:
    assert n_params(BCResNetMod(width, 10, sub_bands=4)) == expected


def test_bcresnet_mod_norm_choices_change_only_the_norm_parameters() -> None:
    c = 10
    stage_channels = [c, 15, 2 * c, 25]
    # BN baseline: one BatchNorm2d (2 parameters per channel) on the input and after each stage.
    assert n_params(BCResNetMod(c, freq_norm="bn")) == 8_055 + 2 * (1 + sum(stage_channels))
    for name in ("rfn", "ifn", "none"):
        assert n_params(BCResNetMod(c, freq_norm=name)) == 8_055
    # Plain BN in the blocks: 2 * C instead of 2 * C * S parameters after each frequency conv.
    blocks_per_stage = [2, 2, 2, 3]
    saved = sum(2 * ch * 3 * n for ch, n in zip(stage_channels, blocks_per_stage))
    model = BCResNetMod(c, block_norm="bn")
    assert n_params(model) == 8_055 - saved
    assert not any(isinstance(m, SubSpectralNorm) for m in model.modules())


def test_dcase2021_baseline_parameter_count_keras_way() -> None:
    model = DCASE2021Baseline(10)
    assert keras_param_count(model) == 46_246
    assert n_params(model) == 46_246 - 2 * (16 + 16 + 32)  # Keras also counts BN moving stats


@pytest.mark.parametrize(
    ("make", "size"),
    [
        (lambda: BCResNetMod(10, 10), (256, 431)),
        (lambda: BCResNetMod(10, 10), (128, 87)),
        (lambda: DCASE2021Baseline(10), (256, 431)),
        (lambda: DCASE2021Baseline(10), (128, 87)),
        (lambda: BCResNet(1, 10, sub_bands=4), (128, 87)),
    ],
    ids=["bcresnet_mod-256x431", "bcresnet_mod-128x87", "baseline-256x431", "baseline-128x87", "bcresnet-128x87"],
)
def test_output_shapes(make, size: tuple[int, int]) -> None:
    with torch.no_grad():
        assert make().eval()(torch.randn(1, 1, *size)).shape == (1, 10)


@pytest.mark.parametrize(
    ("make", "size"),
    [
        (lambda: BCResNet(1, 12), (40, 101)),
        (lambda: BCResNetMod(10, 10), (64, 40)),
        (lambda: DCASE2021Baseline(10), (40, 500)),
    ],
    ids=["bcresnet", "bcresnet_mod", "baseline"],
)
def test_eval_batch_of_one_matches_batched_eval(make, size: tuple[int, int]) -> None:
    model = make().eval()
    x = torch.randn(3, 1, *size)
    with torch.no_grad():
        batched = model(x)
        single = model(x[1:2])
    assert single.shape == (1, batched.shape[1])
    torch.testing.assert_close(single, batched[1:2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("make", "size"),
    [
        (lambda: BCResNet(1, 12), (40, 101)),
        (lambda: BCResNetMod(10, 10), (64, 40)),
        (lambda: BCResNetMod(10, 10, freq_norm="rfn"), (64, 40)),
        (lambda: BCResNetMod(10, 10, freq_norm="bn", block_norm="bn"), (64, 40)),
        (lambda: DCASE2021Baseline(10), (40, 500)),
    ],
    ids=["bcresnet", "bcresnet_mod", "bcresnet_mod_rfn", "bcresnet_mod_bn", "baseline"],
)
def test_backward_reaches_every_parameter(make, size: tuple[int, int]) -> None:
    model = make().train()
    logits = model(torch.randn(4, 1, *size))
    nn.functional.cross_entropy(logits, torch.arange(4) % logits.shape[1]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_ifn_model_ignores_a_per_bin_device_offset_resnorm_model_does_not() -> None:
    x = torch.randn(2, 1, 64, 40)
    eq_curve = 3.0 * torch.randn(1, 1, 64, 1)  # a microphone's log-frequency response
    with torch.no_grad():
        ifn = BCResNetMod(10, freq_norm="ifn").eval()
        torch.testing.assert_close(ifn(x + eq_curve), ifn(x), rtol=1e-4, atol=1e-5)
        resnorm = BCResNetMod(10, freq_norm="resnorm").eval()
        assert (resnorm(x + eq_curve) - resnorm(x)).abs().max() > 1e-3


def test_bcresblock_transition_has_no_identity_shortcut() -> None:
    block = BCResBlock(4, 4, subband_norm=nn.BatchNorm2d).eval()
    # Zero every conv: the block output is then ReLU(shortcut + constants) for a normal block.
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.zero_()
    x = torch.randn(1, 4, 8, 10)
    assert torch.equal(block(x), torch.relu(x))
    transition = BCResBlock(4, 6, subband_norm=nn.BatchNorm2d).eval()
    with torch.no_grad():
        for m in transition.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.zero_()
    assert torch.equal(transition(x), torch.zeros(1, 6, 8, 10))
    with pytest.raises(ConfigError, match="transition"):
        BCResBlock(4, 4, subband_norm=nn.BatchNorm2d, freq_stride=2)


@pytest.mark.slow
def test_models_export_without_data_dependent_control_flow() -> None:
    x = torch.randn(1, 1, 64, 40)
    for model in (BCResNetMod(10, 10), DCASE2021Baseline(10)):
        model.eval()
        exported = torch.export.export(model, (x,))
        other = torch.randn(1, 1, 64, 40)
        torch.testing.assert_close(exported.module()(other), model(other), rtol=1e-5, atol=1e-6)


def test_indivisible_frequency_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not divisible by 4 sub-bands"):
        BCResNetMod(10).eval()(torch.randn(1, 1, 100, 40))  # 50 bins after the head


def test_registry_builds_each_model() -> None:
    assert model_names() == ("bcresnet", "bcresnet_mod", "dcase2021_baseline", "dcase2024_baseline")
    assert isinstance(build_model("bcresnet", 12), BCResNet)
    model = build_model("bcresnet_mod", 7, width=10, freq_norm="rfn", freq_norm_lambda=0.25)
    assert isinstance(model, BCResNetMod) and model.input_norm.lam == 0.25
    assert model.classifier.out_channels == 7
    assert isinstance(build_model("dcase2021_baseline", 10, dropout=0.1), DCASE2021Baseline)


def test_registry_errors() -> None:
    with pytest.raises(ConfigError, match="unknown model 'resnet'; valid: bcresnet, bcresnet_mod, dcase2021_baseline"):
        build_model("resnet", 10)
    with pytest.raises(ConfigError, match="'bcresnet_mod' has no option 'widht'.*width"):
        build_model("bcresnet_mod", 10, widht=10)
    with pytest.raises(ConfigError, match="unknown frequency norm 'layernorm'"):
        build_model("bcresnet_mod", 10, freq_norm="layernorm")
    with pytest.raises(ConfigError, match="'model.args.width' must be an integer, got 12.5"):
        build_model("bcresnet_mod", 10, width=12.5)
    with pytest.raises(ConfigError, match="'model.args.dropout' must be a number, got 'high'"):
        build_model("bcresnet_mod", 10, dropout="high")  # the key is named, not a TypeError from inside torch
    with pytest.raises(ConfigError, match="at least one channel"):
        build_model("bcresnet", 10, width=0)
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("bcresnet", 0)
