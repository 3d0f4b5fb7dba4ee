"""Int8 quantization-aware training (torchao PT2E) that exports to ONNX QDQ with the trained scales.

The flow (docs/quantization.md has the measurements):

1. :func:`prepare_qat` exports the float model with ``torch.export`` (dynamic batch) and lets
   ``prepare_qat_pt2e`` insert fake-quant where :class:`OrtInt8Quantizer` asks for it. Conv+BN
   pairs become torchao's QAT conv-BN pattern, so training sees the BN-folded int8 weights.
2. Training runs through :class:`QATModel`, which makes ``train()``/``eval()`` switch what an
   exported graph cannot switch by itself: dropout, BN statistics and the range observers.
3. :func:`convert_qat` runs ``convert_pt2e``: BN folded into the convs, int8 weights stored,
   Q/DQ ops where the fake-quant was. That graph module is the deployable artefact, and
   :func:`asc.export.onnx.export_onnx` turns it into a QDQ ONNX file that onnxruntime fuses into
   ``QLinearConv``/``QLinearAdd``.

Why our own quantizer instead of torchao's XNNPACK one: that one lives in ``torchao.testing``, is
marked deprecated, quantizes int8 activations (ORT x86 wants uint8, reference/compression.md
§3.1) and matches excluded modules by exact type, so ``FreqNorm`` subclasses would slip through
and get quantized inside. Fake-quant is the plain ``FakeQuantize``, not the fused op: the fused
op computes per-channel symmetric scales for a narrowed range differently from the observer
that ``convert_pt2e`` asks, so training and the exported int8 weights would disagree by one step.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from asc.errors import AscError, ConfigError
from asc.models.norms import FreqNorm
from asc.pt2e import (
    FakeQuantize,
    FakeQuantizeBase,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    QuantizationAnnotation,
    QuantizationSpec,
    Quantizer,
    allow_exported_model_train_eval,
    convert_pt2e,
    prepare_qat_pt2e,
)
from asc.train.hooks import TrainHook

if TYPE_CHECKING:
    from asc.train.loop import Trainer

_aten = torch.ops.aten
_CONVS = (_aten.conv2d.default, _aten.conv2d.padding)
_BATCH_NORMS = (_aten.batch_norm.default, _aten._native_batch_norm_legit.default, _aten.cudnn_batch_norm.default)
_RELUS = (_aten.relu.default, _aten.relu_.default)
_RESHAPES = (_aten.reshape.default, _aten.view.default)
_DROPOUTS = (_aten.dropout.default, _aten.feature_dropout.default, _aten.alpha_dropout.default,
             _aten.feature_alpha_dropout.default)
_BN_TRAINING_ARG = 5  # (input, weight, bias, running_mean, running_var, training, momentum, eps, ...)
_BN_EPS_ARG = 7
_DROPOUT_TRAIN_ARG = 2  # (input, p, train)
_DEQUANTIZE_PER_CHANNEL = torch.ops.quantized_decomposed.dequantize_per_channel.default
_DEQUANTIZE_PER_TENSOR = torch.ops.quantized_decomposed.dequantize_per_tensor.default
_QUANTIZE_PER_TENSOR = torch.ops.quantized_decomposed.quantize_per_tensor.default


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass
class QATConfig:
    """When to freeze what, counted from the end of training.

    Freezing BN statistics and then the ranges is the usual QAT endgame: the last epochs train the
    weights against the exact folded scales that will be deployed. Frozen BN takes away the
    network's invariance to the scale of its weights, so it must come where the learning rate is
    small: frozen at the 4-epoch cosine schedule's midpoint (lr 0.01), every composition with a
    distillation term diverged within a few steps (docs/results-compression.md).
    """

    freeze_bn_epochs: int = 1
    """The last this many epochs use BN running statistics instead of batch statistics."""
    freeze_observer_epochs: int = 1
    """The last this many epochs keep every activation and weight scale fixed."""
    activation_averaging: float = 0.01
    """Moving-average constant of the activation range observers (1 = last batch only)."""

    def __post_init__(self) -> None:
        for name in ("freeze_bn_epochs", "freeze_observer_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"QAT {name} must be a whole number of epochs >= 0, got {value!r}")
        if not 0.0 < self.activation_averaging <= 1.0:
            raise ConfigError(f"QAT activation_averaging must be in (0, 1], got {self.activation_averaging!r}")

    def phase(self, epoch: int, epochs: int) -> tuple[bool, bool]:
        """``(bn_frozen, observers_frozen)`` for 0-based ``epoch`` of ``epochs``."""
        return epoch >= epochs - self.freeze_bn_epochs, epoch >= epochs - self.freeze_observer_epochs


# ---------------------------------------------------------------------------------------------
# Where the Q/DQ go


def activation_spec(averaging: float) -> QuantizationSpec:
    """uint8 per-tensor affine: the activation type onnxruntime's x86 int8 kernels need (U8S8)."""
    return QuantizationSpec(
        dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine,
        observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=MovingAverageMinMaxObserver,
                                                          averaging_constant=averaging))


