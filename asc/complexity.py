"""Model size and compute, counted the way DCASE Task 1 counts them, and the yearly limits.

One forward pass in eval mode gives a per-layer table (parameters as deployed, non-zero
parameters, bytes at the stored width, MACs, output shape). Counting rules (docs/complexity.md
has the sources):

* Parameters are counted as deployed: a BatchNorm whose input is the output of a conv or linear
  layer (and nothing else reads that output) is folded into it, so it costs no parameters and
  the layer gains a bias if it had none. Any other BatchNorm costs a scale and a shift per
  channel; that includes the BatchNorm inside :class:`~asc.models.SubSpectralNorm`, whose
  per-(channel, sub-band) affine cannot be folded into a conv with one weight per channel.
  Running statistics are folded into those numbers, never counted on their own. The
  parameter-free frequency norms cost nothing. Other parameters count as stored.
* MACs are those of convolutions (``Cin/groups * kernel * Cout * output positions``), linear
  layers (``in * out``) and matrix products, per input of batch size 1. Norms, activations,
  pooling and element-wise ops are not counted (the organisers' NeSsi tables agree on the conv
  rows and also list pooling; see the docs).
* Limits are in decimal units: 128 KB = 128,000 bytes, 128K parameters = 128,000, 30 MMACs =
  30,000,000 MACs per 1-s input.

The same numbers come from an ONNX file (:func:`onnx_complexity`) and from a run folder
(:func:`run_complexity`, which also counts MACs for a 1-s input at the run's features).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from lzma import LZMAError
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from google.protobuf.message import DecodeError
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from asc.errors import AscError, ConfigError
from asc.features import FeatureConfig
from asc.models import SubSpectralNorm, keras_param_count
from asc.onnx_graph import graph_constants, tensor_consumers, tensor_producers
from asc.run_files import trainable_checkpoint

WeightBytes = int | Mapping[str, int] | None
"""Bytes per parameter: one width for all, widths by module-name prefix ("" = default), or
None for each tensor's own dtype (float32 4, float16 2, int8 1)."""

KILO = 1000
MEGA = 1_000_000


# ------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class LayerCount:
    """One row of the table: a module (torch) or a node (ONNX)."""

    name: str
    kind: str
    params: int  # as deployed: after BatchNorm folding, running statistics folded in
    nonzero: int
    bytes: int
    nonzero_bytes: int
    macs: int  # per input of batch size 1
    output_shape: tuple[int, ...] | None
    trained_params: int = 0  # the module's own parameters as the framework holds them
    note: str = ""


@dataclass(frozen=True)
class Complexity:
    """Per-layer counts and totals for one input shape (plus the MACs of a 1-s input if known)."""

    source: str
    input_shape: tuple[int, ...]
    layers: tuple[LayerCount, ...]
    one_second_shape: tuple[int, ...] | None = None
    macs_1s: int | None = None  # MACs of a 1-s input, what the 2022+ limits cap
    trained_params: int | None = None  # PyTorch count: every parameter, BatchNorm affine included
    keras_params: int | None = None  # the PyTorch count plus BatchNorm running mean and variance
    unused_params: int = 0  # parameters the forward pass never read (not counted anywhere else)
    macs_1s_note: str = ""  # how the 1-s figure was obtained when it was not measured on a 1-s input

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def nonzero_params(self) -> int:
        return sum(layer.nonzero for layer in self.layers)

    @property
    def bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers)

    @property
    def nonzero_bytes(self) -> int:
        return sum(layer.nonzero_bytes for layer in self.layers)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)


# --------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Limit:
    quantity: str  # a Complexity attribute
    limit: int


@dataclass(frozen=True)
class RuleSet:
    title: str
    limits: tuple[Limit, ...]
    note: str = ""


