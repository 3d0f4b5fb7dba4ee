"""Device augmentation: pairing, response curves, the learned translator, DIR with the real MicIRP
responses, Freq-MixStyle, and the pipelines built from an AugmentConfig."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.signal import welch

from asc.augment import (
    AugmentConfig,
    DeviceResponse,
    DeviceTranslation,
    DeviceTranslator,
    FreqMixStyle,
    ImpulseResponseAugment,
    align_pairs,
    build_augmentations,
    build_mixup,
    fit_translator,
    load_impulse_responses,
    mix_frequency_statistics,
    pair_by_segment,
)
from asc.config import from_dict
from asc.data.clips import Clip
from asc.errors import AscError, ConfigError

RATE = 16000
VOCAB = ["a", "b", "c", "s1"]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def one_thread():
    """The translator fits are tiny: thread start-up and contention with other jobs on a shared
    machine cost far more than the convolutions, so these tests run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def irs(micirp_dir: Path) -> torch.Tensor:
    return load_impulse_responses(micirp_dir, RATE)


def _synthetic_pairs(n: int, seed: int, n_mels: int = 16, n_time: int = 24):
    """Source log-mels and two target devices: b adds a curve and compresses loud bins (something
    a mean curve cannot express), c adds another curve."""
    gen = _gen(seed)
    source = torch.randn(n, 1, n_mels, n_time, generator=gen).cumsum(dim=-1) * 0.3 - 5
    ids = torch.randint(0, 2, (n,), generator=gen)
    f = torch.linspace(0, 1, n_mels)
    curves = torch.stack([2 * torch.sin(3.1 * f), -1.5 * f])
    compress = -0.8 * torch.relu(source + 5) * (ids == 0).view(n, 1, 1, 1)
    noise = 0.05 * torch.randn(n, 1, n_mels, n_time, generator=gen)
    return source, source + curves[ids][:, None, :, None] + compress + noise, ids


# --- pairing and alignment --------------------------------------------------------------------


def test_pair_by_segment_pairs_source_clips_with_every_other_device_of_the_segment() -> None:
    def clip(name: str, device: str, segment: str | None) -> Clip:
        return Clip(Path(f"{name}.wav"), "park", device, segment=segment)

    clips = [
        clip("0", "a", "s1"), clip("1", "b", "s1"), clip("2", "c", "s1"),
        clip("3", "a", "s2"), clip("4", "s1", "s2"),
        clip("5", "b", "s3"),  # no source recording of s3
        clip("6", "a", None), clip("7", "b", None),  # no segment: cannot pair
        clip("8", "s2", "s2"), clip("9", "a", "s4"),
    ]
    assert pair_by_segment(clips) == [(0, 1), (0, 2), (3, 4), (3, 8)]
    assert pair_by_segment(clips, source="b") == [(1, 0), (1, 2)]
    assert pair_by_segment([]) == []


def test_align_pairs_recovers_known_lags_and_crops_to_the_shared_frames() -> None:
    gen = _gen(1)
    long = torch.randn(6, 1, 10, 60, generator=gen)
    long = long + torch.randn(6, 1, 1, 60, generator=gen) * 3  # frame energies that vary over time
    true_lags = torch.tensor([0, 3, -2, 4, -4, 1])
    source = long[..., 8:48]
    # target frame t + lag shows what source frame t shows
    target = torch.stack([long[i, ..., 8 - lag: 48 - lag] for i, lag in enumerate(true_lags.tolist())])
    aligned_source, aligned_target, lags = align_pairs(source, target + 1.0, max_lag=4)
    assert torch.equal(lags, true_lags)
    assert aligned_source.shape == aligned_target.shape == (6, 1, 10, 36)
    torch.testing.assert_close(aligned_target - 1.0, aligned_source)


# --- DeviceResponse ---------------------------------------------------------------------------