WEIGHT_LEVELS = 64
"""Weights train and ship in [-64, 64] (7 bits), as post-training int8 does (asc.export.onnx): on
x86 CPUs without VNNI onnxruntime adds two uint8 x int8 products in a saturating int16, and
255 * 64 * 2 fits where 255 * 127 * 2 does not (docs/export-latency.md §10)."""

WEIGHT_SPEC = QuantizationSpec(
    dtype=torch.int8, quant_min=-WEIGHT_LEVELS, quant_max=WEIGHT_LEVELS, qscheme=torch.per_channel_symmetric,
    ch_axis=0, observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver,
                                                                 averaging_constant=1.0, eps=2**-12))
"""int8 per-output-channel symmetric in [-64, 64] (zero point 0), scales from the current weights."""


def float_scopes(model: nn.Module) -> set[str]:
    """Qualified names of the frequency-wise norms, which stay float.

    Their per-bin statistics divide by a standard deviation; quantizing the inside tripled the
    logit drift in ORT at no speed gain (reference/compression.md §4.1).
    """
    return {name for name, module in model.named_modules() if isinstance(module, FreqNorm)}


class OrtInt8Quantizer(Quantizer):
    """Annotates the patterns onnxruntime fuses: conv (+BN)(+ReLU) and tensor add (+ReLU).

    Each conv gets a quantized input, per-channel int8 weights and a quantized output, which is
    exactly the DQ -> Conv -> Q group ORT turns into ``QLinearConv``; adds become ``QLinearAdd``.
    Everything else (means, SiLU, pooling, nodes inside ``float_scopes``) stays float between a
    DQ and a Q. Conv biases stay float; ORT quantizes them to int32 itself when it fuses.

    The output is taken after a following BN, ReLU and dropout: BN folds, ReLU vanishes into the
    zero point, and dropout is gone at inference. Quantizing before the dropout as well would
    leave two Q/DQ pairs in a row, which ORT merges into one rounding that torch never did. A
    conv followed by a sub-spectral norm is quantized after the norm (the export makes the pair
    int8 band convs), so every reader of the norm, the mean over frequency included, reads the
    quantized values.
    """

    def __init__(self, float_scopes: Collection[str], activation: QuantizationSpec) -> None:
        super().__init__()
        self.float_scopes = set(float_scopes)
        self.activation = activation

    def _is_float(self, node: Node) -> bool:
        return any(path in self.float_scopes for path, _ in node.meta.get("nn_module_stack", {}).values())

    def annotate(self, model: GraphModule) -> GraphModule:
        for node in model.graph.nodes:
            if node.op != "call_function" or self._is_float(node):
                continue
            if node.target in _CONVS:
                inputs = {node.args[0]: self.activation, node.args[1]: WEIGHT_SPEC}
            elif node.target == _aten.add.Tensor and all(isinstance(a, Node) for a in node.args[:2]):
                inputs = {arg: self.activation for arg in node.args[:2]}
            else:
                continue
            node.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map=inputs, _annotated=True)
            followers = _subband_norm(node) or _reader_chain(node, _FUSED_FOLLOWERS, complete=False)
            for follower in followers:
                follower.meta["quantization_annotation"] = QuantizationAnnotation(_annotated=True)
            (followers[-1] if followers else node).meta["quantization_annotation"].output_qspec = self.activation
        return model

    def validate(self, model: GraphModule) -> None:
        """Nothing to check beyond what :meth:`annotate` already guarantees."""


