"""Normalisation layers: fast formulas against textbook ones, SSN grouping, factories."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from asc.errors import ConfigError
from asc.models.norms import (
    FreqNorm,
    InstanceFreqNorm,
    RelaxedFreqNorm,
    ResNorm,
    SubSpectralNorm,
    freq_norm,
    norm_factory,
    norm_names,
)

EPS = 1e-5


# Textbook formulas, evaluated in float64 as the ground truth.
def ifn_ref(x: torch.Tensor) -> torch.Tensor:
    mu = x.mean(dim=(1, 3), keepdim=True)
    var = ((x - mu) ** 2).mean(dim=(1, 3), keepdim=True)
    return (x - mu) / torch.sqrt(var + EPS)


def ln_ref(x: torch.Tensor) -> torch.Tensor:
    mu = x.mean(dim=(1, 2, 3), keepdim=True)
    var = ((x - mu) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    return (x - mu) / torch.sqrt(var + EPS)


def resnorm_ref(x: torch.Tensor, lam: float = 0.1) -> torch.Tensor:
    return lam * x + ifn_ref(x)


def rfn_ref(x: torch.Tensor, lam: float = 0.5) -> torch.Tensor:
    return lam * ln_ref(x) + (1 - lam) * ifn_ref(x)


CASES = [
    (InstanceFreqNorm(), ifn_ref),
    (ResNorm(), resnorm_ref),
    (ResNorm(lam=0.3), lambda x: resnorm_ref(x, 0.3)),
    (RelaxedFreqNorm(), rfn_ref),
    (RelaxedFreqNorm(lam=0.2), lambda x: rfn_ref(x, 0.2)),
]
IDS = ["ifn", "resnorm", "resnorm-0.3", "rfn", "rfn-0.2"]


def _spectrogram_like(seed: int, offset: float, scale: float = 1.0) -> torch.Tensor:
    """Random (3, 4, 16, 25) input with a per-bin level, as log-mels have."""
    g = torch.Generator().manual_seed(seed)
    per_bin = 3.0 * torch.randn(1, 1, 16, 1, generator=g)
    return scale * torch.randn(3, 4, 16, 25, generator=g) + per_bin + offset


@pytest.mark.parametrize(("norm", "ref"), CASES, ids=IDS)
@pytest.mark.parametrize("offset", [0.0, -40.0, 1000.0])
def test_fast_norm_matches_textbook_formula(norm: FreqNorm, ref, offset: float) -> None:
    x = _spectrogram_like(0, offset)
    expected = ref(x.double())
    # Within a few float32 ulps of the largest output (ResNorm carries lam * x, ~100 at offset
    # 1000). E[x^2] - E[x]^2 without the shift is off by ~1 at offset 1000.
    diff = (norm(x).double() - expected).abs().max().item()
    assert diff < 5e-6 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize(("norm", "ref"), CASES, ids=IDS)
def test_bfloat16_input_keeps_float32_statistics(norm: FreqNorm, ref) -> None:
    """CUDA autocast feeds the norms bfloat16 conv outputs; in bfloat16, E[d^2] - E[d]^2 of a bin
    whose spread is small against its level cancels to 0 and rsqrt(eps) blows it up to ~300x
    (BC-ResNet-Mod trained to NaN on an H200). The statistics are taken in float32 instead."""
    x = _spectrogram_like(2, 0.0, scale=0.05) + 4.0
    x[:, :1, :, :1] = 0.0  # the shift sample: post-ReLU zero in a bin at level 4 with spread 0.05
    expected = ref(x.to(torch.bfloat16).double())
    y = norm(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    # bfloat16 keeps ~3 significant digits of the output, whose largest values are a few units
    assert (y.double() - expected).abs().max().item() < 0.05 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize(("norm", "ref"), CASES, ids=IDS)
def test_gradients_match_textbook_formula(norm: FreqNorm, ref) -> None:
    x = _spectrogram_like(1, 5.0).double().requires_grad_()
    upstream = torch.randn_like(x)
    (fast,) = torch.autograd.grad((norm(x) * upstream).sum(), x)
    (slow,) = torch.autograd.grad((ref(x) * upstream).sum(), x)
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-9)


def test_constant_bin_normalises_to_exact_zero() -> None:
    # A band-limited device leaves high bins at the log floor; their variance is 0, not noise.
    x = _spectrogram_like(2, 0.0)
    x[:, :, 12:, :] = -11.512925
    out = InstanceFreqNorm()(x)
    assert torch.count_nonzero(out[:, :, 12:, :]) == 0
    assert out[:, :, :12].abs().max() > 1.0


@pytest.mark.parametrize("name", ["ifn", "resnorm", "rfn"])
def test_freq_norms_are_stateless_and_mode_independent(name: str) -> None:
    norm = freq_norm(name)
    assert list(norm.parameters()) == [] and list(norm.buffers()) == []
    x = _spectrogram_like(3, 0.0)
    train_out = norm.train()(x)
    eval_out = norm.eval()(x)
    assert torch.equal(train_out, eval_out)
    # Per-clip statistics: a clip's output does not depend on the rest of the batch.
    torch.testing.assert_close(norm(x[1:2]), train_out[1:2], rtol=0, atol=1e-6)


def test_ifn_removes_per_bin_offset_and_resnorm_keeps_lambda_of_it() -> None:
    x = _spectrogram_like(4, 0.0)
    offset = 5.0 * torch.randn(1, 1, 16, 1, generator=torch.Generator().manual_seed(5))
    ifn, res = InstanceFreqNorm(), ResNorm(lam=0.1)
    torch.testing.assert_close(ifn(x + offset), ifn(x), rtol=0, atol=1e-5)
    change = res(x + offset) - res(x)
    torch.testing.assert_close(change, (0.1 * offset).expand_as(change), rtol=0, atol=1e-5)
    assert change.abs().max() > 0.1  # the offset is visible through the shortcut


def test_rfn_is_invariant_to_input_scale_but_resnorm_is_not() -> None:
    x = _spectrogram_like(6, 0.0)
    rfn, res = RelaxedFreqNorm(), ResNorm()
    torch.testing.assert_close(rfn(10.0 * x), rfn(x), rtol=1e-4, atol=1e-5)  # eps breaks exactness
    assert (res(10.0 * x) - res(x)).abs().max() > 1.0


def test_subspectral_norm_gives_each_subband_its_own_statistics_and_affine() -> None:
    channels, bands, f = 3, 4, 16
    g = torch.Generator().manual_seed(7)
    # Every (channel, band) gets a different level and spread, so shared statistics would show.
    level = 10.0 * torch.randn(1, channels, bands, 1, 1, generator=g)
    spread = 0.5 + 3.0 * torch.rand(1, channels, bands, 1, 1, generator=g)
    x = (torch.randn(5, channels, bands, f // bands, 12, generator=g) * spread + level).reshape(5, channels, f, 12)
    ssn = SubSpectralNorm(channels, bands)
    with torch.no_grad():
        ssn.bn.weight.copy_(torch.rand(channels * bands, generator=g) + 0.5)
        ssn.bn.bias.copy_(torch.randn(channels * bands, generator=g))
    out = ssn.train()(x)
    rows = f // bands
    for c in range(channels):
        for s in range(bands):
            k = c * bands + s
            piece = x[:, c, s * rows : (s + 1) * rows, :]
            mu, var = piece.mean(), piece.var(unbiased=False)
            expected = (piece - mu) / torch.sqrt(var + EPS) * ssn.bn.weight[k] + ssn.bn.bias[k]
            torch.testing.assert_close(out[:, c, s * rows : (s + 1) * rows, :], expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ssn.bn.running_mean[k], 0.1 * mu, rtol=1e-5, atol=1e-6)
    # Plain BN over the same input would mix the bands and leave per-band means far from bias.
    plain = nn.BatchNorm2d(channels).train()(x)
    assert (plain[:, 0, :rows].mean() - plain[:, 0, -rows:].mean()).abs() > 0.5


def test_subspectral_norm_rejects_indivisible_frequency_size() -> None:
    with pytest.raises(ConfigError, match="not divisible by 4 sub-bands"):
        SubSpectralNorm(2, 4)(torch.randn(1, 2, 18, 5))


def test_norm_factory_builds_channel_norms() -> None:
    bn = norm_factory("bn")(8)
    assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == 8
    ssn = norm_factory("ssn", sub_bands=4)(8)
    assert isinstance(ssn, SubSpectralNorm) and ssn.bn.num_features == 32
    with pytest.raises(ConfigError, match="unknown channel norm 'ln'.*bn, ssn"):
        norm_factory("ln")


def test_freq_norm_by_name() -> None:
    assert isinstance(freq_norm("resnorm"), ResNorm) and freq_norm("resnorm").lam == 0.1
    assert isinstance(freq_norm("rfn"), RelaxedFreqNorm) and freq_norm("rfn").lam == 0.5
    assert freq_norm("rfn", lam=0.25).lam == 0.25
    assert isinstance(freq_norm("ifn"), InstanceFreqNorm)
    assert isinstance(freq_norm("none"), nn.Identity)
    bn = freq_norm("bn", 7)
    assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == 7
    with pytest.raises(ConfigError, match="'ifn' has no lambda"):
        freq_norm("ifn", lam=0.3)
    with pytest.raises(ConfigError, match="unknown frequency norm 'freq'.*resnorm, rfn, ifn, bn, none"):
        freq_norm("freq")
    assert norm_names("freq") == ("resnorm", "rfn", "ifn", "bn", "none")
    assert norm_names("channel") == ("bn", "ssn")
