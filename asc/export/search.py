"""Accuracy-aware int8: the calibration that agrees best, and the fewest activations kept float.

Why (docs/export-latency.md §6): the planned post-training int8 of a trained BC-ResNet-Mod
flipped 1-2 % of the decisions, and the only *group* move that reached the 99 % gate (every
residual add float) cost most of the int8 speed-up. The flips come from a few activations, not
from a whole op type, so the search works per quantized activation tensor:

1. quantize under the plan once per calibration method (min-max, percentile, entropy) and keep
   the one whose top-1 agreement with fp32 on the *search clips* is highest;
2. if it misses the bar, rank every quantized activation and weight by how much of the
   *flip loss* (how far the search clips with the smallest fp32 margins moved toward another
   decision) disappears when that tensor alone is not quantized (the Q/DQ float simulation, so
   the ranking does not depend on the CPU's int8 kernels; group testing keeps it to ~3 sqrt(n)
   simulations);
3. greedily keep float, one at a time, the short-listed tensor that lowers the int8 file's flip
   loss on all search clips most (real kernels) without losing agreement, until it reaches the
   bar or no tensor helps.

An activation kept float loses its rounding and clipping (its readers run as float ops on
dequantized weights); a weight kept float is read as its fp32 value. The search clips must not be the clips the gate is
measured on; the exporter takes them from the eval split outside its parity sample.
"""

from __future__ import annotations

import tempfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from asc.errors import ConfigError
from asc.export.onnx import CALIBRATIONS, ort_session, save_onnx
from asc.export.precision import (
    PrecisionPlan,
    quantize_planned,
    rewrite_for_int8,
    session_logits,
)
from asc.onnx_graph import graph_constants, prune_dead_nodes, tensor_consumers

# ---------------------------------------------------------------------------------------------
# Quantized activations and keeping some of them float


def quantized_activations(model: onnx.ModelProto) -> list[str]:
    """Float tensors that a QuantizeLinear turns into uint8 activations, in graph order.

    Weights (initializers) and Q/DQ pairs whose dequantized value is a graph output are left
    out: the first are not activations and the second cannot be bypassed without renaming the
    output.
    """
    graph = model.graph
    constants = {init.name for init in graph.initializer}
    outputs = {output.name for output in graph.output}
    consumers = tensor_consumers(graph)
    found = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in constants:
            continue
        dequants = consumers.get(node.output[0], [])
        if dequants and all(d.op_type == "DequantizeLinear" and d.output[0] not in outputs for d in dequants):
            found.append(node.input[0])
    return list(dict.fromkeys(found))