def test_device_response_recovers_known_offset_and_spread() -> None:
    gen = _gen(2)
    n, n_mels = 400, 16
    f = torch.linspace(0, 1, n_mels)
    curve = {"b": 3 * f - 1, "s1": torch.cos(6 * f)}
    spread = {"b": 0.2 + 0.3 * f, "s1": torch.full((n_mels,), 0.4)}
    source = torch.randn(n, 1, n_mels, 20, generator=gen) - 4
    names = ["b" if i % 2 else "s1" for i in range(n)]
    z = torch.randn(n, n_mels, generator=gen)  # clip-level deviation of each recording
    offset = torch.stack([curve[d] + z[i] * spread[d] for i, d in enumerate(names)])
    target = source + offset[:, None, :, None] + 0.3 * torch.randn(n, 1, n_mels, 20, generator=gen)
    response = DeviceResponse.fit(source, target, names)
    assert response.devices == ["b", "s1"]
    for k, device in enumerate(response.devices):
        # 200 pairs: the mean is within a few standard errors, the spread within ~15 %
        assert (response.delta[k] - curve[device]).abs().max() < 4 * 0.5 / 200**0.5
        # the frame noise, averaged over 20 frames, adds to the clip-level spread
        expected_sd = (spread[device] ** 2 + 0.3**2 / 20).sqrt()
        torch.testing.assert_close(response.sd[k], expected_sd, rtol=0.15, atol=0.0)


def test_device_response_translate_adds_curve_plus_scaled_spread_per_clip(tmp_path: Path) -> None:
    response = DeviceResponse(["b", "c"], torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, -1.0]]),
                              torch.tensor([[0.5, 0.5, 0.5], [0.0, 0.0, 0.0]]))
    x = torch.zeros(2000, 1, 3, 4)
    target = torch.tensor([0, 1]).repeat(1000)
    out = response.translate(x, target, _gen(3))
    expected_c = torch.tensor([0.0, 0.0, -1.0]).view(1, 1, 3, 1).expand(1000, 1, 3, 4)
    torch.testing.assert_close(out[1::2], expected_c)
    z = (out[0::2, 0, :, 0] - torch.tensor([1.0, 2.0, 3.0])) / 0.5
    torch.testing.assert_close(z, z[:, :1].expand(-1, 3))  # one z per clip
    assert z[:, 0].mean().abs() < 0.1 and z[:, 0].std() == pytest.approx(1.0, abs=0.08)
    assert torch.equal(out, response.translate(x, target, _gen(3)))
    response.save(tmp_path / "response.pt")
    loaded = DeviceResponse.load(tmp_path / "response.pt")
    assert loaded.devices == ["b", "c"] and torch.equal(loaded.delta, response.delta)
    with pytest.raises(AscError, match="not found"):
        DeviceResponse.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(AscError, match="not a saved device response"):
        DeviceResponse.load(tmp_path / "junk.pt")


# --- DeviceTranslator -------------------------------------------------------------------------


def test_translator_beats_identity_and_mean_curve_on_held_out_pairs(tmp_path: Path, one_thread: None) -> None:
    source, target, ids = _synthetic_pairs(48, seed=4)
    held_source, held_target, held_ids = _synthetic_pairs(32, seed=5)
    translator = fit_translator(source, target, ids, ["b", "c"], epochs=15, batch_size=16, lr=3e-3,
                                seed=0, align=False, channels=16, layers=5)
    response = DeviceResponse.fit(source, target, [["b", "c"][i] for i in ids])
    with torch.no_grad():
        translated = (translator(held_source, held_ids) - held_target).abs().mean().item()
    untranslated = (held_source - held_target).abs().mean().item()
    mean_curve = (held_source + response.delta[held_ids][:, None, :, None] - held_target).abs().mean().item()
    assert untranslated > 0.8
    assert translated < 0.2 * untranslated
    assert translated < 0.6 * mean_curve  # it learned the level-dependent part too
    # save/load reproduces the outputs exactly
    translator.save(tmp_path / "translator.pt")
    loaded = DeviceTranslator.load(tmp_path / "translator.pt")
    with torch.no_grad():
        assert torch.equal(loaded(held_source, held_ids), translator(held_source, held_ids))