_FUSED_FOLLOWERS = (_BATCH_NORMS, _RELUS, _DROPOUTS)
"""What may follow a conv or add inside its quantized group, each optional, in this order."""

_SUBBAND_NORM = (_RESHAPES, _BATCH_NORMS, _RESHAPES)
"""A sub-spectral norm in an exported graph: (N, C, F, T) -> (N, C*S, F/S, T), BN, and back."""


def _reader_chain(node: Node, steps: tuple[tuple[Any, ...], ...], *, complete: bool) -> list[Node]:
    """The nodes that follow ``node`` as each one's only reader, one per step whose op kinds match.

    ``complete``: every step must match (else ``[]``); otherwise a step that does not match is skipped.
    """
    chain = []
    for kinds in steps:
        users = list(node.users)
        if len(users) == 1 and users[0].target in kinds:
            node = users[0]
            chain.append(node)
        elif complete:
            return []
    return chain


def _subband_norm(conv: Node) -> list[Node]:
    """The reshape, BN and reshape of a sub-spectral norm that is a conv's only reader, else ``[]``.

    Such a conv's output is quantized after the norm instead of before it. The export folds the
    norm's per-band affine into int8 band convs (asc.export.precision), which compute the norm's
    output from the integer accumulator directly; a quantizer between conv and norm would be a
    rounding that graph cannot do, and one that a consumer such as the mean over frequency would
    have read float.
    """
    return _reader_chain(conv, _SUBBAND_NORM, complete=True) if conv.target in _CONVS else []


# ---------------------------------------------------------------------------------------------
# Training through the prepared graph


def _set_graph_mode(graph: GraphModule, *, dropout: bool, bn_stats: bool) -> None:
    """Flip the train flags baked into an exported graph's dropout and batch-norm calls.

    torchao's ``move_exported_model_to_eval`` rewrites only ``F.dropout`` patterns and leaves
    ``Dropout2d`` (``feature_dropout``) active in evaluation; setting the flag argument covers
    every dropout variant and every BN op, including momentum/eps values its patterns miss.
    """
    changed = False
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _DROPOUTS:
            index, value = _DROPOUT_TRAIN_ARG, dropout
        elif node.target in _BATCH_NORMS:
            index, value = _BN_TRAINING_ARG, bn_stats
        else:
            continue
        if node.args[index] != value:
            node.update_arg(index, value)
            changed = True
    if changed:
        graph.recompile()


class QATModel(nn.Module):
    """The prepared PT2E graph, with ``train()``/``eval()`` that really switch modes.

    An exported graph refuses ``train()``/``eval()``; here ``eval()`` turns dropout off, uses BN
    running statistics and stops the range observers (so evaluation data never moves a scale),
    and ``train()`` undoes that except for what :meth:`freeze` froze. The parameters are the
    float model's own tensors, so an optimizer built from this module trains them.
    """

    def __init__(self, prepared: GraphModule) -> None:
        super().__init__()
        self.prepared = prepared
        # the exported graph counts batches even in evaluation, which must change no state (under
        # DDP only rank 0 evaluates, so the replicas' digests would differ): eval restores them
        self._batch_counters = [name for name, _ in prepared.named_buffers() if name.endswith("num_batches_tracked")]
        self.bn_frozen = False
        self.observers_frozen = False
        self.train(True)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return self.prepared(x)
        counts = {name: self.prepared.get_buffer(name).clone() for name in self._batch_counters}
        out = self.prepared(x)
        with torch.no_grad():
            for name, value in counts.items():
                self.prepared.get_buffer(name).copy_(value)
        return out

    def train(self, mode: bool = True) -> QATModel:
        for module in self.modules():
            module.training = mode
        self._apply_mode()
        return self

    def freeze(self, *, bn: bool, observers: bool) -> None:
        """Fix BN statistics and/or quantization ranges for the rest of training."""
        self.bn_frozen, self.observers_frozen = bn, observers
        self._apply_mode()

    def fake_quantizers(self) -> list[FakeQuantizeBase]:
        return [m for m in self.prepared.modules() if isinstance(m, FakeQuantizeBase)]

    def _apply_mode(self) -> None:
        _set_graph_mode(self.prepared, dropout=self.training, bn_stats=self.training and not self.bn_frozen)
        observe = self.training and not self.observers_frozen
        for quantizer in self.fake_quantizers():
            quantizer.enable_observer(observe)