_MEMORY_AND_MACS = (Limit("bytes", 128 * KILO), Limit("macs_1s", 30 * MEGA))
RULE_SETS: dict[str, RuleSet] = {
    "dcase2021": RuleSet("DCASE2021 Task 1A", (Limit("nonzero_bytes", 128 * KILO),),
                         "128 KB of non-zero parameters at their stored width"),
    "dcase2022": RuleSet("DCASE2022 Task 1", (Limit("params", 128 * KILO), Limit("macs_1s", 30 * MEGA)),
                         "128K parameters including zeros, stored as INT8; 30 MMACs per 1 s"),
    "dcase2023": RuleSet("DCASE2023 Task 1", _MEMORY_AND_MACS, "128 kB parameter memory; 30 MMACs per 1 s"),
    "dcase2024": RuleSet("DCASE2024 Task 1", _MEMORY_AND_MACS, "128 kB parameter memory; 30 MMACs per 1 s"),
    "dcase2025": RuleSet("DCASE2025 Task 1", _MEMORY_AND_MACS,
                         "128 kB parameter memory and 30 MMACs per 1 s, for each device-specific model"),
}

QUANTITY_LABELS = {
    "params": "parameters after BN folding",
    "nonzero_params": "non-zero parameters",
    "bytes": "parameter memory (bytes)",
    "nonzero_bytes": "non-zero parameter memory (bytes)",
    "macs": "MACs per input",
    "macs_1s": "MACs per 1-s input",
}


@dataclass(frozen=True)
class RuleResult:
    rule: str
    quantity: str
    value: int | None  # None: not known for this model (e.g. MACs of a 1-s input)
    limit: int

    @property
    def passed(self) -> bool | None:
        return None if self.value is None else self.value <= self.limit

    def __str__(self) -> str:
        label = QUANTITY_LABELS[self.quantity]
        if self.value is None:
            return (f"{self.rule}: {label} unknown (limit {self.limit:,}): UNKNOWN; give the shape of a "
                    "1-s input (--one-second-shape, e.g. 1x1x256x44)")
        verdict = "PASS" if self.passed else "FAIL"
        return f"{self.rule}: {label} {self.value:,} {'<=' if self.passed else '>'} {self.limit:,}: {verdict}"


def rule_names() -> tuple[str, ...]:
    return tuple(RULE_SETS)


def check_rules(c: Complexity, rules: str | Sequence[str]) -> list[RuleResult]:
    """One result per limit of each rule set; a limit on unknown numbers is reported, not guessed."""
    names = _rule_names([rules] if isinstance(rules, str) else list(rules))
    return [RuleResult(name, limit.quantity, getattr(c, limit.quantity), limit.limit)
            for name in names for limit in RULE_SETS[name].limits]


def _rule_names(names: list[str]) -> list[str]:
    unknown = [name for name in names if name not in RULE_SETS]
    if unknown:
        raise ConfigError(f"unknown complexity rule set {unknown[0]!r}; valid: {', '.join(RULE_SETS)}")
    return names


# ---------------------------------------------------------------------------------------- torch

_CONV_FUNCS = (F.conv1d, F.conv2d, F.conv3d)
_MATMUL_FUNCS = (torch.matmul, Tensor.matmul, torch.mm, Tensor.mm, torch.bmm, Tensor.bmm)
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BATCH_NORM = nn.modules.batchnorm._BatchNorm


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


