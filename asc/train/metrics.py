"""Classification metrics for acoustic scenes, computed one way for every split and command.

DCASE reports accuracy, macro (class-wise) accuracy and multi-class log loss, overall and per
recording device, with devices grouped into real (a, b, c), seen simulated (s1–s3) and unseen
simulated (s4–s6). Everything here works on numpy arrays so that the torch-free runtime and the
training loop share it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.special import log_softmax

from asc.data.clips import DEVICE_GROUPS, device_vocabulary

#: Probabilities are clipped like scikit-learn's log_loss so one confident mistake stays finite.
LOG_LOSS_EPS = 1e-15


@dataclass(frozen=True)
class Score:
    """Accuracy and log loss of a subset of clips."""

    n: int
    accuracy: float
    log_loss: float


@dataclass
class Metrics:
    """Everything a report shows about one evaluated split."""

    n: int
    accuracy: float
    macro_accuracy: float
    log_loss: float
    per_device: dict[str, Score] = field(default_factory=dict)
    per_class: dict[str, Score] = field(default_factory=dict)
    per_group: dict[str, Score] = field(default_factory=dict)
    class_by_device: dict[str, dict[str, float]] = field(default_factory=dict)
    confusion: list[list[int]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """The flat numbers logged per epoch."""
        flat = {"accuracy": self.accuracy, "macro_accuracy": self.macro_accuracy, "log_loss": self.log_loss}
        for group, score in self.per_group.items():
            flat[f"accuracy_{group}"] = score.accuracy
        return flat

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Metrics:
        """Inverse of :meth:`to_dict` (e.g. for the ``metrics`` of a ``report.json``)."""
        scores = {key: {name: Score(**score) for name, score in data[key].items()}
                  for key in ("per_device", "per_class", "per_group")}
        return cls(**{**data, **scores})


def _score(log_probs: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> Score:
    n = int(mask.sum())
    if n == 0:
        return Score(0, float("nan"), float("nan"))
    lp, y = log_probs[mask], labels[mask]
    accuracy = float((lp.argmax(axis=1) == y).mean())
    true_lp = np.log(np.clip(np.exp(lp[np.arange(n), y]), LOG_LOSS_EPS, 1.0))
    return Score(n, accuracy, float(-true_lp.mean()))


def compute_metrics(logits: np.ndarray, labels: Sequence[int] | np.ndarray, devices: Sequence[str],
                    label_names: Sequence[str]) -> Metrics:
    """Metrics of ``logits`` (n, classes) against integer ``labels`` with each clip's ``device``.

    Macro accuracy is the mean of per-class recalls over the classes present, which is what DCASE
    2024/25 rank by. Device groups are reported only for groups with clips.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    devices_arr = np.asarray(devices, dtype=object)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) != len(devices_arr):
        raise ValueError(f"shape mismatch: logits {logits.shape}, {len(labels)} labels, {len(devices_arr)} devices")
    log_probs = log_softmax(logits, axis=1)
    everything = np.ones(len(labels), dtype=bool)
    overall = _score(log_probs, labels, everything)

    per_class = {name: _score(log_probs, labels, labels == k) for k, name in enumerate(label_names)}
    present = [s.accuracy for s in per_class.values() if s.n > 0]
    macro = float(np.mean(present)) if present else float("nan")

    device_names = device_vocabulary(devices_arr.tolist())
    per_device = {d: _score(log_probs, labels, devices_arr == d) for d in device_names}
    per_group = {}
    for group, members in DEVICE_GROUPS.items():
        mask = np.isin(devices_arr, members)
        if mask.any():
            per_group[group] = _score(log_probs, labels, mask)

    predictions = log_probs.argmax(axis=1)
    confusion = np.zeros((len(label_names), len(label_names)), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    class_by_device = {
        name: {d: _score(log_probs, labels, (labels == k) & (devices_arr == d)).accuracy for d in device_names}
        for k, name in enumerate(label_names)
    }
    return Metrics(
        n=overall.n, accuracy=overall.accuracy, macro_accuracy=macro, log_loss=overall.log_loss,
        per_device=per_device, per_class=per_class, per_group=per_group,
        class_by_device=class_by_device, confusion=confusion.tolist(), labels=list(label_names),
    )