def _check_input_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ConfigError(f"QAT input_shape must be (channels, frequency, time) of positive ints, got {input_shape!r}")
    return shape  # type: ignore[return-value]


def prepare_qat(model: nn.Module, input_shape: tuple[int, int, int], config: QATConfig | None = None) -> QATModel:
    """Export ``model`` (dynamic batch, fixed ``(channels, frequency, time)``) and insert fake-quant."""
    config = config or QATConfig()
    shape = _check_input_shape(input_shape)
    device = next(model.parameters()).device
    example = torch.zeros((2, *shape), device=device)  # batch 2: a size-1 dim would be specialised
    batch = torch.export.Dim("batch")
    graph = torch.export.export(model.train(), (example,), dynamic_shapes=({0: batch},)).module()
    quantizer = OrtInt8Quantizer(float_scopes(model), activation_spec(config.activation_averaging))
    prepared = prepare_qat_pt2e(graph, quantizer)
    qat = QATModel(prepared)
    if not any(q.qscheme == torch.per_channel_symmetric for q in qat.fake_quantizers()):
        raise ConfigError(f"{type(model).__name__} has no Conv2d outside frequency-wise norms to quantize; "
                          "use a model with conv layers")
    return qat


_PATTERNS: dict[tuple[Any, ...], GraphModule] = {}
"""torchao's traced conv-BN folding patterns, by pattern code, closure and example-input shapes."""


def _pattern_key(value: Any) -> Any:
    return ("tensor", tuple(value.shape), value.dtype, value.device.type) if isinstance(value, Tensor) else value


@contextlib.contextmanager
def _reused_patterns() -> Iterator[None]:
    """Trace each of torchao's ~100 folding patterns once per process instead of once per convert.

    ``convert_pt2e`` re-exports every pattern on every call (about 20 s on a laptop CPU, most of a
    conversion); a pattern is a pure function of its code, its closure and the input shapes, so
    the traced graph is reused. Anything unexpected (another torchao layout) falls back to tracing.
    """
    from torchao.quantization.pt2e import qat_utils

    trace = getattr(qat_utils, "_get_aten_graph_module_for_pattern", None)
    if trace is None:
        yield
        return

    def reuse(pattern: Callable[..., Any], example_inputs: tuple[Any, ...], is_cuda: bool = False,
              **kwargs: Any) -> GraphModule:
        function = getattr(pattern, "fn", pattern)  # torchao wraps patterns in a module holding ``fn``
        code = getattr(function, "__code__", None)
        if code is None:
            return trace(pattern, example_inputs, is_cuda, **kwargs)
        key = (code, tuple(cell.cell_contents for cell in function.__closure__ or ()), is_cuda,
               tuple(map(_pattern_key, example_inputs)),
               tuple(sorted((name, _pattern_key(value)) for name, value in kwargs.items())))
        if key not in _PATTERNS:
            _PATTERNS[key] = trace(pattern, example_inputs, is_cuda, **kwargs)
        return _PATTERNS[key]

    qat_utils._get_aten_graph_module_for_pattern = reuse
    try:
        yield
    finally:
        qat_utils._get_aten_graph_module_for_pattern = trace


def convert_qat(qat: QATModel, *, snap_biases: bool = True) -> GraphModule:
    """The deployable int8 graph: BN folded, int8 weights, Q/DQ with the trained scales.

    The conv biases are put on the int32 grid the integer kernels use (:func:`snap_conv_biases`);
    ``snap_biases=False`` keeps torchao's float biases, the graph that computes exactly what QAT
    evaluated. Works on a copy in eval mode, so training can go on. The first call in a process
    takes tens of seconds (torchao traces its conv-BN folding patterns); later ones reuse them.
    """
    prepared = copy.deepcopy(qat.prepared)
    _set_graph_mode(prepared, dropout=False, bn_stats=False)
    for quantizer in prepared.modules():
        if isinstance(quantizer, FakeQuantizeBase):
            quantizer.enable_observer(False)
    with _reused_patterns():
        converted = convert_pt2e(prepared)
    _drop_unused_attributes(converted)
    if snap_biases:
        snap_conv_biases(converted)
    return allow_exported_model_train_eval(converted)  # export code may call .eval(); it is a no-op here


