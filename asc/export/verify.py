"""Checks every exported model must pass before it ships.

A file that loads is not a file that works: the exporter, the quantizer and onnxruntime's
integer kernels each change numbers a little, and an int8 graph whose convs were not fused runs
float with extra conversions. So every export gets (reference/compression.md §3.4):

* ``onnx.checker`` and an onnxruntime session;
* parity on held-out clips of the run's eval split: max |Δlogit| and top-1 agreement against
  the model it was made from, and accuracy overall and per device group for each model;
* a fusion census: how many convs onnxruntime really runs as ``QLinearConv``;
* a gate: an int8 model that changes too many decisions is refused unless forced.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from tqdm import tqdm

from asc.data.loader import ArraySource
from asc.errors import AscError
from asc.export.onnx import ort_session
from asc.onnx_graph import tensor_producers
from asc.train.metrics import Metrics, compute_metrics

DEFAULT_MIN_AGREEMENT = 0.99


# ---------------------------------------------------------------------------------------------
# Held-out clips


@dataclass(frozen=True)
class ClipSample:
    """Some clips of a split, read lazily in batches, with what accuracy needs.

    Inputs stay in their (memory-mapped) source: a few hundred 10-s waveforms would not fit in
    memory at once.
    """

    source: ArraySource
    indices: np.ndarray
    targets: np.ndarray
    devices: list[str]
    labels: list[str]
    split: str
    batch_size: int = 32

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self.indices), self.batch_size):
            rows = self.indices[start:start + self.batch_size]
            yield np.stack([np.asarray(self.source[int(i)], dtype=np.float32) for i in rows])


def onnx_outputs(path: Path, clips: ClipSample, *, desc: str, progress: bool = False) -> np.ndarray:
    session = ort_session(path)
    name = session.get_inputs()[0].name
    total = -(-len(clips) // clips.batch_size)
    return np.concatenate([session.run(None, {name: batch})[0] for batch in
                           tqdm(clips.batches(), total=total, desc=desc, leave=False, disable=not progress)])


@torch.no_grad()
def torch_outputs(module: nn.Module, clips: ClipSample, *, desc: str, progress: bool = False) -> np.ndarray:
    total = -(-len(clips) // clips.batch_size)
    return np.concatenate([module(torch.from_numpy(batch)).float().numpy() for batch in
                           tqdm(clips.batches(), total=total, desc=desc, leave=False, disable=not progress)])


# ---------------------------------------------------------------------------------------------
# Comparisons


@dataclass(frozen=True)
class Agreement:
    """How closely ``candidate``'s logits follow ``reference``'s on the same clips."""

    reference: str
    candidate: str
    clips: int
    top1_agreement: float
    max_abs_diff: float
    median_abs_diff: float  #: median over clips of the clip's largest |Δlogit|
    reference_scale: float  #: largest |reference logit|, to read the differences against

    @property
    def name(self) -> str:
        return f"{self.candidate} vs {self.reference}"


def compare_logits(reference: np.ndarray, candidate: np.ndarray, *, reference_name: str,
                   candidate_name: str) -> Agreement:
    if reference.shape != candidate.shape:
        raise AscError(f"{candidate_name}: logits of shape {candidate.shape}, {reference_name} gave "
                       f"{reference.shape}; the export is broken")
    per_clip = np.abs(candidate.astype(np.float64) - reference).max(axis=1)
    return Agreement(reference_name, candidate_name, len(reference),
                     top1_agreement=float((candidate.argmax(1) == reference.argmax(1)).mean()),
                     max_abs_diff=float(per_clip.max()), median_abs_diff=float(np.median(per_clip)),
                     reference_scale=float(np.abs(reference).max()))


def accuracy_summary(metrics: Metrics) -> dict[str, Any]:
    """The numbers a bundle reports about one model: overall, per device group, per device."""
    return {"n": metrics.n, "accuracy": metrics.accuracy, "macro_accuracy": metrics.macro_accuracy,
            "log_loss": metrics.log_loss,
            "per_group": {group: score.accuracy for group, score in metrics.per_group.items()},
            "per_device": {device: score.accuracy for device, score in metrics.per_device.items()}}


def model_accuracy(logits: np.ndarray, clips: ClipSample) -> dict[str, Any]:
    return accuracy_summary(compute_metrics(logits, clips.targets, clips.devices, clips.labels))


# ---------------------------------------------------------------------------------------------
# File checks and fusion census


def check_model(path: Path) -> None:
    """The full ONNX checker (not for ORT-format files) and an onnxruntime session, as one clear error."""
    if path.suffix != ".ort":
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
            raise AscError(f"{path}: not valid ONNX ({str(error).splitlines()[0]}); the export is broken") \
                from None
    try:
        ort_session(path)
    except Exception as error:  # noqa: BLE001 -- onnxruntime's load errors share no base class
        raise AscError(f"{path}: onnxruntime cannot load it ({' '.join(str(error).split())[:300]}); "
                       "the export is broken") from None


@dataclass(frozen=True)
class FusionCensus:
    """Convs in a file and the op types onnxruntime runs after its full graph optimization.

    ``quantized_convs`` are the convs whose weight arrives through ``DequantizeLinear``: the ones
    meant to run in int8. Each that ORT did not fuse runs as a float conv between conversions.
    """

    op_counts: dict[str, int]
    convs: int = 0
    quantized_convs: int = 0

    @property
    def qlinear_convs(self) -> int:
        return self.op_counts.get("QLinearConv", 0)

    @property
    def float_convs(self) -> int:
        return self.op_counts.get("Conv", 0) + self.op_counts.get("FusedConv", 0)


def fusion_census(path: str | Path) -> FusionCensus:
    """Which ops ORT actually runs: a conv that did not become ``QLinearConv`` runs in float."""
    graph = onnx.load(str(path)).graph
    producers = {output: node.op_type for output, node in tensor_producers(graph).items()}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    quantized = sum(producers.get(node.input[1]) == "DequantizeLinear" for node in convs)
    with tempfile.TemporaryDirectory(prefix="asc-census-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        ort_session(Path(path), optimized_path=optimized)
        nodes = onnx.load(str(optimized)).graph.node
    return FusionCensus(dict(Counter(node.op_type for node in nodes)), len(convs), quantized)


# ---------------------------------------------------------------------------------------------
# The parity report and its gate


@dataclass(frozen=True)
class Candidate:
    """An exported file to check, against the model it was made from."""

    name: str
    path: Path
    reference: str


@dataclass(frozen=True)
class ParityGate:
    """Top-1 agreement of the deployed model with the model it was made from, and the bar."""

    comparison: str
    agreement: float
    min_agreement: float
    forced: bool

    @property
    def passed(self) -> bool:
        return self.agreement >= self.min_agreement


@dataclass(frozen=True)
class ParityReport:
    """Everything measured about one export (written as ``parity.json``)."""

    split: str
    clips: int
    comparisons: list[Agreement]
    accuracy: dict[str, dict[str, Any]]  #: per model name ("torch", "onnx_fp32", "onnx_int8", …)
    census: FusionCensus
    gate: ParityGate
    frontend_max_abs_diff: float | None = None  #: in-graph front end vs torch LogMel, log-mel units
    notes: list[str] = field(default_factory=list)

    def comparison(self, candidate: str) -> Agreement:
        return next(c for c in self.comparisons if c.candidate == candidate)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["census"] = {**data["census"], "qlinear_convs": self.census.qlinear_convs,
                          "float_convs": self.census.float_convs}
        data["gate"]["passed"] = self.gate.passed
        return data


def measure_parity(reference: nn.Module, candidates: Sequence[Candidate], clips: ClipSample, *,
                   deployed: str, min_agreement: float = DEFAULT_MIN_AGREEMENT, force: bool = False,
                   frontend: tuple[nn.Module, Path] | None = None, progress: bool = False,
                   notes: Sequence[str] = (), known: Mapping[str, np.ndarray] | None = None) -> ParityReport:
    """Run the torch ``reference`` and every candidate on ``clips`` and compare them.

    Each candidate is compared with its own reference (``"torch"`` or another candidate's
    name), so an int8 file is judged against the fp32 file it was quantized from, not against
    the exporter's differences too. ``deployed`` names the candidate the gate and the census
    are about. ``frontend`` is a torch front end and its ONNX file, compared on the raw clips.
    ``known`` holds candidates' logits on these clips that were already computed (not rerun).
    """
    for candidate in candidates:
        check_model(candidate.path)
    logits = {"torch": torch_outputs(reference, clips, desc="parity torch", progress=progress)}
    for candidate in candidates:
        if known is not None and candidate.name in known:
            logits[candidate.name] = known[candidate.name]
            continue
        logits[candidate.name] = onnx_outputs(candidate.path, clips, desc=f"parity {candidate.name}",
                                             progress=progress)
    comparisons = [compare_logits(logits[c.reference], logits[c.name], reference_name=c.reference,
                                  candidate_name=c.name) for c in candidates]
    gated = next(c for c in comparisons if c.candidate == deployed)
    return ParityReport(
        split=clips.split, clips=len(clips), comparisons=comparisons,
        accuracy={name: model_accuracy(values, clips) for name, values in logits.items()},
        census=fusion_census(next(c.path for c in candidates if c.name == deployed)),
        gate=ParityGate(gated.name, gated.top1_agreement, min_agreement, force),
        frontend_max_abs_diff=None if frontend is None else largest_difference(*frontend, clips),
        notes=list(notes))


@torch.no_grad()
def largest_difference(module: nn.Module, path: Path, clips: ClipSample) -> float:
    """Max |torch - ONNX| over every output value, batch by batch (log-mels are large)."""
    session = ort_session(path)
    name = session.get_inputs()[0].name
    return max(float(np.abs(module(torch.from_numpy(batch)).numpy() - session.run(None, {name: batch})[0]).max())
               for batch in clips.batches())


def enforce_gate(report: ParityReport, bundle: Path, *, advice: str) -> None:
    """Refuse an export whose deployed model disagrees with its source too often (unless forced)."""
    gate = report.gate
    if gate.passed or gate.forced:
        return
    raise AscError(f"{bundle}: top-1 agreement {gate.comparison} is {gate.agreement:.1%} on {report.clips} "
                   f"held-out clips, below the {gate.min_agreement * 100:g}% gate; {advice}")

