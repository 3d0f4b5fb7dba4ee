"""Reports of an evaluated model: ``report.json``, ``report.md`` and PNG plots.

The JSON holds every number; the Markdown is what a researcher pastes into a paper draft: overall
scores, device groups (real / seen / unseen), per device, per class and the class × device table.
Plots need matplotlib (the ``plot`` extra); without it the report says so and skips them.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from asc import __version__
from asc.data.clips import UNKNOWN_DEVICE
from asc.io import atomic_path, atomic_write_json, atomic_write_text, make_dir
from asc.train.metrics import Metrics, Score


def without_unknown_devices(metrics: Metrics) -> Metrics:
    """``metrics`` without per-device scores when no clip named its device.

    A collection without devices (a CSV without a device column, a folder tree) would otherwise
    get a device table and plot with one "unknown" row that only repeats the overall score.
    """
    if set(metrics.per_device) <= {UNKNOWN_DEVICE}:
        return replace(metrics, per_device={}, class_by_device={})
    return metrics


def _pct(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _loss(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3f}"


def _score_table(title: str, scores: dict[str, Score]) -> list[str]:
    lines = [f"### {title}", "", "| | clips | accuracy % | log loss |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {s.n} | {_pct(s.accuracy)} | {_loss(s.log_loss)} |" for name, s in scores.items()]
    return lines + [""]


def metrics_markdown(metrics: Metrics, title: str = "Evaluation") -> str:
    """The tables of one evaluated split as Markdown."""
    lines = [f"## {title}", "",
             f"{metrics.n} clips · accuracy **{_pct(metrics.accuracy)} %** · macro accuracy "
             f"{_pct(metrics.macro_accuracy)} % · log loss {_loss(metrics.log_loss)}", ""]
    metrics = without_unknown_devices(metrics)
    if metrics.per_group:
        lines += _score_table("Device groups", metrics.per_group)
    if metrics.per_device:
        lines += _score_table("Per device", metrics.per_device)
    lines += _score_table("Per class", metrics.per_class)
    devices = list(metrics.per_device)
    if not devices:
        return "\n".join(lines)
    lines += ["### Accuracy % by class and device", "",
              "| class | " + " | ".join(devices) + " |", "|---|" + "---:|" * len(devices)]
    for label, row in metrics.class_by_device.items():
        lines.append(f"| {label} | " + " | ".join(_pct(row[d]) for d in devices) + " |")
    return "\n".join(lines) + "\n"


def _history_markdown(history: list[dict[str, Any]]) -> str:
    if not history:
        return ""
    lines = ["## Training", "", "| epoch | train loss | accuracy % | log loss |", "|---:|---:|---:|---:|"]
    lines += [f"| {h['epoch']} | {h['train_loss']:.4f} | {_pct(h['accuracy'])} | {_loss(h['log_loss'])} |"
              for h in history]
    return "\n".join(lines) + "\n"


def write_plots(metrics: Metrics, out_dir: Path) -> list[str]:
    """Confusion matrix and per-device accuracy PNGs; returns the file names written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return []
    written = []
    confusion = np.asarray(metrics.confusion, dtype=float)
    rows = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(metrics.labels)), metrics.labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(metrics.labels)), metrics.labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(metrics.labels)):
        for j in range(len(metrics.labels)):
            if confusion[i, j]:
                ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if normalised[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, label="fraction of true class")
    ax.set_title(f"Confusion matrix (accuracy {_pct(metrics.accuracy)} %)")
    fig.tight_layout()
    written.append(_save(fig, out_dir / "confusion.png"))

    devices = list(without_unknown_devices(metrics).per_device)
    if not devices:
        plt.close("all")
        return written
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(devices) + 2), 3.5))
    values = [100 * metrics.per_device[d].accuracy for d in devices]
    ax.bar(devices, values, color="#4c72b0")
    ax.axhline(100 * metrics.accuracy, color="black", linestyle="--", linewidth=1, label="overall")
    ax.set_ylabel("accuracy %")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right")
    ax.set_title("Accuracy per device")
    fig.tight_layout()
    written.append(_save(fig, out_dir / "per_device.png"))
    plt.close("all")
    return written


def _save(fig: Any, path: Path) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return path.name


def write_report(out_dir: Path, metrics: Metrics, *, history: list[dict[str, Any]] | None = None,
                 config: Any = None, extra: dict[str, Any] | None = None, title: str = "Evaluation") -> None:
    """Write ``report.json``, ``report.md`` and the plots into ``out_dir``."""
    from asc.config import to_dict

    out_dir = make_dir(out_dir)
    metrics = without_unknown_devices(metrics)
    plots = write_plots(metrics, out_dir)
    payload = {"asc_version": __version__, "metrics": metrics.to_dict(), **(extra or {}),
               "history": history or [], "plots": plots}
    if config is not None:
        payload["config"] = to_dict(config)
    atomic_write_json(out_dir / "report.json", payload)
    notes = [f"# Report: {out_dir.name}", ""]
    if extra:
        notes += [f"- {key}: {value}" for key, value in extra.items()] + [""]
    if plots:
        notes += [f"![{name}]({name})" for name in plots] + [""]
    else:
        notes += ["(plots skipped: install the `plot` extra for matplotlib)", ""]
    atomic_write_text(out_dir / "report.md", "\n".join(notes) + "\n" + metrics_markdown(metrics, title) + "\n"
                      + _history_markdown(history or []))