def test_untrained_translator_is_the_response_curve_and_fit_is_seeded(one_thread: None) -> None:
    source, target, ids = _synthetic_pairs(24, seed=6)
    untrained = fit_translator(source, target, ids, ["b", "c"], epochs=0, align=False, channels=8, layers=4)
    response = DeviceResponse.fit(source, target, [["b", "c"][i] for i in ids])
    with torch.no_grad():
        torch.testing.assert_close(untrained(source, ids), source + response.delta[ids][:, None, :, None])
    state = torch.get_rng_state()
    first = fit_translator(source, target, ids, ["b", "c"], epochs=2, seed=3, channels=8, layers=4)
    second = fit_translator(source, target, ids, ["b", "c"], epochs=2, seed=3, channels=8, layers=4)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_translator_without_response_learns_the_curve_from_frequency_coordinates(one_thread: None) -> None:
    source, target, ids = _synthetic_pairs(48, seed=7)
    translator = fit_translator(source, target, ids, ["b", "c"], epochs=15, lr=3e-3, seed=0, align=False,
                                use_response=False, channels=16, layers=4)
    assert translator.delta is None
    with torch.no_grad():
        error = (translator(source, ids) - target).abs().mean().item()
    assert error < 0.4 * (source - target).abs().mean().item()


# --- DeviceTranslation ------------------------------------------------------------------------


def _response() -> DeviceResponse:
    delta = torch.stack([torch.full((6,), 2.0), torch.full((6,), -3.0)])
    return DeviceResponse(["b", "c"], delta, torch.zeros(2, 6))


def test_translation_changes_only_source_clips_with_probability_p() -> None:
    n = 4000
    devices = torch.randint(0, len(VOCAB), (n,), generator=_gen(8))
    x = torch.randn(n, 1, 6, 5, generator=_gen(9))
    augment = DeviceTranslation(_response(), VOCAB, source="a", p=0.5)
    out, new_devices = augment(x, devices, _gen(10))
    is_source = devices == 0
    assert torch.equal(out[~is_source], x[~is_source])
    assert torch.equal(new_devices[~is_source], devices[~is_source])
    translated = is_source & (new_devices != 0)
    untouched = is_source & (new_devices == 0)
    assert torch.equal(out[untouched], x[untouched])
    fraction = translated.sum().item() / is_source.sum().item()
    assert fraction == pytest.approx(0.5, abs=0.05)
    # translated clips carry their target's id and got exactly that device's curve
    to_b, to_c = translated & (new_devices == 1), translated & (new_devices == 2)
    assert torch.equal(translated, to_b | to_c)
    torch.testing.assert_close(out[to_b], x[to_b] + 2.0)
    torch.testing.assert_close(out[to_c], x[to_c] - 3.0)
    assert to_b.sum().item() / translated.sum().item() == pytest.approx(0.5, abs=0.07)
    again = augment(x, devices, _gen(10))
    assert torch.equal(again[0], out) and torch.equal(again[1], new_devices)


def test_translation_with_a_translator_and_explicit_targets(one_thread: None) -> None:
    source, target, ids = _synthetic_pairs(16, seed=11)
    translator = fit_translator(source, target, ids, ["b", "c"], epochs=1, channels=8, layers=4, align=False)
    augment = DeviceTranslation(translator, VOCAB, targets=["c"], p=1.0)
    devices = torch.tensor([0, 1, 0, 3])
    out, new_devices = augment(source[:4], devices, _gen(12))
    assert new_devices.tolist() == [2, 1, 2, 3]
    assert torch.equal(out[[1, 3]], source[[1, 3]])
    with torch.no_grad():
        torch.testing.assert_close(out[[0, 2]], translator(source[[0, 2]], torch.tensor([1, 1])))
    assert not out.requires_grad  # translated under no_grad: the translator is not trained here
    unchanged, same = DeviceTranslation(translator, VOCAB, p=0.0)(source[:4], devices, _gen(12))
    assert torch.equal(unchanged, source[:4]) and torch.equal(same, devices)


def test_translation_rejects_devices_it_cannot_map() -> None:
    with pytest.raises(ConfigError, match="target device 's1'"):
        DeviceTranslation(_response(), VOCAB, targets=["s1"])
    with pytest.raises(ConfigError, match="source device 'a'"):
        DeviceTranslation(_response(), ["b", "c"])
    with pytest.raises(ConfigError, match="none of them"):
        DeviceTranslation(_response(), ["a", "s2"])
    with pytest.raises(ConfigError, match="between 0 and 1"):
        DeviceTranslation(_response(), VOCAB, p=1.5)


# --- impulse responses ------------------------------------------------------------------------