def snap_conv_biases(converted: GraphModule) -> int:
    """Put every int8 conv's float bias on the int32 grid onnxruntime computes it on; the count snapped.

    onnxruntime's integer conv adds the bias as ``round(bias / (input scale × weight scale))``
    (float32, ties to even), which moves a conv output by up to half an accumulator step (0.2-6 %
    of an activation step on a trained c = 40 run). That flips the rounding of about 1 % of the
    next uint8 activations, and the frequency-wise norms amplify the flips layer by layer: that
    run's int8 kernels agreed with its torch graph on 97.7 % of clips, and gave the Q/DQ
    simulation's uint8 codes exactly once the biases sat on the grid
    (docs/export-latency.md §15). So the deployed graph is defined with the rounded biases, and
    torch evaluation, the ONNX file and the kernels compute the same model. A conv followed by a
    sub-spectral norm keeps its bias; the norm's shift moves instead, onto the grid of the int8
    band convs the export makes of the pair (:func:`_snap_band_shifts`).
    """
    snapped = 0
    for node in converted.graph.nodes:
        if node.op != "call_function" or node.target not in _CONVS:
            continue
        activation, weight = node.args[:2]
        bias = node.args[2] if len(node.args) > 2 else None
        if not (isinstance(activation, Node) and activation.target == _DEQUANTIZE_PER_TENSOR
                and isinstance(weight, Node) and weight.target == _DEQUANTIZE_PER_CHANNEL):
            continue
        step = torch.tensor(activation.args[1], dtype=torch.float32) * converted.get_buffer(str(weight.args[1].target))
        bias_values = converted.get_parameter(str(bias.target)) if isinstance(bias, Node) and bias.op == "get_attr" \
            else None
        quantized_norm = _reader_chain(node, (*_SUBBAND_NORM, (_QUANTIZE_PER_TENSOR,)), complete=True)
        with torch.no_grad():
            if quantized_norm:
                _snap_band_shifts(converted, quantized_norm[1], step.double(), bias_values)
            elif bias_values is not None:
                bias_values.copy_(torch.round(bias_values.float() / step) * step)
            else:
                continue
        snapped += 1
    return snapped


def _snap_band_shifts(converted: GraphModule, norm: Node, step: Tensor, conv_bias: Tensor | None) -> None:
    """Put each band's folded bias on the grid of its int8 band conv by moving the norm's shift.

    The export folds conv and norm into one depthwise conv per band, weights scaled by the band's
    ``a = gamma / sqrt(var + eps)`` and bias ``a * conv_bias + beta - a * mean``, which the integer
    kernel adds as a multiple of ``input scale * weight scale * |a|`` (asc.export.precision).
    """
    weight, beta, mean, var = (_graph_tensor(converted, arg) for arg in norm.args[1:5])
    eps = float(norm.args[_BN_EPS_ARG])
    scale = weight.double() / torch.sqrt(var.double() + eps)
    bands = scale.numel() // step.numel()  # BN channel c * bands + b is conv channel c, band b
    bias = torch.zeros_like(step) if conv_bias is None else conv_bias.double()
    folded = scale * bias.repeat_interleave(bands) + beta.double() - mean.double() * scale
    band_step = (step.repeat_interleave(bands) * scale.abs()).clamp_min(torch.finfo(torch.float32).tiny)
    beta.copy_(beta.double() + torch.round(folded / band_step) * band_step - folded)


def _graph_tensor(graph: GraphModule, node: Any) -> Tensor:
    name = str(node.target)
    with contextlib.suppress(AttributeError):
        return graph.get_parameter(name)
    return graph.get_buffer(name)


def _drop_unused_attributes(graph: GraphModule) -> None:
    """Remove the float weights and BN tensors that folding replaced, so only deployed ones remain."""
    used = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for name, _ in list(graph.named_parameters()) + list(graph.named_buffers()):
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(graph.get_submodule(owner) if owner else graph, attr)
    graph.delete_all_unused_submodules()