class _Trace(TorchFunctionMode):
    """Watches every torch call of one forward pass, attributed to the innermost running module.

    Records the MACs of convs, linears and matrix products, the weight and bias each conv or
    linear module actually fed its kernel (so pruning masks and fake quantisation are seen), which
    tensors were read at all, and who read the outputs of conv and linear modules (to know when
    a following BatchNorm can be folded). Calls that only return metadata (shape, dim) are not
    reads.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scope = [""]
        self.order: list[str] = []
        self.calls: Counter[str] = Counter()
        self.shapes: dict[str, tuple[int, ...] | None] = {}
        self.macs: Counter[str] = Counter()
        self.kernels: dict[str, tuple[Tensor, Tensor | None]] = {}
        self.read: set[int] = set()
        self.producers: dict[int, tuple[str, Tensor]] = {}  # id(output of a conv/linear module) -> module
        self.readers: dict[str, set[str]] = {}  # conv/linear module -> scopes that read its output
        self.norm_inputs: dict[str, str] = {}  # BatchNorm -> conv/linear module whose output it got

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not any(True for _ in _tensors(out)):
            return out
        scope = self.scope[-1]
        for tensor in _tensors((args, kwargs)):
            self.read.add(id(tensor))
            producer = self.producers.get(id(tensor))
            if producer is not None and producer[1] is tensor:
                self.readers[producer[0]].add(scope)
        if func in _CONV_FUNCS or func is F.linear:
            weight = _arg(args, kwargs, 1, "weight")
            self.kernels.setdefault(scope, (weight, _arg(args, kwargs, 2, "bias")))
            per_output = weight.numel() // weight.shape[0] if func in _CONV_FUNCS else weight.shape[1]
            self.macs[scope] += out.numel() * per_output
        elif func in _MATMUL_FUNCS:
            self.macs[scope] += out.numel() * args[0].shape[-1]
        return out

    def enter(self, name: str, module: nn.Module, args: tuple) -> None:
        self.scope.append(name)
        if name not in self.calls:
            self.order.append(name)
        if isinstance(module, _BATCH_NORM) and args and id(args[0]) in self.producers:
            producer, tensor = self.producers[id(args[0])]
            if tensor is args[0]:
                self.norm_inputs[name] = producer

    def leave(self, name: str, module: nn.Module, output: Any) -> None:
        self.scope.pop()
        self.calls[name] += 1
        first = next(_tensors(output), None)
        self.shapes.setdefault(name, None if first is None else tuple(first.shape))
        if isinstance(module, _WEIGHTED) and isinstance(output, Tensor):
            self.producers[id(output)] = (name, output)
            self.readers.setdefault(name, set())


def _run_traced(model: nn.Module, input_shape: tuple[int, ...]) -> _Trace:
    trace = _Trace()
    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(
            lambda m, args, name=name: trace.enter(name, m, args), prepend=True))
        handles.append(module.register_forward_hook(
            lambda m, args, out, name=name: trace.leave(name, m, out), always_call=True))
    reference = next((p for p in model.parameters() if p.is_floating_point()), None)
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(0)).to(
        device=reference.device if reference is not None else "cpu",
        dtype=reference.dtype if reference is not None else torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), trace:
            model(x)
    except (RuntimeError, ValueError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise AscError(f"model {type(model).__name__} does not accept input shape {input_shape} "
                       f"({first_line}); give a (batch, channel, frequency, time) shape it accepts") from None
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return trace


def _width_of(weight_bytes: WeightBytes, name: str, tensor: Tensor) -> int:
    if weight_bytes is None:
        return tensor.element_size()
    if isinstance(weight_bytes, int):
        return weight_bytes
    best = max((key for key in weight_bytes if key == "" or name == key or name.startswith(key + ".")),
               key=len, default=None)
    return tensor.element_size() if best is None else weight_bytes[best]


def _check_weight_bytes(weight_bytes: WeightBytes) -> None:
    widths = [] if weight_bytes is None else [weight_bytes] if isinstance(weight_bytes, int) \
        else list(weight_bytes.values())
    bad = [w for w in widths if not isinstance(w, int) or w < 1]
    if bad:
        raise ConfigError(f"weight_bytes must be whole bytes per parameter (1 for int8, 2 for fp16, "
                          f"4 for fp32), got {bad[0]!r}")


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """Scale and shift of a BatchNorm in eval mode, running statistics folded in (float64)."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def _fold_blocker(trace: _Trace, modules: dict[str, nn.Module], norm: str) -> str | None:
    """Why BatchNorm ``norm`` cannot be folded into the layer before it (None: it can)."""
    bn = modules[norm]
    producer = trace.norm_inputs.get(norm)
    if producer is None:
        if isinstance(modules.get(norm.rpartition(".")[0]), SubSpectralNorm):
            return "a per-sub-band affine does not fold into a per-channel conv"
        return "input is not a conv or linear output"
    layer = modules[producer]
    if bn.running_mean is None:
        return "no running statistics"
    if trace.calls[norm] != 1 or trace.calls[producer] != 1:
        return "layer or norm runs more than once"
    if any(scope != norm and not scope.startswith(norm + ".") for scope in trace.readers[producer]):
        return f"output of {producer} is also read elsewhere"
    channels = layer.out_channels if isinstance(layer, nn.modules.conv._ConvNd) else layer.out_features
    if channels != bn.num_features or (isinstance(layer, nn.Linear) and len(trace.shapes[producer]) != 2):
        return f"channels of {producer} do not match"
    return None