def test_impulse_responses_load_resampled_and_unit_energy(irs: torch.Tensor) -> None:
    assert irs.shape[0] == 49
    # 0.34-0.50 s at 44.1/48 kHz resampled to 16 kHz
    assert 0.45 * RATE < irs.shape[1] < 0.55 * RATE
    torch.testing.assert_close(irs.square().sum(dim=1), torch.ones(49), rtol=1e-4, atol=1e-4)
    assert torch.isfinite(irs).all()


def test_dir_changes_only_source_rows_and_keeps_length_and_level(irs: torch.Tensor) -> None:
    x = torch.randn(6, RATE, generator=_gen(13))
    devices = torch.tensor([0, 1, 0, 2, 3, 0])
    augment = ImpulseResponseAugment(irs, VOCAB, p=1.0)
    out = augment(x, devices, _gen(14))
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    is_source = devices == 0
    assert torch.equal(out[~is_source], x[~is_source])
    assert ((out[is_source] - x[is_source]).abs().mean(dim=1) > 0.1).all()
    level_db = 10 * torch.log10(out[is_source].square().mean(dim=1) / x[is_source].square().mean(dim=1))
    assert level_db.abs().max() < 2.0  # unit-energy IRs keep white noise at its level
    assert torch.equal(out, augment(x, devices, _gen(14)))


def test_dir_respects_p(irs: torch.Tensor) -> None:
    x = torch.randn(1000, 64, generator=_gen(15))
    devices = torch.zeros(1000, dtype=torch.long)
    out = ImpulseResponseAugment(irs, VOCAB, p=0.6)(x, devices, _gen(16))
    changed = (out != x).any(dim=1).float().mean().item()
    assert changed == pytest.approx(0.6, abs=0.05)


def test_dir_output_takes_the_impulse_response_magnitude(irs: torch.Tensor) -> None:
    noise = torch.randn(1, 8 * RATE, generator=_gen(17))
    n_fft = 2048
    responses = 20 * np.log10(np.abs(np.fft.rfft(irs.numpy(), n_fft)) + 1e-9)  # (49, bins)
    band = slice(8, int(7000 / RATE * n_fft))  # 60 Hz - 7 kHz: below the resampler's cutoff
    # the three most strongly coloured IRs: their spectra differ the most from flat
    picks = np.argsort(responses[:, band].std(axis=1))[-3:]
    for k in picks:
        out = ImpulseResponseAugment(irs[k: k + 1], VOCAB, p=1.0)(noise, torch.tensor([0]), _gen(18))
        _, psd = welch(out[0].numpy(), nperseg=n_fft)
        spectrum = 10 * np.log10(psd[band])
        correlations = [np.corrcoef(spectrum, responses[j, band])[0, 1] for j in range(49)]
        assert correlations[k] > 0.95
        assert int(np.argmax(correlations)) == k


def test_dir_missing_or_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AscError, match="impulse-response folder not found"):
        load_impulse_responses(tmp_path / "nope", RATE)
    (tmp_path / "README.md").write_text("no audio here")
    with pytest.raises(AscError, match=f"{tmp_path}: no impulse-response audio files"):
        ImpulseResponseAugment.from_folder(tmp_path, RATE, VOCAB)


# --- Freq-MixStyle ----------------------------------------------------------------------------