@dataclass(frozen=True)
class Int8ConvWeight:
    """One deployed conv weight: ``weight = q * scale[c]`` per output channel ``c``."""

    name: str
    q: Tensor
    scale: Tensor

    def dequantized(self) -> Tensor:
        return self.q.float() * self.scale.float().reshape(-1, *([1] * (self.q.dim() - 1)))


def int8_conv_weights(converted: GraphModule) -> list[Int8ConvWeight]:
    """The int8 weights of a converted graph, in graph order (for size reports and checks)."""
    weights = []
    for node in converted.graph.nodes:
        if node.op == "call_function" and node.target in _CONVS:
            dequant = node.args[1]
            if not (isinstance(dequant, Node) and dequant.target == _DEQUANTIZE_PER_CHANNEL):
                continue
            q_node, scale_node = dequant.args[0], dequant.args[1]
            weights.append(Int8ConvWeight(str(q_node.target), converted.get_buffer(str(q_node.target)),
                                          converted.get_buffer(str(scale_node.target))))
    return weights


# ---------------------------------------------------------------------------------------------
# The training-loop plugin


class Int8QAT(TrainHook):
    """Int8 QAT for the training loop; ``finalize`` returns the :func:`convert_qat` graph.

    ``input_shape`` is one example's ``(channels, frequency, time)``: the graph is exported with a
    dynamic batch but fixed feature size. Observer ranges and fake-quant scales are buffers of
    the wrapped model, so they travel in the model's ``state_dict`` (the loop checkpoints it);
    the hook's own state is the freeze phase. ``float_model`` is the module that was wrapped: it
    shares parameters and buffers with the graph, so it holds the QAT-trained float weights.
    """

    name = "qat"

    def __init__(self, input_shape: tuple[int, int, int], config: QATConfig | None = None) -> None:
        self.input_shape = _check_input_shape(input_shape)
        self.config = config or QATConfig()
        self.float_model: nn.Module | None = None
        self.qat: QATModel | None = None

    def wrap_model(self, model: nn.Module) -> nn.Module:
        self.float_model = model
        self.qat = prepare_qat(model, self.input_shape, self.config)
        return self.qat

    def _model(self) -> QATModel:
        if self.qat is None:
            raise AscError("Int8QAT: the model was not wrapped yet; call wrap_model (the Trainer does) first")
        return self.qat

    def setup(self, trainer: Trainer) -> None:
        epochs = trainer.config.train.epochs
        if self.config.freeze_observer_epochs >= epochs:
            raise ConfigError(f"QAT freeze_observer_epochs={self.config.freeze_observer_epochs} leaves none of the "
                              f"{epochs} epochs to measure activation ranges; lower it below train.epochs")

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        bn, observers = self.config.phase(epoch, trainer.config.train.epochs)
        self._model().freeze(bn=bn, observers=observers)

    def eval_forward(self, trainer: Trainer, model: nn.Module, x: Tensor) -> Tensor:
        qat = self._model()
        if qat.training:
            qat.eval()
        return qat(x)

    def finalize(self, model: nn.Module) -> nn.Module:
        if not isinstance(model, QATModel):
            raise AscError(f"Int8QAT.finalize: expected the QATModel returned by wrap_model, "
                           f"got {type(model).__name__}; run the hooks that replace the model before Int8QAT")
        return convert_qat(model)

    def state_dict(self) -> dict[str, Any]:
        qat = self._model()
        return {"bn_frozen": qat.bn_frozen, "observers_frozen": qat.observers_frozen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._model().freeze(bn=bool(state["bn_frozen"]), observers=bool(state["observers_frozen"]))


def observed_int8_graph(model: nn.Module, input_shape: tuple[int, int, int], batches: Iterable[Any]) -> GraphModule:
    """The graph a QAT run would deploy for ``model``, with ranges observed on ``batches`` and no training.

    BN statistics and weights stay as they are (``model`` shares them with the wrapper, so pass a
    copy to keep it usable). Latency studies and export tests need the deployed QAT structure
    without paying for quantization-aware training; the weights' values do not change the graph.
    """
    hook = Int8QAT(input_shape)
    qat = hook.wrap_model(model)
    qat.train()
    qat.freeze(bn=True, observers=False)  # observe ranges without moving BN statistics
    with torch.no_grad():
        for batch in batches:
            qat(torch.as_tensor(batch))
    qat.eval()
    return hook.finalize(qat)