def _count(tensors: Sequence[Tensor]) -> tuple[int, int]:
    return sum(t.numel() for t in tensors), sum(int(torch.count_nonzero(t)) for t in tensors)


def complexity(model: nn.Module, input_shape: tuple[int, ...], *, weight_bytes: WeightBytes = None,
               one_second_shape: tuple[int, ...] | None = None) -> Complexity:
    """Counts for ``model`` on a random input of ``input_shape`` (batch, channel, frequency, time).

    MACs are per batch item. ``one_second_shape`` (the input for 1 s of audio at the model's
    features) adds the MACs the 2022+ limits cap. ``weight_bytes``: see :data:`WeightBytes`;
    pass 1 for a model that will be deployed as int8.
    """
    _check_weight_bytes(weight_bytes)
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) < 1 or min(input_shape) < 1:
        raise ConfigError(f"input shape must have positive sizes, got {input_shape}")
    trace = _run_traced(model, input_shape)
    batch = input_shape[0]
    modules = dict(model.named_modules())
    folds = {trace.norm_inputs[n]: n for n in trace.order
             if isinstance(modules[n], _BATCH_NORM) and _fold_blocker(trace, modules, n) is None}
    folded_into = {norm: layer for layer, norm in folds.items()}
    owners = tuple(n for n in trace.order if isinstance(modules[n], (*_WEIGHTED, _BATCH_NORM)))
    counted: dict[int, str] = {}
    layers = []
    for name in trace.order:
        module = modules[name]
        own = list(module.parameters(recurse=False))
        tensors: list[Tensor] = []
        note = ""
        if isinstance(module, _WEIGHTED):
            weight, bias = trace.kernels.get(name, (module.weight, module.bias))
            if id(weight) in counted:
                note = f"shares weights with {counted[id(weight)]}"
            else:
                counted[id(weight)] = name
                tensors = [weight.detach()] + ([] if bias is None else [bias.detach()])
                if name in folds:
                    scale, shift = _bn_affine(modules[folds[name]])
                    w = weight.detach().double() * scale.view(-1, *([1] * (weight.dim() - 1)))
                    b = shift if bias is None else bias.detach().double() * scale + shift
                    tensors, note = [w, b], f"{folds[name]} folded in"
            width_tensor = weight
        elif isinstance(module, _BATCH_NORM):
            if name in folded_into:
                note = f"folded into {folded_into[name]}"
            elif module.running_var is None:  # normalises with batch statistics: only the affine is stored
                tensors = [p.detach() for p in own]
                note = "kept: no running statistics"
            else:
                tensors = list(_bn_affine(module))
                note = f"kept: {_fold_blocker(trace, modules, name)}"
            width_tensor = module.running_var if module.running_var is not None else module.weight
        else:
            inside = any(name.startswith(owner + ".") for owner in owners)
            tensors = [] if inside else [p.detach() for p in own if id(p) in trace.read]
            width_tensor = tensors[0] if tensors else None
        params, nonzero = _count(tensors)
        macs = trace.macs[name] // batch
        trained = sum(p.numel() for p in own)
        is_leaf = next(module.children(), None) is None
        if not (is_leaf or params or macs or trained):
            continue
        width = _width_of(weight_bytes, name, width_tensor) if width_tensor is not None else 0
        layers.append(LayerCount(name or type(model).__name__, type(module).__name__, params, nonzero,
                                 params * width, nonzero * width, macs, trace.shapes[name], trained, note))
    all_params = {id(p): p for p in model.parameters()}
    macs_1s = None
    if one_second_shape is not None:
        one_second_shape = tuple(int(d) for d in one_second_shape)
        macs_1s = (sum(layer.macs for layer in layers) if one_second_shape == input_shape
                   else sum(_run_traced(model, one_second_shape).macs.values()) // one_second_shape[0])
    return Complexity(
        source=type(model).__name__, input_shape=input_shape, layers=tuple(layers),
        one_second_shape=one_second_shape, macs_1s=macs_1s,
        trained_params=sum(p.numel() for p in all_params.values()), keras_params=keras_param_count(model),
        unused_params=sum(p.numel() for i, p in all_params.items() if i not in trace.read),
    )


def run_complexity(run_dir: Path, checkpoint: str = "last", *, weight_bytes: WeightBytes = None) -> Complexity:
    """Counts for a run folder's model on one clip of its training length, plus a 1-s input.

    A compressed run is counted on the float twin of its finalized model, at 1 byte per weight
    when the finalized model is int8 (unless ``weight_bytes`` says otherwise).
    """
    # imported here because asc.train may come to import this module
    from asc.train.evaluate import load_run_model

    checkpoint = trainable_checkpoint(run_dir, checkpoint)
    model, state = load_run_model(Path(run_dir), checkpoint)
    if weight_bytes is None and state.get("precision") == "int8":
        weight_bytes = 1
    features = FeatureConfig.from_dict(state["features"])
    clip = (1, 1, features.n_mels, features.num_frames(state["num_samples"]))
    second = (1, 1, features.n_mels, features.num_frames(features.sample_rate))
    c = complexity(model, clip, weight_bytes=weight_bytes, one_second_shape=second)
    return replace(c, source=f"{Path(run_dir) / 'checkpoints' / (checkpoint + '.pt')} "
                             f"({state['model_spec']['name']})")


# ----------------------------------------------------------------------------------------- ONNX

_PASS_THROUGH = ("Identity", "Cast", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "DequantizeLinear")
_NORM_OPS = ("LayerNormalization", "InstanceNormalization", "GroupNormalization")
_UNSUPPORTED_OPS = ("ConvTranspose", "QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QGemm",
                    "LSTM", "GRU", "RNN")


@dataclass
class _Graph:
    """Lookup tables over one ONNX graph."""

    constants: dict[str, np.ndarray]
    producers: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]

    def stored(self, name: str) -> tuple[str, np.ndarray, np.ndarray] | None:
        """The constant a tensor is computed from (through casts, reshapes, dequantisation).

        Returns (constant name, stored array, the values it stands for as float64): int8 weights
        behind DequantizeLinear are stored as int8 but stand for ``(q - zero_point) * scale``.
        """
        dequantize = []
        while name not in self.constants:
            node = self.producers.get(name)
            if node is None or node.op_type not in _PASS_THROUGH:
                return None
            if node.op_type == "DequantizeLinear":
                dequantize.append(node)
            name = node.input[0]
        array = self.constants[name]
        values = array.astype(np.float64)
        for node in reversed(dequantize):
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            scale = self._per_axis(node.input[1], values, axis, default=1.0)
            zero_point = self._per_axis(node.input[2], values, axis, default=0.0) if len(node.input) > 2 else 0.0
            values = (values - zero_point) * scale
        return name, array, values

    def _per_axis(self, name: str, values: np.ndarray, axis: int, default: float) -> np.ndarray | float:
        """A DequantizeLinear scale or zero point, shaped to broadcast along ``axis`` of ``values``."""
        if name not in self.constants:
            return default
        value = self.constants[name].astype(np.float64)
        if value.size == 1:
            return value.item()
        return value.reshape([-1 if d == axis % values.ndim else 1 for d in range(values.ndim)])


