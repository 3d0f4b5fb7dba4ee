"""PPP personalization on a bundle, torch-free: enrolment clips → prototype gates → a smaller bundle.

A gated bundle (:mod:`asc.export.gated`) runs like any bundle, and additionally has one graph
output per channel gate (``gate.<i>``, the 0/1 keep mask of each clip) and ``ppp.json``: for each
gate, the plan that cuts a closed channel out of the ONNX graph exactly (:class:`GatePlan`,
computed here from the graph's structure when the bundle is exported).

:func:`personalize` then does what a phone would, with numpy and onnxruntime only:

1. decode the enrolment recordings, cut them into clip-length windows and compute the model input
   the way :mod:`asc.runtime` does (a bad file is reported and the others are used);
2. run the windows through the gated graph, average each gate's masks over the windows (the user
   prototype) and binarize at 0.5 (a channel open in at least half the windows stays);
3. slice the closed channels out of every initializer the plan names, insert the channel gathers
   it asks for, delete the gates and their outputs (:func:`prune_graph`);
4. check the result against the gated graph with the prototype's masks fixed as constants
   (:func:`fix_gates`) on the enrolment windows, and write an ordinary bundle, atomically.

Plans are found by walking the graph from each gate's ``Mul``: upstream through element-wise ops,
batch norms and per-channel constants to the producing conv (its output rows are removed; a
depthwise producer's input rows are gathered, since that input may feed a residual sum), and
downstream through element-wise ops and pooling to the consuming conv (its input columns are
removed) through ops that keep a zero channel zero. Anything else on the way (a residual sum, a
bias, a graph output) refuses the gate at export.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper
from tqdm import tqdm

from asc.audio import fit_length, load_audio
from asc.bundle_manifest import (
    MANIFEST_NAME,
    PARITY_NAME,
    BundleManifest,
    atomic_dir,
    check_destination,
)
from asc.classify import Failure, find_audio_files
from asc.errors import AscError
from asc.onnx_graph import prune_dead_nodes, tensor_consumers, tensor_producers
from asc.runtime import (
    bundle_frontend,
    input_warnings,
    model_bytes,
    open_session,
    session_options,
    window_starts,
)

PLAN_NAME = "ppp.json"
PLAN_FORMAT = 1
GATE_OUTPUT = "gate.{index}"
THRESHOLD = 0.5
"""A channel stays when it is open in at least this fraction of the enrolment windows."""
MAX_ABS_DIFF = 1e-4
"""Largest |Δlogit| allowed between the pruned graph and the gated graph with the prototype's gates."""

_UNARY = frozenset({"Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus",
                    "Identity", "Clip", "Neg", "Abs", "Exp", "Log", "Sqrt", "Dropout"})
_ZERO_KEEPING = frozenset({"Relu", "LeakyRelu", "Tanh", "Elu", "Selu", "HardSwish", "Identity", "Dropout", "Neg", "Abs"})
"""Element-wise ops with f(0) = 0: a closed (all-zero) channel stays zero through them."""
_ARITHMETIC = frozenset({"Mul", "Add", "Sub", "Div"})
_POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"})
_REDUCES = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum"})
_SHAPE_ONLY = frozenset({"Unsqueeze", "Reshape", "Identity", "Cast", "Expand"})


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Slice:
    """Take the kept channels of input ``input`` of node ``node`` along ``axis``."""

    node: str
    input: int
    axis: int
    consumer: bool = False  #: an input-channel slice of the conv that reads the gated tensor


@dataclass(frozen=True)
class GatePlan:
    """How to remove the closed channels of one gate from the graph, exactly."""

    name: str  #: the gate's module name in the trained model
    output: str  #: graph output holding its ``(batch, channels)`` 0/1 mask
    channels: int
    mul: str  #: the node multiplying the mask into the activation
    activation: str  #: the tensor the mask multiplies (what the gate's consumers read after pruning)
    slices: list[Slice] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  #: depthwise convs whose group count becomes the kept count
    gathers: list[str] = field(default_factory=list)  #: convs whose input 0 gets a channel Gather

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GatePlan:
        return cls(**{**data, "slices": [Slice(**entry) for entry in data["slices"]]})


