"""Mixup, SpecAugment masks and time roll: exact formulas, limits, and seeded reproducibility."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from asc.augment.spec import Mixup, SpecAugment, TimeRoll, mix_targets, mixup_loss, sample_beta
from asc.errors import ConfigError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _runs(flags: list[bool]) -> list[int]:
    """Lengths of the runs of True in a sequence."""
    runs, current = [], 0
    for flag in flags + [False]:
        if flag:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


# --- Beta draws ------------------------------------------------------------------------------


def test_sample_beta_matches_the_beta_distribution_and_is_seeded() -> None:
    draws = sample_beta(0.3, 20000, _gen(1))
    assert draws.dtype == torch.float32 and draws.min() >= 0 and draws.max() <= 1
    assert draws.mean().item() == pytest.approx(0.5, abs=0.01)
    # Var of Beta(a, a) is 1 / (4 (2a + 1)) = 0.1563 for a = 0.3
    assert draws.var().item() == pytest.approx(1 / (4 * 1.6), rel=0.05)
    assert torch.equal(sample_beta(0.3, 50, _gen(7)), sample_beta(0.3, 50, _gen(7)))
    assert not torch.equal(sample_beta(0.3, 50, _gen(7)), sample_beta(0.3, 50, _gen(8)))


# --- Mixup -----------------------------------------------------------------------------------


def test_mixup_mixes_each_row_with_its_partner_by_lam() -> None:
    x = torch.randn(16, 1, 8, 10, generator=_gen(2))
    batch = Mixup(alpha=0.3)(x, _gen(3))
    assert batch.lam.shape == (16,) and batch.lam.min() >= 0 and batch.lam.max() <= 1
    assert sorted(batch.perm.tolist()) == list(range(16))
    lam = batch.lam.view(16, 1, 1, 1)
    torch.testing.assert_close(batch.x, lam * x + (1 - lam) * x[batch.perm])
    # per-sample weights, not one weight for the batch
    assert batch.lam.std() > 0.05


def test_mixup_works_on_waveforms_and_is_seeded() -> None:
    x = torch.randn(8, 400, generator=_gen(4))
    first, second = Mixup(0.3)(x, _gen(5)), Mixup(0.3)(x, _gen(5))
    assert torch.equal(first.x, second.x) and torch.equal(first.perm, second.perm)
    torch.testing.assert_close(first.x, first.lam[:, None] * x + (1 - first.lam[:, None]) * x[first.perm])


def test_mixup_loss_weights_both_labels() -> None:
    logits = torch.randn(6, 4, generator=_gen(6))
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    perm = torch.tensor([1, 0, 3, 2, 5, 4])
    lam = torch.tensor([1.0, 0.0, 0.5, 0.25, 0.9, 0.3])
    expected = torch.stack([
        lam[i] * F.cross_entropy(logits[i:i + 1], y[i:i + 1])
        + (1 - lam[i]) * F.cross_entropy(logits[i:i + 1], y[perm[i]:perm[i] + 1])
        for i in range(6)
    ]).mean()
    torch.testing.assert_close(mixup_loss(logits, y, perm, lam), expected)
    # lam = 1 everywhere is plain cross-entropy
    torch.testing.assert_close(mixup_loss(logits, y, perm, torch.ones(6)), F.cross_entropy(logits, y))


def test_mix_targets_mixes_soft_targets_and_matches_the_hard_loss() -> None:
    logits = torch.randn(5, 3, generator=_gen(7))
    y = torch.tensor([0, 2, 1, 1, 0])
    perm = torch.tensor([4, 3, 2, 1, 0])
    lam = torch.tensor([0.1, 0.7, 0.5, 0.2, 1.0])
    soft = mix_targets(F.one_hot(y, 3).float(), perm, lam)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(5))
    torch.testing.assert_close(soft[0], torch.tensor([0.1 + 0.9, 0.0, 0.0]))
    soft_loss = -(soft * logits.log_softmax(dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(soft_loss, mixup_loss(logits, y, perm, lam))


def test_mixup_rejects_non_positive_alpha() -> None:
    with pytest.raises(ConfigError, match="alpha"):
        Mixup(0.0)


# --- SpecAugment -----------------------------------------------------------------------------

FILL = -1234.5


def test_freq_masks_fill_whole_bands_within_the_width_limit() -> None:
    x = torch.randn(200, 2, 40, 30, generator=_gen(8))
    out = SpecAugment(freq_masks=1, freq_width=8, time_masks=0, time_width=0, fill=FILL)(x, _gen(9))
    filled = out == FILL
    masked_bins = filled.all(dim=3).all(dim=1)  # (batch, F): whole band over time and channels
    # nothing outside the masked bands is touched, and masked bands are filled everywhere
    expanded = masked_bins[:, None, :, None].expand_as(x)
    assert torch.equal(filled, expanded)
    assert torch.equal(out[~expanded], x[~expanded])
    widths = []
    for row in masked_bins.tolist():
        runs = _runs(row)
        assert len(runs) <= 1
        widths.append(sum(runs))
    assert max(widths) <= 8
    # width is uniform on {0..8}: mean 4, every width occurs
    assert sum(widths) / len(widths) == pytest.approx(4.0, abs=0.6)
    assert set(widths) == set(range(9))


def test_several_time_masks_per_sample_drawn_independently() -> None:
    x = torch.randn(100, 1, 16, 50, generator=_gen(10))
    out = SpecAugment(freq_masks=0, freq_width=0, time_masks=2, time_width=5, fill=FILL)(x, _gen(11))
    masked_frames = (out == FILL).all(dim=2).squeeze(1)  # (batch, T)
    assert torch.equal(out == FILL, masked_frames[:, None, None, :].expand_as(x))
    totals = masked_frames.sum(dim=1)
    assert totals.max() <= 10
    for row in masked_frames.tolist():
        assert len(_runs(row)) <= 2
    # masks differ between samples
    assert len({tuple(row) for row in masked_frames.tolist()}) > 50


def test_mask_fill_defaults_to_each_sample_mean() -> None:
    x = torch.randn(4, 1, 12, 20, generator=_gen(12)) + torch.arange(4.0).view(4, 1, 1, 1) * 10
    out = SpecAugment(freq_masks=1, freq_width=12, time_masks=1, time_width=20)(x, _gen(13))
    changed = out != x
    for i in range(4):
        if changed[i].any():
            torch.testing.assert_close(out[i][changed[i]], x[i].mean().expand(int(changed[i].sum())))


def test_masks_are_seeded() -> None:
    x = torch.randn(8, 1, 20, 20, generator=_gen(14))
    masks = SpecAugment(freq_masks=2, freq_width=6, time_masks=2, time_width=6)
    assert torch.equal(masks(x, _gen(15)), masks(x, _gen(15)))
    assert not torch.equal(masks(x, _gen(15)), masks(x, _gen(16)))


# --- TimeRoll --------------------------------------------------------------------------------


def test_roll_on_waveforms_is_a_per_sample_circular_shift_within_the_limit() -> None:
    x = torch.randn(64, 100, generator=_gen(17))
    out = TimeRoll(max_shift=7)(x, _gen(18))
    shifts = []
    for row_in, row_out in zip(x, out):
        assert torch.equal(row_in.sort().values, row_out.sort().values)  # a permutation of the values
        matches = [s for s in range(-7, 8) if torch.equal(torch.roll(row_in, s), row_out)]
        assert len(matches) == 1
        shifts.append(matches[0])
    assert set(shifts) == set(range(-7, 8))  # every shift in range occurs


def test_roll_on_spectrograms_shifts_all_bins_of_a_sample_together() -> None:
    x = torch.randn(10, 1, 6, 40, generator=_gen(19))
    out = TimeRoll(max_shift=20)(x, _gen(20))
    for row_in, row_out in zip(x, out):
        assert any(torch.equal(torch.roll(row_in, s, dims=-1), row_out) for s in range(-20, 21))
    assert torch.equal(out, TimeRoll(max_shift=20)(x, _gen(20)))
    assert torch.equal(TimeRoll(max_shift=0)(x, _gen(21)), x)