def _load_onnx(path: Path) -> tuple[onnx.ModelProto, Path]:
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise AscError(f"{path}: ONNX model not found; export one with asc export or point at a model.onnx")
    # a bundle may ship its model only as an xz container
    from asc.runtime import model_bytes

    try:
        model = onnx.load_from_string(model_bytes(path)) if path.suffix == ".xz" else onnx.load(str(path))
        return model, path
    except (DecodeError, OSError, LZMAError) as error:
        raise AscError(f"{path}: not a readable ONNX model ({type(error).__name__}); re-export it") from None


class ShapeInferenceError(AscError):
    """A graph that cannot take the given input shape (its reshapes may fix an axis)."""


def _infer_shapes(model: onnx.ModelProto, path: Path, input_shape: tuple[int, ...] | None
                  ) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor for a concrete input shape (symbolic batch sizes become 1)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise AscError(f"{path}: has {len(inputs)} inputs; complexity needs a model with one input")
    dims = inputs[0].type.tensor_type.shape.dim
    if input_shape is None:
        unknown = [d.dim_param or "?" for i, d in enumerate(dims) if d.dim_value <= 0 and i > 0]
        if unknown:
            raise AscError(f"{path}: input axes {unknown} have no fixed size; give the input shape "
                           "(e.g. --input-shape 1x1x256x431)")
        input_shape = tuple(d.dim_value if d.dim_value > 0 else 1 for d in dims)
    if len(input_shape) != len(dims):
        raise AscError(f"{path}: input has {len(dims)} axes, the given shape {tuple(input_shape)} has "
                       f"{len(input_shape)}; give a shape of the model's rank")
    for dim, size in zip(dims, input_shape, strict=True):
        dim.Clear()
        dim.dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ShapeInferenceError(f"{path}: shape inference failed for input {tuple(input_shape)} ({reason}); "
                       "check the input shape") from None
    shapes = {}
    for info in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        dims = info.type.tensor_type.shape.dim
        if all(d.dim_value > 0 for d in dims):
            shapes[info.name] = tuple(d.dim_value for d in dims)
    return shapes