class _Index:
    """Producers, consumers and constants of a graph, by tensor name."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.nodes = {node.name: node for node in graph.node}
        self.producer = tensor_producers(graph)
        self.consumers = tensor_consumers(graph)
        self.constants = {init.name: init for init in graph.initializer}
        self.outputs = {output.name for output in graph.output}

    def shape(self, name: str) -> tuple[int, ...] | None:
        init = self.constants.get(name)
        return tuple(init.dims) if init is not None else None

    def attribute(self, node: onnx.NodeProto, name: str, default: Any = None) -> Any:
        found = next((a for a in node.attribute if a.name == name), None)
        return default if found is None else onnx.helper.get_attribute_value(found)


class PlanError(AscError):
    """A gate whose closed channels cannot be removed exactly from this graph."""


def _channel_axis(shape: tuple[int, ...], channels: int, rank: int = 4) -> int | None:
    """Axis of a constant, broadcast against a ``rank``-D activation, that runs over the channels."""
    padded = (1,) * (rank - len(shape)) + shape
    if all(d == 1 for d in padded):
        return None  # a scalar: nothing to slice
    if padded[1] == channels and sum(d != 1 for d in padded) == 1:
        return len(shape) - (rank - 1)
    raise PlanError(f"a constant of shape {shape} is not per-channel over {channels} channels")


def _conv_kind(index: _Index, node: onnx.NodeProto, channels: int) -> str:
    weight = index.shape(node.input[1])
    if weight is None:
        raise PlanError(f"conv {node.name} has a computed weight")
    group = index.attribute(node, "group", 1)
    if group == 1:
        return "dense"
    if group == weight[0] == channels and weight[1] == 1:
        return "depthwise"
    raise PlanError(f"conv {node.name} is grouped ({group} groups)")


def _plan_gate(index: _Index, name: str, output: str, channels: int) -> GatePlan:
    mask = output
    while True:  # from the mask output to the Mul that applies it, through shape-only ops
        users = index.consumers.get(mask, [])
        if len(users) != 1:
            raise PlanError(f"gate output {output} feeds {len(users)} nodes, expected one Mul")
        user = users[0]
        if user.op_type == "Mul":
            break
        if user.op_type not in _SHAPE_ONLY:
            raise PlanError(f"gate output {output} reaches {user.op_type} before its Mul")
        mask = user.output[0]
    mul = user
    activation = mul.input[1] if mul.input[0] == mask else mul.input[0]
    branch = _ancestors(index, output, stop=activation)
    plan = GatePlan(name, output, channels, mul.name, activation)
    chain = _walk_up(index, plan, activation)
    for tensor in chain["tensors"]:
        allowed = chain["nodes"] | ({mul.name} | branch if tensor == activation else set())
        others = [node.name for node in index.consumers.get(tensor, []) if node.name not in allowed]
        if others or tensor in index.outputs:
            raise PlanError(f"gate {name}: tensor {tensor} is also read by {others or 'a graph output'}")
    _walk_down(index, plan, mul.output[0])
    return plan


def _ancestors(index: _Index, tensor: str, *, stop: str) -> set[str]:
    """Names of the nodes that compute ``tensor`` from ``stop`` (the gate's own branch)."""
    nodes: set[str] = set()
    stack = [tensor]
    while stack:
        node = index.producer.get(stack.pop())
        if node is None or node.name in nodes:
            continue
        nodes.add(node.name)
        stack.extend(name for name in node.input if name != stop and name not in index.constants)
    return nodes


def _walk_up(index: _Index, plan: GatePlan, activation: str) -> dict[str, set[str]]:
    """Slices from the activation back to the conv that produces its channels."""
    tensors: set[str] = set()
    nodes: set[str] = set()
    stack = [activation]
    while stack:
        tensor = stack.pop()
        if tensor in tensors:
            continue
        tensors.add(tensor)
        node = index.producer.get(tensor)
        if node is None:
            raise PlanError(f"gate {plan.name}: reached the graph input {tensor} without a conv")
        if node.name in nodes:
            continue
        nodes.add(node.name)
        if node.op_type == "Conv":
            plan.slices.append(Slice(node.name, 1, 0))
            if len(node.input) > 2 and node.input[2]:
                plan.slices.append(Slice(node.name, 2, 0))
            if _conv_kind(index, node, plan.channels) == "depthwise":
                plan.groups.append(node.name)
                plan.gathers.append(node.name)
        elif node.op_type == "BatchNormalization":
            plan.slices.extend(Slice(node.name, i, 0) for i in range(1, 5))
            stack.append(node.input[0])
        elif node.op_type in _UNARY:
            stack.append(node.input[0])
        elif node.op_type in _ARITHMETIC:
            stack.extend(_arithmetic(index, plan, node))
        else:
            raise PlanError(f"gate {plan.name}: cannot remove channels through {node.op_type} ({node.name})")
    return {"tensors": tensors, "nodes": nodes}


def _arithmetic(index: _Index, plan: GatePlan, node: onnx.NodeProto) -> list[str]:
    """Slice the per-channel constants of a binary op; return its computed inputs."""
    computed = []
    for position, name in enumerate(node.input):
        shape = index.shape(name)
        if shape is None:
            computed.append(name)
            continue
        axis = _channel_axis(shape, plan.channels)
        if axis is not None:
            plan.slices.append(Slice(node.name, position, axis))
    return computed


def _walk_down(index: _Index, plan: GatePlan, gated: str) -> None:
    """Slices from the gated tensor forward to the convs that read its channels."""
    stack, seen = [gated], set()
    while stack:
        tensor = stack.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        if tensor in index.outputs:
            raise PlanError(f"gate {plan.name}: the gated tensor reaches the graph output {tensor}")
        for node in index.consumers.get(tensor, []):
            if node.op_type == "Conv" and node.input[0] == tensor:
                if _conv_kind(index, node, plan.channels) == "dense":
                    plan.slices.append(Slice(node.name, 1, 1, consumer=True))
                    continue
                if len(node.input) > 2 and node.input[2]:
                    raise PlanError(f"gate {plan.name}: depthwise conv {node.name} adds a bias to closed channels")
                plan.slices.append(Slice(node.name, 1, 0))
                plan.groups.append(node.name)
            elif not _keeps_channels(index, plan, node, tensor):
                raise PlanError(f"gate {plan.name}: the gated channels reach {node.op_type} ({node.name}), "
                                "which mixes them with other channels")
            stack.append(node.output[0])


def _keeps_channels(index: _Index, plan: GatePlan, node: onnx.NodeProto, tensor: str) -> bool:
    """Whether ``node`` maps channel ``c`` of ``tensor`` to channel ``c`` and a zero channel to zero
    (adding the slices of its per-channel constants): then a closed channel is still nothing when
    the consuming conv reads it, and removing it there is exact."""
    if node.op_type in _REDUCES:
        return 1 not in _reduce_axes(index, node)
    if node.op_type in ("Mul", "Div") and node.input[0] == tensor:
        return len(_arithmetic(index, plan, node)) == 1
    return node.op_type in _ZERO_KEEPING or node.op_type in _POOLS


def _reduce_axes(index: _Index, node: onnx.NodeProto) -> set[int]:
    axes = index.attribute(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1] in index.constants:
        axes = numpy_helper.to_array(index.constants[node.input[1]]).tolist()
    return {1} if axes is None else {int(a) % 4 for a in axes}  # no axes: every axis, the channels too


def gate_plans(model: onnx.ModelProto, gates: Sequence[tuple[str, str, int]]) -> list[GatePlan]:
    """The plan of every gate ``(name, graph output, channels)``; a :class:`PlanError` names one that cannot be pruned."""
    index = _Index(model.graph)
    return [_plan_gate(index, name, output, channels) for name, output, channels in gates]


# ---------------------------------------------------------------------------------------------
# Pruning and fixing the gates


def _drop_gate_outputs(graph: onnx.GraphProto, plans: Sequence[GatePlan]) -> None:
    outputs = {plan.output for plan in plans}
    kept = [output for output in graph.output if output.name not in outputs]
    del graph.output[:]
    graph.output.extend(kept)


def _check_keeps(plans: Sequence[GatePlan], keeps: Sequence[np.ndarray]) -> list[np.ndarray]:
    if len(keeps) != len(plans):
        raise AscError(f"{len(keeps)} keep masks for {len(plans)} gates; give one per gate")
    checked = []
    for plan, keep in zip(plans, keeps, strict=True):
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (plan.channels,):
            raise AscError(f"gate {plan.name}: keep mask of shape {keep.shape}, expected ({plan.channels},)")
        checked.append(keep)
    return checked


def fix_gates(model: onnx.ModelProto, plans: Sequence[GatePlan], keeps: Sequence[np.ndarray]) -> onnx.ModelProto:
    """The gated graph with each gate's mask replaced by a constant (the reference for pruning)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    graph = fixed.graph
    nodes = {node.name: node for node in graph.node}
    for plan, keep in zip(plans, _check_keeps(plans, keeps), strict=True):
        mul = nodes[plan.mul]
        constant = f"{plan.output}.fixed"
        graph.initializer.append(numpy_helper.from_array(keep.astype(np.float32).reshape(1, -1, 1, 1), constant))
        mul.input[:] = [plan.activation, constant]
    _drop_gate_outputs(graph, plans)
    prune_dead_nodes(graph)
    return fixed


def prune_graph(model: onnx.ModelProto, plans: Sequence[GatePlan], keeps: Sequence[np.ndarray]) -> onnx.ModelProto:
    """A copy without the gates and without the closed channels (``keeps``: one bool vector per gate).

    A gate with every channel closed keeps one channel whose consumer weights are zero, so the
    graph stays valid and still computes what the closed gate did.
    """
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    graph = pruned.graph
    nodes = {node.name: node for node in graph.node}
    constants = {init.name: init for init in graph.initializer}
    arrays: dict[tuple[str, int], np.ndarray] = {}
    gathers: list[tuple[str, np.ndarray]] = []
    renamed: dict[str, str] = {}
    for plan, keep in zip(plans, _check_keeps(plans, keeps), strict=True):
        kept = np.flatnonzero(keep)
        empty = kept.size == 0
        if empty:
            kept = np.array([0])
        for piece in plan.slices:
            key = (piece.node, piece.input)
            if key not in arrays:
                arrays[key] = numpy_helper.to_array(constants[nodes[piece.node].input[piece.input]])
            arrays[key] = np.take(arrays[key], kept, axis=piece.axis)
            if empty and piece.consumer:
                arrays[key] = np.zeros_like(arrays[key])
        for name in plan.groups:
            group = next(a for a in nodes[name].attribute if a.name == "group")
            group.i = int(kept.size)
        gathers.extend((name, kept) for name in plan.gathers)
        renamed[nodes[plan.mul].output[0]] = plan.activation
    for (node_name, position), array in arrays.items():
        name = f"{node_name}.in{position}.pruned"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        nodes[node_name].input[position] = name
    for node in graph.node:  # the gated tensors' readers read the activations directly
        node.input[:] = [renamed.get(name, name) for name in node.input]
    for node_name, kept in gathers:
        _insert_gather(graph, nodes[node_name], kept)
    _drop_gate_outputs(graph, plans)
    prune_dead_nodes(graph)
    return pruned


def _insert_gather(graph: onnx.GraphProto, conv: onnx.NodeProto, kept: np.ndarray) -> None:
    """Feed ``conv`` only the kept channels of its input (the input may feed a residual sum too)."""
    indices, selected = f"{conv.name}.kept", f"{conv.input[0]}.{conv.name}.kept"
    graph.initializer.append(numpy_helper.from_array(kept.astype(np.int64), indices))
    gather = onnx.helper.make_node("Gather", [conv.input[0], indices], [selected], name=f"{conv.name}.gather",
                                   axis=1)
    position = list(graph.node).index(conv)
    graph.node.insert(position, gather)
    conv.input[0] = selected


# ---------------------------------------------------------------------------------------------
# The bundle side


@dataclass(frozen=True)
class GatedBundle:
    """A bundle with channel gates: its manifest, gated graph and plans."""

    path: Path
    manifest: BundleManifest
    model: onnx.ModelProto
    plans: list[GatePlan]
    threshold: float


def open_gated_bundle(bundle_dir: str | os.PathLike[str]) -> GatedBundle:
    """Read a gated bundle; a bundle without gates is one AscError saying how to get one."""
    bundle_dir = Path(bundle_dir)
    manifest = BundleManifest.read(bundle_dir)
    plan_path = bundle_dir / PLAN_NAME
    if not plan_path.is_file():
        raise AscError(f"{plan_path}: the bundle has no channel gates to personalize; give the run folder of "
                       "`asc compress RUN --method ppp` (it exports a gated bundle), or its gated bundle")
    try:
        data = json.loads(plan_path.read_text())
        if data.get("format") != PLAN_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, this asc reads {PLAN_FORMAT}")
        plans = [GatePlan.from_dict(entry) for entry in data["gates"]]
        threshold = float(data.get("threshold", THRESHOLD))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise AscError(f"{plan_path}: not a readable PPP plan ({error}); re-export the gated bundle") from None
    path = manifest.model_path(bundle_dir)
    try:
        model = onnx.load_model_from_string(model_bytes(path))
    except (DecodeError, ValueError) as error:
        raise AscError(f"{path}: not a readable ONNX model ({error or type(error).__name__}); re-export the "
                       "gated bundle") from None
    outputs = {output.name for output in model.graph.output}
    missing = [plan.output for plan in plans if plan.output not in outputs]
    if missing:
        raise AscError(f"{path}: gate outputs {missing} named in {PLAN_NAME} are not in the graph; re-export the "
                       "gated bundle")
    return GatedBundle(bundle_dir, manifest, model, plans, threshold)


class UnusableEnrolment(AscError):
    """Every enrolment recording failed; ``failures`` names each, for one error line per file."""

    def __init__(self, failures: Sequence[Failure]) -> None:
        self.failures = list(failures)
        super().__init__(f"--enrol: none of the {len(self.failures)} recordings is usable (each is named above); "
                         "give WAV files of the user's or device's audio")


@dataclass(frozen=True)
class Enrolment:
    """The model inputs of the enrolment windows, and what could not be used."""

    inputs: np.ndarray  #: (windows, ...) as the bundle's graph takes them
    files: list[Path]
    failures: list[Failure]
    warnings: list[str] = field(default_factory=list)  #: "FILE: reason" for recordings used that say little


def enrolment_inputs(bundle: GatedBundle, paths: Iterable[str | os.PathLike[str]], *,
                     progress: bool = False) -> Enrolment:
    """Every clip-length window of the enrolment recordings, as model input (bad files become failures)."""
    manifest = bundle.manifest
    frontend = bundle_frontend(bundle.path, manifest)
    clip = manifest.clip_samples
    files, failures = find_audio_files(paths)
    used, inputs, warned = [], [], []
    for file in tqdm(files, desc="enrol", unit="file", disable=not progress, delay=1.0, leave=False):
        try:
            audio, _ = load_audio(file, manifest.sample_rate, mono=True)
        except AscError as error:
            failures.append(Failure(str(file), str(error)))
            continue
        warned.extend(f"{file}: {reason}" for reason in input_warnings(audio, manifest.sample_rate, clip,
                                                                        answer="its gate pattern"))
        windows = np.stack([fit_length(audio[start:start + clip], clip)
                            for start in window_starts(len(audio), clip, clip)]).astype(np.float32)
        inputs.append(windows if frontend is None else frontend(windows))
        used.append(file)
    if not inputs:
        if failures:
            raise UnusableEnrolment(failures)
        raise AscError("--enrol: no enrolment recording given; give WAV files or folders of the user's or device's "
                       "audio")
    return Enrolment(np.concatenate(inputs), used, failures, warned)


def gate_masks(model: onnx.ModelProto, manifest: BundleManifest, plans: Sequence[GatePlan], inputs: np.ndarray,
               *, batch_size: int = 16) -> list[np.ndarray]:
    """Each gate's ``(windows, channels)`` masks from the gated graph."""
    session = open_session(model.SerializeToString(), session_options(1))
    names = [plan.output for plan in plans]
    batches = [session.run(names, {manifest.input_name: inputs[start:start + batch_size]})
               for start in range(0, len(inputs), batch_size)]
    return [np.concatenate([batch[i] for batch in batches]).reshape(len(inputs), -1) for i in range(len(names))]


def prototype_keeps(masks: Sequence[np.ndarray], threshold: float = THRESHOLD) -> list[np.ndarray]:
    """The user prototype: each gate's mean mask over the windows, binarized at ``threshold``."""
    return [mask.mean(axis=0) >= threshold for mask in masks]


def logits(model: onnx.ModelProto, manifest: BundleManifest, inputs: np.ndarray, *, batch_size: int = 16) -> np.ndarray:
    session = open_session(model.SerializeToString(), session_options(1))
    return np.concatenate([session.run([manifest.output_name], {manifest.input_name: inputs[i:i + batch_size]})[0]
                           for i in range(0, len(inputs), batch_size)])


@dataclass(frozen=True)
class Personalized:
    """What :func:`personalize` wrote and measured."""

    out: Path
    files: list[Path]  #: enrolment recordings used
    failures: list[Failure]  #: enrolment paths that could not be used
    windows: int
    channels: dict[str, tuple[int, int]]  #: gate -> (kept, of)
    max_abs_diff: float  #: pruned vs gated-with-fixed-prototype logits on the enrolment windows
    bytes_before: int
    bytes_after: int
    warnings: list[str] = field(default_factory=list)  #: enrolment recordings used that say little

    def summary(self) -> str:
        kept = sum(k for k, _ in self.channels.values())
        total = sum(n for _, n in self.channels.values())
        return (f"{self.out}: personalized on {self.windows} windows of {len(self.files)} recordings; gated channels "
                f"kept {kept} of {total}; model.onnx {self.bytes_before / 1000:.1f} KB -> "
                f"{self.bytes_after / 1000:.1f} KB; max |dlogit| vs the gated model with these gates "
                f"{self.max_abs_diff:.2g}")


def personalize(bundle_dir: str | os.PathLike[str], enrol: Sequence[str | os.PathLike[str]],
                out_dir: str | os.PathLike[str], *, progress: bool = False) -> Personalized:
    """Write the bundle personalized to the ``enrol`` recordings into ``out_dir`` (see the module docstring)."""
    bundle = open_gated_bundle(bundle_dir)
    out_dir = Path(out_dir)
    if out_dir.resolve() == bundle.path.resolve():
        raise AscError(f"{out_dir}: the personalized bundle needs its own folder; choose another --out")
    check_destination(out_dir)
    enrolment = enrolment_inputs(bundle, enrol, progress=progress)
    masks = gate_masks(bundle.model, bundle.manifest, bundle.plans, enrolment.inputs)
    keeps = prototype_keeps(masks, bundle.threshold)
    pruned = prune_graph(bundle.model, bundle.plans, keeps)
    onnx.checker.check_model(pruned, full_check=True)
    reference = logits(fix_gates(bundle.model, bundle.plans, keeps), bundle.manifest, enrolment.inputs)
    difference = float(np.abs(logits(pruned, bundle.manifest, enrolment.inputs) - reference).max())
    if not difference <= MAX_ABS_DIFF:
        raise AscError(f"{bundle.path}: the pruned graph differs from the gated one by {difference:.3g} in the logits "
                       f"(allowed {MAX_ABS_DIFF:g}); its {PLAN_NAME} is wrong, re-export the gated bundle")
    channels = {plan.name: (int(keep.sum()), plan.channels) for plan, keep in zip(bundle.plans, keeps, strict=True)}
    payload = pruned.SerializeToString()
    manifest = bundle.manifest
    record = {"from_bundle": str(bundle.path.resolve()), "enrolment_files": [str(f) for f in enrolment.files],
              "windows": len(enrolment.inputs), "threshold": bundle.threshold,
              "channels": {name: list(pair) for name, pair in channels.items()},
              "kept": {plan.name: np.flatnonzero(keep).tolist() for plan, keep in zip(bundle.plans, keeps, strict=True)},
              "max_abs_logit_diff_vs_fixed_gates": difference}
    personalized = replace(manifest, ort_file=None, container_file=None, device_models={},
                           metrics={"bytes": {"file": len(payload)}, "personalization": record},
                           source={**manifest.source, "personalized": True})
    with atomic_dir(out_dir) as stage:
        (stage / manifest.model_file).write_bytes(payload)
        if manifest.frontend_file:
            shutil.copyfile(bundle.path / manifest.frontend_file, stage / manifest.frontend_file)
        (stage / PARITY_NAME).write_text(json.dumps({"reference": "gated graph with the prototype's gates fixed",
                                                     "clips": len(enrolment.inputs),
                                                     "max_abs_diff": difference}, indent=2) + "\n")
        (stage / MANIFEST_NAME).write_text(personalized.to_json())
        BundleManifest.read(stage)
    return Personalized(out_dir, enrolment.files, enrolment.failures, len(enrolment.inputs), channels, difference,
                        len(bundle.model.SerializeToString()), len(payload), enrolment.warnings)
