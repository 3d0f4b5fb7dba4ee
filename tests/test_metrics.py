from __future__ import annotations

import math

import numpy as np
import pytest

from asc.train.metrics import compute_metrics

LABELS = ["airport", "bus", "park"]


def test_known_values():
    # three clips, all predicted class 0 with probability 0.5 / 0.25 / 0.25
    logits = np.log(np.array([[0.5, 0.25, 0.25]] * 3))
    labels = [0, 1, 0]
    metrics = compute_metrics(logits, labels, ["a", "s4", "b"], LABELS)
    assert metrics.accuracy == pytest.approx(2 / 3)
    # macro: airport 2/2 correct, bus 0/1; park absent → mean over present classes
    assert metrics.macro_accuracy == pytest.approx(0.5)
    assert metrics.log_loss == pytest.approx(-(math.log(0.5) * 2 + math.log(0.25)) / 3)
    assert metrics.per_device["s4"].accuracy == 0.0
    assert metrics.per_group["real"].n == 2 and metrics.per_group["real"].accuracy == 1.0
    assert "seen" not in metrics.per_group
    assert metrics.confusion == [[2, 0, 0], [1, 0, 0], [0, 0, 0]]
    assert metrics.class_by_device["bus"]["s4"] == 0.0
    assert math.isnan(metrics.class_by_device["bus"]["a"])


def test_log_loss_matches_cross_entropy_and_stays_finite():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 3)) * 3
    labels = rng.integers(0, 3, 50)
    metrics = compute_metrics(logits, labels, ["a"] * 50, LABELS)
    shifted = logits - logits.max(1, keepdims=True)
    ce = -(shifted[np.arange(50), labels] - np.log(np.exp(shifted).sum(1))).mean()
    assert metrics.log_loss == pytest.approx(ce, rel=1e-9)
    hopeless = compute_metrics(np.array([[1000.0, -1000.0, -1000.0]]), [1], ["a"], LABELS)
    assert hopeless.log_loss == pytest.approx(-math.log(1e-15))


def test_devices_are_listed_in_dcase_order():
    metrics = compute_metrics(np.zeros((4, 3)), [0, 0, 0, 0], ["s1", "zz", "b", "a"], LABELS)
    assert list(metrics.per_device) == ["a", "b", "s1", "zz"]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        compute_metrics(np.zeros((2, 3)), [0], ["a", "a"], LABELS)


def test_metrics_round_trip_through_a_dict():
    metrics = compute_metrics(np.log(np.array([[0.5, 0.25, 0.25]] * 3)), [0, 1, 0], ["a", "s4", "b"], LABELS)
    again = type(metrics).from_dict(metrics.to_dict())
    assert again.per_device["s4"].accuracy == 0.0 and again.confusion == metrics.confusion
    assert again.to_dict() == metrics.to_dict()


def test_reports_of_collections_without_devices_have_no_device_tables(tmp_path):
    from asc.report import metrics_markdown, without_unknown_devices, write_report

    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]]))
    metrics = compute_metrics(logits, [0, 1, 1], ["unknown"] * 3, LABELS)
    assert list(metrics.per_device) == ["unknown"]
    stripped = without_unknown_devices(metrics)
    assert stripped.per_device == {} and stripped.class_by_device == {} and stripped.accuracy == pytest.approx(2 / 3)
    markdown = metrics_markdown(metrics)
    assert "Per class" in markdown and "device" not in markdown.lower()
    write_report(tmp_path, metrics)
    assert not (tmp_path / "per_device.png").exists()
    assert '"per_device": {}' in (tmp_path / "report.json").read_text()
    # one real device next to unknown ones keeps the table: the unknown row is then information
    mixed = compute_metrics(logits, [0, 1, 1], ["a", "unknown", "unknown"], LABELS)
    assert without_unknown_devices(mixed) is mixed and "| unknown | 2 |" in metrics_markdown(mixed)