def quantized_weights(model: onnx.ModelProto, float_values: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Int8 weights whose float value is known: original weight name -> its DequantizeLinear output.

    onnxruntime's quantizer stores weight ``W`` as ``W_quantized``; ``float_values`` are the
    constants of the float graph it quantized (shapes must match).
    """
    constants = {init.name: init for init in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        init = constants.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if init is None or init.data_type != onnx.TensorProto.INT8 or not init.name.endswith(_WEIGHT_SUFFIX):
            continue
        name = init.name[:-len(_WEIGHT_SUFFIX)]
        value = float_values.get(name)
        if value is not None and value.shape == tuple(init.dims) and _rounds_to(node, constants, value):
            found[name] = node.output[0]
    return found


def _rounds_to(dequant: onnx.NodeProto, constants: dict[str, onnx.TensorProto], value: np.ndarray) -> bool:
    """Whether the DequantizeLinear of an int8 weight is ``value`` up to half a step: the same weight."""
    q = onnx.numpy_helper.to_array(constants[dequant.input[0]]).astype(np.float64)
    scale = onnx.numpy_helper.to_array(constants[dequant.input[1]]).astype(np.float64)
    zero = (onnx.numpy_helper.to_array(constants[dequant.input[2]]).astype(np.float64)
            if len(dequant.input) > 2 and dequant.input[2] in constants else np.zeros_like(scale))
    if scale.ndim == 1 and q.ndim > 1:
        axis = next((a.i for a in dequant.attribute if a.name == "axis"), 1) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return bool(np.all(np.abs((q - zero) * scale - value) <= 0.5001 * scale + 1e-7))


_WEIGHT_SUFFIX = "_quantized"


def keep_float(model: onnx.ModelProto, tensors: Collection[str],
               float_values: Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A copy of a QDQ model in which ``tensors`` skip their quantization.

    An activation skips its QuantizeLinear -> DequantizeLinear pair: its readers read the float
    tensor, so onnxruntime runs them as float ops. A weight (named as in the float graph, whose
    constants ``float_values`` holds) is read as its float value instead of its dequantized int8
    one. Nothing else changes.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    float_values = float_values or {}
    weights = quantized_weights(model, float_values)
    wanted = set(tensors)
    unknown = wanted - set(quantized_activations(model)) - set(weights)
    if unknown:
        raise ConfigError(f"tensors to keep float are not quantized activations or weights of the model: "
                          f"{sorted(unknown)[:5]}")
    consumers = tensor_consumers(graph)
    constants = {init.name: init for init in graph.initializer}
    alias: dict[str, str] = {}
    for name in wanted & set(weights):
        float_name = f"{name}.asc_float"
        graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(float_values[name], np.float32), float_name))
        alias[weights[name]] = float_name
    relus: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in wanted:
            value = node.input[0]
            if _clamps_at_zero(constants.get(node.input[2]) if len(node.input) > 2 else None):
                value = f"{node.input[0]}.asc_float_relu"
                relus.append(onnx.helper.make_node("Relu", [node.input[0]], [value], name=value))
            for dequant in consumers[node.output[0]]:
                alias[dequant.output[0]] = value
    for node in graph.node:
        node.input[:] = [alias.get(name, name) for name in node.input]
    nodes = list(graph.node)
    for relu in relus:  # right after the node that makes its input: the graph stays sorted
        at = next((i + 1 for i, n in enumerate(nodes) if relu.input[0] in n.output), 0)
        nodes.insert(at, relu)
    del graph.node[:]
    graph.node.extend(nodes)
    prune_dead_nodes(graph)  # the bypassed Q/DQ nodes feed nothing now
    return model


def _clamps_at_zero(zero_point: onnx.TensorProto | None) -> bool:
    """Whether a QuantizeLinear clamps negatives to zero (its zero point is the type's minimum).

    onnxruntime's quantizer drops a Relu (or Clip at 0) in front of such a quantizer because the
    clamp does its work; a bypassed pair must put that Relu back.
    """
    if zero_point is None:
        return True  # the default zero point is uint8 0
    value = onnx.numpy_helper.to_array(zero_point)
    return bool(np.all(value == np.iinfo(value.dtype).min))


def _describe(model: onnx.ModelProto, tensor: str, weights: Mapping[str, str]) -> tuple[str, tuple[str, ...]]:
    """``op:name`` of the node that makes ``tensor`` and of the ops that read it (through its Q/DQ)."""
    graph = model.graph
    consumers = tensor_consumers(graph)
    if tensor in weights:
        return "weight", tuple(f"{n.op_type}:{n.name}" for n in consumers.get(weights[tensor], []))
    producer = next((f"{n.op_type}:{n.name}" for n in graph.node if tensor in n.output), "input")
    readers: list[str] = []
    for q in consumers.get(tensor, []):
        for dq in consumers.get(q.output[0], []) if q.op_type == "QuantizeLinear" else []:
            readers.extend(f"{n.op_type}:{n.name}" for n in consumers.get(dq.output[0], []))
    return producer, tuple(readers)


# ---------------------------------------------------------------------------------------------
# The search


@dataclass(frozen=True)
class FloatTensor:
    """A tensor the search kept float, and why: the share of the decision error it alone removed."""

    tensor: str  #: name in the int8 graph before its names were compacted
    producer: str  #: ``op:node`` that computes it
    readers: tuple[str, ...]  #: ``op:node``s that now read it in float
    error_removed: float  #: share of the low-margin search clips' flip loss (Q/DQ simulation) it removed alone


@dataclass(frozen=True)
class SearchReport:
    """What :func:`search_int8` tried and chose; stored in ``bundle.json`` (``source.int8_search``)."""

    plan: PrecisionPlan  #: the plan with the chosen calibration
    calibrations: dict[str, float]  #: top-1 agreement on the search clips per calibration, nothing float
    float_tensors: tuple[FloatTensor, ...]
    candidates: int  #: quantized activations and weights of the chosen file before any was kept float
    search_clips: int
    agreement: float  #: of the written file on the search clips
    steps: tuple[tuple[int, float], ...]  #: (activations kept float, agreement) in the order tried
    min_agreement: float

    @property
    def reached(self) -> bool:
        return self.agreement >= self.min_agreement

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["plan"] = self.plan.to_dict()
        data["steps"] = [list(step) for step in self.steps]
        data["reached"] = self.reached
        return data

    def format(self) -> str:
        calibrations = ", ".join(f"{name} {value:.1%}" for name, value in self.calibrations.items())
        lines = [(f"int8 search on {self.search_clips} clips (bar {self.min_agreement:.1%}): {calibrations}; "
                  f"chose {self.plan.calibration}"),
                 (f"  {len(self.float_tensors)} of {self.candidates} tensors kept float -> "
                  f"{self.agreement:.2%} ({'reached' if self.reached else 'missed'})")]
        lines.extend(f"  float {t.tensor} ({t.producer} -> {', '.join(t.readers) or '-'}): removed "
                     f"{t.error_removed:.1%} of the flip loss" for t in self.float_tensors)
        return "\n".join(lines)


def search_int8(fp32_path: str | Path, out_path: str | Path, calibration: Sequence[np.ndarray],
                search_inputs: np.ndarray, *, plan: PrecisionPlan | None = None,
                calibrations: Sequence[str] = CALIBRATIONS, min_agreement: float = 0.99, max_float: int = 12,
                sensitivity_clips: int = 32, expand_groups: int = 3, shortlist_size: int = 4,
                float_nodes: Collection[str] = ()) -> SearchReport:
    """Write the int8 file of ``fp32_path`` that reaches ``min_agreement`` on ``search_inputs``
    with the fewest activations kept float (module docstring), and say what it did.

    ``calibration`` is a sequence of input batches (it is read once per calibration method);
    ``plan`` gives the rewrites and float groups (default :class:`PrecisionPlan`), its calibration
    is replaced by the best of ``calibrations``, tried in order until one reaches the bar. When no file reaches the bar with ``max_float``
    activations float, the one that agreed best is written and the report says it missed.
    """
    if not 0.0 <= min_agreement <= 1.0:
        raise ConfigError(f"min_agreement must be in [0, 1], got {min_agreement}")
    unknown = sorted(set(calibrations) - set(CALIBRATIONS))
    if unknown or not calibrations:
        raise ConfigError(f"calibrations must be some of {', '.join(CALIBRATIONS)}, got {list(calibrations)}")
    if len(search_inputs) < 1 or len(calibration) < 1:
        raise ConfigError("search_int8 needs at least one calibration batch and one search clip")
    plan = plan or PrecisionPlan()
    search_inputs = np.ascontiguousarray(search_inputs, dtype=np.float32)
    reference = session_logits(ort_session(fp32_path), search_inputs)
    with tempfile.TemporaryDirectory(prefix="asc-search-") as tmp:
        scratch = Path(tmp)

        def logits(model: onnx.ModelProto, *, fused: bool = True, rows: np.ndarray | None = None) -> np.ndarray:
            path = scratch / "candidate.onnx"
            onnx.save_model(model, str(path))
            inputs = search_inputs if rows is None else search_inputs[rows]
            return session_logits(ort_session(path, fused=fused), inputs)

        def agreement(model: onnx.ModelProto) -> float:
            return float((logits(model).argmax(1) == reference.argmax(1)).mean())

        quantized: dict[str, onnx.ModelProto] = {}
        scores: dict[str, float] = {}
        for method in calibrations:
            path = quantize_planned(fp32_path, scratch / f"{method}.onnx", calibration,
                                    replace(plan, calibration=method), float_nodes=float_nodes)  # type: ignore[arg-type]
            quantized[method] = onnx.load(str(path))
            scores[method] = agreement(quantized[method])
            if scores[method] >= min_agreement:
                break  # the listed order is the preference: min-max first, it keeps every outlier in range
        best = max(scores, key=lambda m: scores[m])  # the first listed wins a tie
        model, plan = quantized[best], replace(plan, calibration=best)  # type: ignore[arg-type]
        values = graph_constants(rewrite_for_int8(onnx.load(str(fp32_path)), plan.rewrites)[0].graph)
        weights = quantized_weights(model, values)
        candidates = [*quantized_activations(model), *weights]
        steps = [(0, scores[best])]
        chosen: list[str] = []
        ranked: list[tuple[str, float]] = []
        if scores[best] < min_agreement and candidates:
            ranked = _rank(model, candidates, values, reference, sensitivity_clips, expand_groups, logits)
            # (flip loss, agreement): the continuous loss decides, so that one search clip crossing
            # over does not pick a tensor that moves the unseen clips the wrong way
            current = (_flip_loss(logits(model), reference), scores[best])
            while len(chosen) < max_float and current[1] < min_agreement:
                tried = {}
                for name in [name for name, _ in ranked if name not in chosen][:shortlist_size]:
                    candidate = logits(keep_float(model, [*chosen, name], values))
                    tried[name] = (_flip_loss(candidate, reference),
                                   float((candidate.argmax(1) == reference.argmax(1)).mean()))
                better = {n: t for n, t in tried.items() if t[0] < current[0] and t[1] >= current[1]}
                if not better:
                    break  # no short-listed tensor brings the file closer to fp32's decisions
                name = min(better, key=lambda n: better[n][0])
                chosen.append(name)
                current = better[name]
                steps.append((len(chosen), current[1]))
        final = keep_float(model, chosen, values)
        final_agreement = steps[-1][1]
        save_onnx(final, out_path)
    removed = dict(ranked)
    described = tuple(FloatTensor(name, *_describe(model, name, weights), error_removed=removed.get(name, 0.0))
                      for name in chosen)
    return SearchReport(plan, scores, described, len(candidates), len(search_inputs), final_agreement,
                        tuple(steps), min_agreement)


def _rank(model: onnx.ModelProto, candidates: list[str], values: Mapping[str, np.ndarray], reference: np.ndarray,
          clips: int, expand: int, logits: Any) -> list[tuple[str, float]]:
    """Candidates by the share of :func:`_flip_loss` (Q/DQ simulation, on the ``clips`` search
    clips with the smallest fp32 top-1 margin) that disappears when each alone stays float.

    Group testing keeps it to ~3 sqrt(n) simulations instead of n: the candidates (in graph
    order, so a group is a stretch of the network) are cut into ~sqrt(n) groups, each group is
    measured float as a whole, and only the members of the ``expand`` groups that removed most
    error are measured one by one. Quantization errors of different tensors add up nearly
    independently, so a tensor that matters lifts its group.
    """
    ordered = np.sort(reference, axis=1)
    rows = np.argsort(ordered[:, -1] - ordered[:, -2])[:max(1, clips)]
    target = reference[rows]

    def gain(names: list[str]) -> float:
        return (base - _flip_loss(logits(keep_float(model, names, values), fused=False, rows=rows), target)) / base

    base = _flip_loss(logits(model, fused=False, rows=rows), target)
    if base <= 0.0:
        return []
    size = max(1, int(np.ceil(np.sqrt(len(candidates)))))
    groups = [candidates[i:i + size] for i in range(0, len(candidates), size)]
    if len(groups) > 1:
        groups = sorted(groups, key=lambda group: -gain(group))[:expand]
    members = [(name, gain([name])) for group in groups for name in group]
    return sorted((m for m in members if m[1] > 0.0), key=lambda m: -m[1])


def _flip_loss(candidate: np.ndarray, reference: np.ndarray) -> float:
    """How far ``candidate`` is from flipping, or past flipping, fp32's decisions: the mean over
    clips of how much fp32's top class fell behind the best other class, relative to fp32's own
    lead, counted from half of that lead on. Zero when every clip keeps at least half its margin;
    unlike the squared logit error it ignores drift that cannot change a decision."""
    rows = np.arange(len(reference))
    top = reference.argmax(1)
    others = reference.astype(np.float64).copy()
    others[rows, top] = -np.inf
    lead = reference[rows, top] - others.max(1)  # fp32's own margin
    moved = candidate.astype(np.float64)
    rival = moved.copy()
    rival[rows, top] = -np.inf
    kept = moved[rows, top] - rival.max(1)
    scale = float(np.median(lead)) + 1e-12
    return float(np.maximum(0.0, 0.5 * lead - kept).mean() / scale)