def test_mix_frequency_statistics_moves_means_and_stds_between_partners() -> None:
    x = torch.randn(6, 2, 12, 50, generator=_gen(19)) * torch.rand(6, 1, 12, 1, generator=_gen(20)) * 3
    x = x + torch.randn(6, 1, 12, 1, generator=_gen(21)) * 4
    perm = torch.tensor([1, 2, 0, 4, 5, 3])
    lam = torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0, 0.35])
    out = mix_frequency_statistics(x, perm, lam, eps=0.0)
    assert out.shape == x.shape
    mean, std = x.mean(dim=(1, 3)), x.std(dim=(1, 3), correction=0)
    out_mean, out_std = out.mean(dim=(1, 3)), out.std(dim=(1, 3), correction=0)
    lam = lam[:, None]
    torch.testing.assert_close(out_mean, lam * mean + (1 - lam) * mean[perm], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_std, lam * std + (1 - lam) * std[perm], rtol=1e-4, atol=1e-4)
    low, high = torch.minimum(mean, mean[perm]), torch.maximum(mean, mean[perm])
    assert ((out_mean >= low - 1e-4) & (out_mean <= high + 1e-4)).all()

    def stats(row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return row.mean(dim=(0, 2), keepdim=True), row.std(dim=(0, 2), correction=0, keepdim=True)

    (mean0, std0), (mean1, std1) = stats(x[0]), stats(x[1])
    # lam 0: row 0 keeps its normalised content but takes its partner's (row 1) statistics
    torch.testing.assert_close(out[0], (x[0] - mean0) / std0 * std1 + mean1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[4], x[4], rtol=1e-4, atol=1e-4)  # lam 1: unchanged


def test_freq_mixstyle_applies_per_batch_with_probability_p_and_is_seeded() -> None:
    x = torch.randn(8, 1, 10, 20, generator=_gen(22)) + torch.randn(8, 1, 10, 1, generator=_gen(23)) * 3
    mixstyle = FreqMixStyle(p=0.4, alpha=0.3)
    gen = _gen(24)
    applied = sum(not torch.equal(mixstyle(x, gen), x) for _ in range(500)) / 500
    assert applied == pytest.approx(0.4, abs=0.06)
    out = FreqMixStyle(p=1.0)(x, _gen(25))
    assert out.shape == x.shape and not torch.equal(out, x)
    assert torch.equal(out, FreqMixStyle(p=1.0)(x, _gen(25)))
    # every row's per-frequency means lie between its own and one partner's
    mean, out_mean = x.mean(dim=(1, 3)), out.mean(dim=(1, 3))
    for i in range(8):
        assert any(
            ((out_mean[i] >= torch.minimum(mean[i], mean[j]) - 1e-4)
             & (out_mean[i] <= torch.maximum(mean[i], mean[j]) + 1e-4)).all()
            for j in range(8)
        )


# --- config and pipelines ---------------------------------------------------------------------


def test_default_config_builds_pipelines_that_change_nothing() -> None:
    wave, spec = build_augmentations(AugmentConfig(), VOCAB, RATE, generator=_gen(26))
    x, devices = torch.randn(3, 800), torch.tensor([0, 1, 2])
    assert torch.equal(wave(x, devices), x)
    mels = torch.randn(3, 1, 8, 10)
    out, same = spec(mels, devices)
    assert torch.equal(out, mels) and torch.equal(same, devices)
    assert build_mixup(AugmentConfig()) is None


def test_full_config_builds_seeded_pipelines(micirp_dir: Path) -> None:
    config = from_dict(AugmentConfig, {
        "dir_p": 1.0, "ir_dir": str(micirp_dir), "translation": "response", "translation_p": 1.0,
        "mixstyle_p": 1.0, "freq_masks": 1, "freq_mask_width": 2, "roll_seconds": 0.01, "mixup_alpha": 0.3,
    })
    devices = torch.tensor([0, 1, 0, 3])
    x = torch.randn(4, 4000, generator=_gen(27))
    mels = torch.randn(4, 1, 6, 10, generator=_gen(28))
    outputs = []
    for _ in range(2):
        wave, spec = build_augmentations(config, VOCAB, RATE, generator=_gen(29),
                                         translation_model=_response())
        waves = wave(x, devices)
        outputs.append((waves, *spec(mels, devices)))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    waves, specs, new_devices = outputs[0]
    assert waves.shape == x.shape and specs.shape == mels.shape
    assert new_devices[[1, 3]].tolist() == [1, 3] and set(new_devices[[0, 2]].tolist()) <= {1, 2}
    assert build_mixup(config).alpha == 0.3


def test_config_errors_are_one_line_config_errors(micirp_dir: Path) -> None:
    with pytest.raises(ConfigError, match="augment.dir_p=1.5"):
        AugmentConfig(dir_p=1.5)
    with pytest.raises(ConfigError, match="must be one of"):
        from_dict(AugmentConfig, {"translation": "cyclegan"})
    with pytest.raises(ConfigError, match="needs augment.ir_dir"):
        build_augmentations(AugmentConfig(dir_p=0.5), VOCAB, RATE, generator=_gen())
    with pytest.raises(ConfigError, match="needs a fitted DeviceTranslator"):
        build_augmentations(AugmentConfig(translation="translator"), VOCAB, RATE, generator=_gen(),
                            translation_model=_response())