def _graph_tables(model: onnx.ModelProto) -> _Graph:
    return _Graph(graph_constants(model.graph), tensor_producers(model.graph), tensor_consumers(model.graph))


def onnx_complexity(path: Path, input_shape: tuple[int, ...] | None = None, *,
                    one_second_shape: tuple[int, ...] | None = None) -> Complexity:
    """Counts for an ONNX file (or a folder with ``model.onnx``), at the stored dtypes.

    Parameters are the constants behind Conv/Gemm/MatMul weights and biases (int8 weights behind
    DequantizeLinear count 1 byte; their scales and zero points are not parameters), the scale and
    shift of BatchNormalization (mean and variance fold into them) and norm affines. An Add of a
    constant right after a MatMul is that MatMul's bias. ``input_shape`` is needed when the input
    has free axes other than the batch.
    """
    model, path = _load_onnx(Path(path))
    unsupported = sorted({n.op_type for n in model.graph.node if n.op_type in _UNSUPPORTED_OPS})
    if unsupported:
        raise AscError(f"{path}: operators {unsupported} are not counted; export as float or int8 QDQ "
                       "(Conv/Gemm/MatMul with DequantizeLinear weights)")
    graph = _graph_tables(model)
    shapes = _infer_shapes(model, path, input_shape)
    input_name = next(i.name for i in model.graph.input if i.name not in graph.constants)
    batch = shapes[input_name][0]
    counted: set[str] = set()
    layers = []
    for index, node in enumerate(model.graph.node):
        weights, macs = _onnx_node(node, graph, shapes)
        if weights is None:
            continue
        tensors = [w for w in weights if w[0] not in counted]
        counted.update(w[0] for w in tensors)
        params = sum(a.size for _, a, _ in tensors)
        nonzero = sum(int(np.count_nonzero(v)) for _, _, v in tensors)
        size = sum(a.size * a.itemsize for _, a, _ in tensors)
        nonzero_size = sum(int(np.count_nonzero(v)) * a.itemsize for _, a, v in tensors)
        layers.append(LayerCount(node.name or f"{node.op_type}_{index}", node.op_type, params, nonzero, size,
                                 nonzero_size, macs // batch, shapes.get(node.output[0]), params))
    macs_1s = None
    if one_second_shape is not None:
        second_shapes = _infer_shapes(model, path, one_second_shape)
        macs_1s = sum(_onnx_node(n, graph, second_shapes)[1] for n in model.graph.node) // one_second_shape[0]
    return Complexity(source=str(path), input_shape=shapes[input_name], layers=tuple(layers),
                      one_second_shape=None if one_second_shape is None else tuple(one_second_shape),
                      macs_1s=macs_1s)


def _onnx_node(node: onnx.NodeProto, graph: _Graph, shapes: dict[str, tuple[int, ...]]
               ) -> tuple[list[tuple[str, np.ndarray, np.ndarray]] | None, int]:
    """(stored constants that are this node's parameters, MACs) — (None, 0) for uncounted ops."""
    op = node.op_type

    def constants(*names: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
        found = [graph.stored(n) for n in names if n]
        return [f for f in found if f is not None]

    def shape(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise AscError(f"shape of ONNX tensor {name!r} ({op} {node.name}) is unknown after shape "
                           "inference; give a fixed input shape")
        return shapes[name]

    if op == "Conv":
        weight = graph.stored(node.input[1])
        weight_shape = shape(node.input[1]) if weight is None else weight[1].shape
        return constants(*node.input[1:3]), prod(shape(node.output[0])) * prod(weight_shape[1:])
    if op == "Gemm":
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        a = shape(node.input[0])
        return constants(*node.input[1:3]), prod(shape(node.output[0])) * (a[0] if trans_a else a[1])
    if op == "MatMul":
        bias = [n for c in graph.consumers.get(node.output[0], []) if c.op_type == "Add"
                for n in c.input if n != node.output[0] and graph.stored(n) is not None]
        return constants(*node.input, *bias), prod(shape(node.output[0])) * shape(node.input[0])[-1]
    if op == "BatchNormalization":
        scale, shift, mean, var = stats = [graph.stored(n) for n in node.input[1:5]]
        if any(s is None for s in stats):  # statistics computed in the graph: nothing stored to count
            return [], 0
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        folded = scale[2] / np.sqrt(var[2] + eps)
        return [(scale[0], scale[1], folded), (shift[0], shift[1], shift[2] - mean[2] * folded)], 0
    if op in _NORM_OPS:
        return constants(*node.input[1:3]), 0
    return None, 0


# ------------------------------------------------------------------------------------ reporting


def _kb(n: int) -> str:
    return f"{n:,} bytes ({n / KILO:,.1f} kB)"


def _shape(shape: tuple[int, ...] | None) -> str:
    return "-" if shape is None else "x".join(str(d) for d in shape)


def format_table(c: Complexity, rule_results: Sequence[RuleResult] = (), *, per_layer: bool = True) -> str:
    """Plain text: the per-layer table, the totals and one PASS/FAIL line per rule limit."""
    lines = [f"{c.source}: input {_shape(c.input_shape)}"]
    if per_layer:
        header = ("layer", "type", "params", "non-zero", "bytes", "MACs", "output", "note")
        rows = [(layer.name, layer.kind, f"{layer.params:,}", f"{layer.nonzero:,}", f"{layer.bytes:,}",
                 f"{layer.macs:,}", _shape(layer.output_shape), layer.note) for layer in c.layers]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
        aligns = ("<", "<", ">", ">", ">", ">", "<")
        for row in [header, *rows]:
            cells = [f"{cell:{align}{w}}" for cell, align, w in zip(row, aligns, widths, strict=False)]
            lines.append("  ".join([*cells, row[-1]]).rstrip())
        lines.append("")
    totals = []
    if c.trained_params is not None:
        totals.append(("parameters (PyTorch)", f"{c.trained_params:,}"))
    if c.keras_params is not None:
        totals.append(("parameters (Keras-style, + BN running stats)", f"{c.keras_params:,}"))
    totals += [
        ("parameters after BN folding", f"{c.params:,}"),
        ("non-zero parameters", f"{c.nonzero_params:,}"),
        ("parameter memory", _kb(c.bytes)),
        ("non-zero parameter memory", _kb(c.nonzero_bytes)),
        (f"MACs per input {_shape(c.input_shape)}", f"{c.macs:,} ({c.macs / MEGA:,.2f} M)"),
    ]
    if c.macs_1s is not None:
        totals.append((f"MACs per 1-s input {_shape(c.one_second_shape)}",
                       f"{c.macs_1s:,} ({c.macs_1s / MEGA:,.2f} M)" + (f"; {c.macs_1s_note}" if c.macs_1s_note else "")))
    if c.unused_params:
        totals.append(("unused by the forward pass (not counted)", f"{c.unused_params:,}"))
    label_width = max(len(label) for label, _ in totals)
    lines += [f"{label:<{label_width}}  {value}" for label, value in totals]
    if rule_results:
        lines.append("")
        lines += [str(result) for result in rule_results]
    return "\n".join(lines)


def bundle_complexity(bundle_dir: Path, input_shape: tuple[int, ...] | None = None,
                      one_second_shape: tuple[int, ...] | None = None, *, model: str = "general") -> Complexity:
    """Counts of one of a bundle's models (``general`` or a device's), with its clip and 1-s inputs
    read from ``bundle.json``.

    A graph whose reshapes fix the time axis to the clip length (the exporter's static shapes)
    cannot take a 1-s input; its 1-s MACs are then the clip's scaled by the frame ratio (within a
    few per cent: strided layers round their output lengths), and the report says so.
    """
    from asc.bundle_manifest import BundleManifest

    manifest = BundleManifest.read(bundle_dir)
    if model not in manifest.models:
        raise AscError(f"{Path(bundle_dir) / 'bundle.json'}: no model {model!r} (it has "
                       f"{', '.join(manifest.models)}); name one of those")
    if manifest.frontend_in_graph:
        clip, second = (1, manifest.clip_samples), (1, manifest.sample_rate)
    else:
        features = manifest.features
        clip = (1, 1, features.n_mels, features.num_frames(manifest.clip_samples))
        second = (1, 1, features.n_mels, features.num_frames(manifest.sample_rate))
    input_shape, one_second_shape = input_shape or clip, one_second_shape or second
    path = manifest.models[model].model_path(bundle_dir)  # model.onnx, or its xz container when only it shipped
    try:
        return onnx_complexity(path, input_shape, one_second_shape=one_second_shape)
    except ShapeInferenceError:
        if one_second_shape == input_shape:
            raise
    c = onnx_complexity(path, input_shape)
    return replace(c, one_second_shape=tuple(one_second_shape),
                   macs_1s=round(c.macs * one_second_shape[-1] / input_shape[-1]),
                   macs_1s_note=f"scaled from the {_shape(input_shape)} input: the graph fixes its time axis")


def _resolve(target: Path) -> str:
    if target.is_dir() and (target / "bundle.json").is_file():
        return "bundle"
    if target.is_file() and target.name.endswith((".onnx", ".onnx.xz")):
        return "onnx"
    if target.is_dir() and (target / "model.onnx").is_file():
        return "onnx"
    if target.is_dir() and (target / "checkpoints").is_dir():
        return "run"
    raise AscError(f"{target}: not a run folder (with checkpoints/), an ONNX file or a folder with model.onnx; "
                   "point at one of those")


def run_complexity_command(target: Path, rules: list[str], per_layer: bool, *, checkpoint: str = "last",
                           weight_bytes: int | None = None, input_shape: tuple[int, ...] | None = None,
                           one_second_shape: tuple[int, ...] | None = None) -> int:
    """`asc complexity`: print the counts and the verdicts; exceeding a limit is not an error."""
    target = Path(target)
    _rule_names(rules)
    kind = _resolve(target)
    if kind == "run":
        c = run_complexity(target, checkpoint, weight_bytes=weight_bytes)
    else:
        if weight_bytes is not None:
            raise ConfigError(f"{target}: an ONNX file stores its own dtypes; drop the weight width option")
        if kind == "bundle":
            _print_bundle(target, rules, per_layer, input_shape, one_second_shape)
            return 0
        c = onnx_complexity(target, input_shape, one_second_shape=one_second_shape)
    print(format_table(c, check_rules(c, rules), per_layer=per_layer))
    return 0


def _print_bundle(bundle_dir: Path, rules: list[str], per_layer: bool, input_shape: tuple[int, ...] | None,
                  one_second_shape: tuple[int, ...] | None) -> None:
    """One block per model of the bundle (DCASE 2025: every device model must meet the limits on its own)."""
    from asc.bundle_manifest import BundleManifest

    names = list(BundleManifest.read(bundle_dir).models)
    blocks, over = [], []
    for name in names:
        c = bundle_complexity(bundle_dir, input_shape, one_second_shape, model=name)
        results = check_rules(c, rules)
        over += [name] if any(result.passed is False for result in results) else []
        block = format_table(c, results, per_layer=per_layer)
        blocks.append(f"== model {name} ==\n{block}" if len(names) > 1 else block)
    if len(names) > 1:
        blocks.append(f"{len(names)} models: " + (f"over a limit: {', '.join(over)}" if over
                                                  else "none over a limit"))
    print("\n\n".join(blocks))
