"""Torch to ONNX for deployment: fp32 export, int8 QDQ, the in-graph front end, ORT format.

What the choices rest on (measured on this CPU, reference/compression.md §3-§5):

* Only the dynamo exporter maps ``torch.stft`` (to the ONNX ``STFT`` op) and exports torchao PT2E
  Q/DQ graphs, so it is the one exporter used. Its defaults write the weights to a side file and
  tag every node with metadata (+35 % file size); both are turned off or stripped here.
* int8 is ``quant_pre_process`` + ``quantize_static`` in QDQ format with per-channel int8 weights
  and **uint8 activations** (U8S8). onnxruntime's default int8 activations (S8S8) left depthwise
  convs unfused into ``QLinearConv`` and ran 1.9-2.4x slower on x86.
* The weights use **7 bits** ([-64, 64], onnxruntime's ``reduce_range``). x86 CPUs without VNNI
  multiply U8S8 with ``vpmaddubsw``, which adds two u8*s8 products into a saturating int16: with
  8-bit weights 255*127*2 overflows it, and the same file gave max |Δlogit| 0.42 on AVX2 EPYCs (CI, and emulated)
  against 0.05 on an AVX-512 VNNI/AMX Xeon. 255*64*2 fits, so a 7-bit file computes the same logits,
  bit for bit, on both CPU classes (docs/export-latency.md §10).
* The frequency-wise norms stay float: their per-bin statistics divide by a spread, and
  quantizing their multiplies tripled the logit drift at no speed gain (§4.1).
* What ships is as small as the weights allow (:func:`compact_onnx`, :func:`pack_onnx`): exporter
  names were a quarter of an int8 file, and int8 zeros (pruned weights) are stored dense because
  onnxruntime's CPU kernels are dense; an xz container holds them at ~1.2 bytes per non-zero
  weight. The ORT format stores a type/shape table for every tensor and is 2.5-3x the ONNX file
  (docs/export-latency.md §12).
* The front end is exported on its own and joined to the (possibly int8) CNN with
  ``onnx.compose``: quantization never touches the STFT, and ``quant_pre_process``, whose symbolic
  shape inference crashes on ``STFT``, never sees it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import lzma
import re
import shutil
import sys
import tempfile
import warnings
from ast import literal_eval
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import Tensor, nn

from asc.errors import AscError, ConfigError
from asc.features import FeatureConfig, LogMel

OPSET = 18
"""ONNX opset of every exported graph (>= 17 for STFT; 18 is what the exporter targets natively)."""
BATCH = "batch"
"""Name of the dynamic batch dimension in every exported graph."""
FRONTEND_INPUT = "audio"
FEATURE_INPUT = "log_mel"
OUTPUT = "logits"
FRONTEND_SCOPE = "frontend."
"""Name prefix of the front end's nodes in an in-graph model (:func:`compose_frontend`)."""

_CLASS_HIERARCHY = "pkg.torch.onnx.class_hierarchy"
_OWN_METADATA = "asc."
INT8_OPERANDS_KEY = "asc.int8_operands"
"""Model metadata key of :func:`int8_operands`' record (JSON), readable by any onnxruntime app."""
INT16_PAIR_LIMIT = 32767
"""What ``vpmaddubsw`` (U8S8 on x86 without VNNI) can hold: two u8*s8 products added in int16."""


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Silence library loggers below ERROR for a moment (exporter and quantizer chatter)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# ---------------------------------------------------------------------------------------------
# torch -> ONNX


def torch_to_onnx(module: nn.Module, example: Tensor, *, input_name: str = "x", output_name: str = OUTPUT,
                  opset: int = OPSET) -> onnx.ModelProto:
    """Trace ``module`` with a dynamic batch dimension, keeping the exporter's node metadata.

    The metadata says which module each node came from (see :func:`nodes_inside`);
    :func:`save_onnx` strips it. ``example`` needs a batch of at least 2: a size-1 dimension would
    be specialised. A graph that already holds int8 Q/DQ (a converted PT2E graph) exports as is.
    """
    batch = torch.export.Dim(BATCH)
    try:
        with _quiet("torch.onnx", "torch.export"), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)  # torch-internal deprecation notices
            # an exported graph has no train/eval switch, so its flag says nothing
            warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
            program = torch.onnx.export(module, (example,), dynamo=True, external_data=False, opset_version=opset,
                                        dynamic_shapes=({0: batch},), input_names=[input_name],
                                        output_names=[output_name], verbose=False)
    except Exception as error:  # the exporter raises many types; all mean "this module does not export"
        raise AscError(f"{type(module).__name__}: the ONNX exporter failed ({_root_cause(error)}); "
                       "the model uses an operation ONNX export does not support") from None
    return program.model_proto


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost cause: the exporter wraps the real reason in a long guide."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def nodes_inside(model: onnx.ModelProto, base: type) -> list[str]:
    """Names of the nodes traced inside an instance of ``base`` (or a subclass).

    Read from the exporter's class-hierarchy metadata, so it works for a plain module and for a
    graph loaded from ``torch.export`` (whose nodes still carry their original module classes).
    Only classes already imported can match, which is always true for ``base``'s subclasses in use.
    """
    names = []
    for node in model.graph.node:
        hierarchy = next((p.value for p in node.metadata_props if p.key == _CLASS_HIERARCHY), None)
        if hierarchy and any(_is_subclass(path, base) for path in literal_eval(hierarchy)):
            names.append(node.name)
    return names


def _is_subclass(qualified_name: str, base: type) -> bool:
    module_name, _, class_name = qualified_name.rpartition(".")
    cls = getattr(sys.modules.get(module_name), class_name, None)
    return isinstance(cls, type) and issubclass(cls, base)


def strip_onnx(model: onnx.ModelProto) -> None:
    """Drop per-node and per-graph metadata, intermediate shape annotations and unused opset imports, in place.

    All are redundant for inference (ORT infers shapes) and were over a third of the file. Opset
    imports are also de-duplicated (``onnx.compose`` lists a shared domain once per input model).
    Model metadata of asc's own (``asc.*``, e.g. :data:`INT8_OPERANDS_KEY`) is kept.
    """
    graph = model.graph
    for items in (graph.node, graph.input, graph.output, graph.initializer):
        for item in items:
            del item.metadata_props[:]
    del graph.value_info[:]
    del graph.metadata_props[:]  # the exporter's per-graph records (pkg.torch.*), ~14 KB
    own = [(p.key, p.value) for p in model.metadata_props if p.key.startswith(_OWN_METADATA)]
    del model.metadata_props[:]
    for key, value in own:
        model.metadata_props.add(key=key, value=value)
    used = {node.domain for node in graph.node} | {""}
    versions: dict[str, int] = {}
    for opset in model.opset_import:
        if opset.domain in used:
            versions[opset.domain] = max(opset.version, versions.get(opset.domain, 0))
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in versions.items())


def save_onnx(model: onnx.ModelProto, path: str | Path) -> Path:
    """Strip ``model`` (in place), write it as one self-contained file and run the full checker."""
    path = Path(path)
    strip_onnx(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise AscError(f"{path}: the exported graph is not valid ONNX ({str(error).splitlines()[0]}); "
                       "report this model, the export is broken") from None
    return path


def export_onnx(module: nn.Module, example_input: Tensor, path: str | Path, *, input_name: str = "x",
                output_name: str = OUTPUT, opset: int = OPSET) -> Path:
    """Write ``module`` as one checked ONNX file with a dynamic batch dimension.

    For a converted PT2E graph that is an int8 QDQ model (its operands recorded, see
    :func:`record_int8_operands`); any plain float module exports the same way. The file must
    also run in onnxruntime on ``example_input`` with finite logits of the torch output's shape.
    """
    model = torch_to_onnx(module, example_input, input_name=input_name, output_name=output_name, opset=opset)
    if int8_weights(model):  # a QAT graph: its trained weight range decides whether non-VNNI x86 saturates
        record_int8_operands(model)
    path = save_onnx(model, path)
    with torch.no_grad():
        expected = module(example_input)
    logits = run_onnx(path, example_input)
    if logits.shape != tuple(expected.shape) or not np.isfinite(logits).all():
        raise AscError(f"{path}: onnxruntime returned {logits.shape} logits (finite: {np.isfinite(logits).all()}), "
                       f"torch {tuple(expected.shape)}; report this model, the export is broken")
    return path


def is_quantized_graph(module: nn.Module) -> bool:
    """Whether ``module`` holds int8 Q/DQ ops already (a torchao ``convert_pt2e`` graph).

    Such a graph carries its own trained scales (QAT), so it is exported as is, never re-quantized.
    """
    return any(
        node.op == "call_function" and getattr(node.target, "namespace", None) == "quantized_decomposed"
        for graph in module.modules() if isinstance(graph, torch.fx.GraphModule)
        for node in graph.graph.nodes
    )


# ---------------------------------------------------------------------------------------------
# onnxruntime


def ort_session(path: str | Path, *, fused: bool = True, optimized_path: Path | None = None,
                threads: int = 1) -> ort.InferenceSession:
    """A CPU session with every graph optimisation; ``fused=False`` keeps Q/DQ as float ops."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # the NCHWc "hardware specific" notice is expected here
    if not fused:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: str | Path, x: Tensor | np.ndarray, *, fused: bool = True) -> np.ndarray:
    """Logits of an ONNX model in onnxruntime; ``fused=False`` keeps Q/DQ as separate float ops.

    The unfused run computes what the torch graph computes, so it separates "the file is wrong"
    from "ORT's integer kernels round differently".
    """
    session = ort_session(Path(path), fused=fused)
    inputs = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float32)
    return session.run(None, {session.get_inputs()[0].name: inputs})[0]


# ---------------------------------------------------------------------------------------------
# int8 QDQ


FloatNodes = Collection[str] | Callable[[onnx.ModelProto], Collection[str]]
"""Node names to keep float, or a function that picks them from the pre-processed graph."""
WeightBits = Literal[7, 8]
WEIGHT_BITS: tuple[int, ...] = (7, 8)
Calibration = Literal["minmax", "percentile", "entropy"]
CALIBRATIONS: tuple[str, ...] = ("minmax", "percentile", "entropy")
_CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                        "entropy": CalibrationMethod.Entropy}
CALIBRATION_CHUNK = 4
"""Clips per calibration step: bounds the activations a histogram calibrator holds at once."""


@dataclass(frozen=True)
class Int8Options:
    """How :func:`quantize_int8` quantizes; the defaults are the recipe measured best on x86.

    ``keep_float`` is how a mixed-precision plan (:mod:`asc.export.precision`) plugs in: names
    refer to nodes of the graph after ``quant_pre_process`` (the fp32 export's names survive it),
    and a callable receives that graph to choose by pattern (e.g. every depthwise conv).
    Every calibration streams: the clips are fed a few at a time (onnxruntime's strided
    calibration), so percentile and entropy histograms merge chunk by chunk instead of holding
    every activation of every clip (~150 MB per 10-s clip at c=40). Entropy (KL) picks each range
    from the histogram, percentile clips a fixed tail; MinMax keeps every outlier.

    Keeping a conv out of the quantizer does not always keep it float: when its input and output
    are quantized anyway, onnxruntime quantizes its weight at load time (the
    ``WeightBiasQuantization`` optimizer) and runs it as ``QLinearConv``. Keep its neighbours'
    tensors float too, or check :func:`~asc.export.verify.fusion_census`.

    ``weight_bits=7`` (the default) is what makes the file compute the same on every x86 CPU:
    8-bit weights saturate the int16 pair sums of the non-VNNI U8S8 kernels (module docstring).
    8 bits is one bit finer and only correct on VNNI/AMX CPUs and ARM; keep it for comparisons.
    """

    calibration: Calibration = "minmax"
    percentile: float = 99.999
    keep_float: FloatNodes = ()
    weight_bits: WeightBits = 7

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(f"int8 calibration must be one of {', '.join(CALIBRATIONS)}, got {self.calibration!r}")
        if not 0.0 < self.percentile <= 100.0:
            raise ConfigError(f"int8 percentile must be in (0, 100], got {self.percentile!r}")
        if self.weight_bits not in WEIGHT_BITS:
            raise ConfigError(f"int8 weight_bits must be 7 (correct on every x86 CPU) or 8 (VNNI/ARM only), "
                              f"got {self.weight_bits!r}")


class _Batches(CalibrationDataReader):
    """Calibration clips in chunks of :data:`CALIBRATION_CHUNK`, with the ``set_range`` that
    onnxruntime's strided calibration (``CalibStridedMinMax``) uses to collect one chunk at a time."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]) -> None:
        self._name = input_name
        self._chunks = [np.ascontiguousarray(batch[i:i + CALIBRATION_CHUNK], dtype=np.float32)
                        for batch in batches for i in range(0, len(batch), CALIBRATION_CHUNK)]
        self._next, self._end = 0, len(self._chunks)

    def __len__(self) -> int:
        return len(self._chunks)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, min(end_index, len(self._chunks))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        self._next += 1
        return {self._name: self._chunks[self._next - 1]}


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calibration: Iterable[np.ndarray],
                  options: Int8Options | None = None, *, float_nodes: Collection[str] = ()) -> Path:
    """Write the int8 QDQ version of an fp32 ONNX file, calibrated on ``calibration`` batches.

    ``float_nodes`` are nodes the caller knows must stay float (the exporter's frequency-norm
    nodes, see :func:`nodes_inside`); ``options.keep_float`` adds the plan's own choices. Batches
    are the model's input, e.g. log-mels ``(n, 1, F, T)`` of training clips.
    """
    options = options or Int8Options()
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    with tempfile.TemporaryDirectory(prefix="asc-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        with _quiet("root"):
            quant_pre_process(str(fp32_path), str(prepared))
        model = onnx.load(str(prepared))
        plan = options.keep_float(model) if callable(options.keep_float) else options.keep_float
        exclude = sorted(set(float_nodes) | set(plan))
        unknown = sorted(set(exclude) - {node.name for node in model.graph.node})
        if unknown:
            raise ConfigError(f"{fp32_path}: nodes to keep float are not in the graph: {unknown[:5]}; "
                              "name nodes of the graph after quant_pre_process")
        input_name = model.graph.input[0].name
        reader = _Batches(input_name, calibration)
        if not len(reader):
            raise AscError(f"{fp32_path}: int8 calibration failed (no clips); give at least one calibration clip")
        extra: dict[str, Any] = {"QDQOpTypePerChannelSupportToAxis": {"BatchNormalization": 0},  # BN scales are 1-D
                                 "CalibStridedMinMax": 1}  # one chunk per collection step: streams
        if options.calibration == "percentile":
            extra["CalibPercentile"] = options.percentile
        try:
            # the quantizer logs per-tensor notes through the root logger and prints calibration progress
            with _quiet("root"), contextlib.redirect_stdout(io.StringIO()):
                quantize_static(
                    str(prepared), str(out_path), reader,
                    quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=options.weight_bits == 7,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=_CALIBRATION_METHODS[options.calibration],
                    nodes_to_exclude=exclude, extra_options=extra)
        except ValueError as error:  # "No data is collected." for an empty calibration set
            raise AscError(f"{fp32_path}: int8 calibration failed ({error}); give at least one calibration clip") \
                from None
    quantized = onnx.load(str(out_path))
    record_int8_operands(quantized)
    return save_onnx(quantized, out_path)


def int8_pair_peak(model: onnx.ModelProto) -> int:
    """The largest |u8 * s8 + u8 * s8| the model's int8 weights allow (0 without int8 weights).

    255 times the two largest |weight|s of a tensor, whichever two weights a kernel pairs. Above
    :data:`INT16_PAIR_LIMIT`, x86 CPUs without VNNI saturate and compute other logits than VNNI
    ones; it is computed from the file, so the verdict is the same on any CPU that checks it.
    """
    peak = 0
    for weight in int8_weights(model).values():
        magnitudes = np.abs(weight.astype(np.int32)).ravel()
        top_two = np.partition(magnitudes, -2)[-2:] if magnitudes.size > 1 else magnitudes
        peak = max(peak, 255 * int(top_two.sum()))
    return peak


def int8_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The signed int8 initializers that a ``DequantizeLinear`` turns into conv/gemm weights, by name."""
    constants = {init.name: init for init in model.graph.initializer}
    out: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        init = constants.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if init is not None and init.data_type == onnx.TensorProto.INT8 and len(init.dims) >= 2:
            out[init.name] = onnx.numpy_helper.to_array(init)
    return out


def record_int8_operands(model: onnx.ModelProto) -> dict[str, Any]:
    """Write what the int8 operands are into the model's metadata (in place) and return it.

    Measured from the weights themselves, so the record cannot claim a range the file does not
    have; an app or :mod:`benchmarks.int8_cpu_classes` reads it with onnxruntime's model metadata.
    """
    weights = int8_weights(model)
    peak = max((int(np.abs(w.astype(np.int32)).max()) for w in weights.values()), default=0)
    pair_peak = int8_pair_peak(model)
    record: dict[str, Any] = {
        "format": "QDQ", "activations": "uint8 per-tensor", "weights": "int8 per-channel symmetric",
        "weight_range": [-peak, peak], "weight_bits": 7 if peak <= 64 else 8,
        "int16_pair_peak": pair_peak, "int16_safe": pair_peak <= INT16_PAIR_LIMIT,
    }
    own = [p for p in model.metadata_props if p.key != INT8_OPERANDS_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(own)
    model.metadata_props.add(key=INT8_OPERANDS_KEY, value=json.dumps(record))
    return record


def int8_operands(path: str | Path) -> dict[str, Any] | None:
    """The :func:`record_int8_operands` record of an ONNX file, or None (fp32 or an older export)."""
    value = next((p.value for p in onnx.load(str(path), load_external_data=False).metadata_props
                  if p.key == INT8_OPERANDS_KEY), None)
    return None if value is None else json.loads(value)


# ---------------------------------------------------------------------------------------------
# Size: what the shipped file holds, and the container


CONTAINER_SUFFIX = ".xz"
"""A bundle's compressed model is ``model.onnx.xz``: plain xz, which Android and iOS apps unpack
with standard libraries (and :mod:`asc.runtime` with :mod:`lzma`)."""


def _xz(data: bytes) -> bytes:
    """xz at the strongest preset, its dictionary cut to the data's size: a decoder allocates the
    whole dictionary (64 MiB at preset 9), too much to ask of a phone for a 100 KB model."""
    dictionary = max(1 << 12, 1 << (len(data) - 1).bit_length())
    return lzma.compress(data, format=lzma.FORMAT_XZ, filters=[
        {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": min(dictionary, 1 << 26)}])


def compact_onnx(model: onnx.ModelProto, *, scopes: tuple[str, ...] = (FRONTEND_SCOPE,)) -> None:
    """Give nodes and internal tensors short names and store identical constants once, in place.

    The exporter's and the quantizer's names (``node_quantize_per_tensor_73``,
    ``...asc_band3_w_quantized``) were 20-25 % of an int8 file; they mean nothing to onnxruntime.
    The graph's inputs and outputs keep their names (the app feeds them by name), and a node keeps
    its ``scopes`` prefix (``frontend.``: ``asc bench`` times the in-graph front end by it). Run
    it last: :func:`nodes_inside` and the precision plans find nodes by the names it removes.
    """
    graph = model.graph
    if any(node.attribute and any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                  for a in node.attribute) for node in graph.node):
        return  # subgraphs see outer names: leave such (control-flow) graphs as they are
    kept = {value.name for value in [*graph.input, *graph.output]}
    same: dict[tuple[int, tuple[int, ...], bytes], str] = {}
    alias: dict[str, str] = {}
    unique = []
    for init in graph.initializer:
        key = (init.data_type, tuple(init.dims), onnx.numpy_helper.to_array(init).tobytes())
        if key in same and init.name not in kept:
            alias[init.name] = same[key]
        else:
            same.setdefault(key, init.name)
            unique.append(init)
    del graph.initializer[:]
    graph.initializer.extend(unique)
    short: dict[str, str] = {}

    def rename(name: str) -> str:
        name = alias.get(name, name)
        if not name or name in kept:
            return name
        return short.setdefault(name, f"t{len(short):x}")

    for init in graph.initializer:
        init.name = rename(init.name)
    for index, node in enumerate(graph.node):
        scope = next((prefix for prefix in scopes if node.name.startswith(prefix)), "")
        node.name = f"{scope}n{index:x}"
        node.doc_string = ""
        node.input[:] = [rename(name) for name in node.input]
        node.output[:] = [rename(name) for name in node.output]
    graph.doc_string = ""


def pack_onnx(onnx_path: str | Path, out_path: str | Path | None = None) -> Path:
    """Write the xz container of an ONNX file (default: next to it, ``+ .xz``); byte-exact on unpacking."""
    onnx_path = Path(onnx_path)
    out_path = Path(out_path) if out_path is not None else onnx_path.with_name(onnx_path.name + CONTAINER_SUFFIX)
    out_path.write_bytes(_xz(onnx_path.read_bytes()))
    return out_path


@dataclass(frozen=True)
class ModelBytes:
    """Where the bytes of an ONNX file go, and how small its xz container is.

    ``packed_without_weights`` is the container of the same file with every int8 weight set to
    zero: the fixed overhead (graph, scales, biases, float parameters) that the weights add to.
    """

    file: int
    int8_weights: int  #: int8 conv/gemm weights as stored (dense)
    nonzero_int8_weights: int
    float_initializers: int  #: fp32 weights, per-channel scales, float biases, norm parameters
    other_initializers: int  #: zero points, int32 biases, shapes
    structure: int  #: nodes, names, attributes, graph inputs/outputs, metadata
    packed: int
    packed_without_weights: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def model_bytes(model: onnx.ModelProto | str | Path) -> ModelBytes:
    """Measure :class:`ModelBytes` of a model (or a file) as it would be written."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    weights = int8_weights(model)
    int8_bytes = float_bytes = other_bytes = 0
    for init in model.graph.initializer:
        size = init.ByteSize()
        if init.name in weights:
            int8_bytes += size
        elif init.data_type == onnx.TensorProto.FLOAT:
            float_bytes += size
        else:
            other_bytes += size
    serialized = model.SerializeToString()
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    for init in zeroed.graph.initializer:
        if init.name in weights:
            init.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(weights[init.name]), init.name))
    return ModelBytes(
        file=len(serialized), int8_weights=int8_bytes,
        nonzero_int8_weights=sum(int(np.count_nonzero(w)) for w in weights.values()),
        float_initializers=float_bytes, other_initializers=other_bytes,
        structure=len(serialized) - int8_bytes - float_bytes - other_bytes,
        packed=len(_xz(serialized)),
        packed_without_weights=len(_xz(zeroed.SerializeToString())),
    )


# ---------------------------------------------------------------------------------------------
# front end in the graph


def export_frontend(features: FeatureConfig, clip_samples: int, path: str | Path) -> Path:
    """The log-mel front end alone: raw PCM ``(batch, clip_samples)`` -> ``(batch, 1, F, T)``.

    It is the training :class:`~asc.features.LogMel` module itself, so STFT, window, filterbank
    and log match training exactly; the filterbank is a constant (librosa's Slaney mel, which the
    ONNX ``MelWeightMatrix`` op does not implement).
    """
    example = torch.zeros(2, clip_samples)
    model = torch_to_onnx(LogMel(features).eval(), example, input_name=FRONTEND_INPUT, output_name=FEATURE_INPUT)
    return save_onnx(model, path)


def compose_frontend(frontend_path: str | Path, model_path: str | Path, out_path: str | Path) -> Path:
    """Join the front-end graph to a log-mel model: one graph from raw PCM to logits.

    The front end's internal names get a ``frontend.`` prefix so they cannot clash with the
    model's; its input and the model's output keep their names.
    """
    frontend = onnx.load(str(frontend_path))
    model = onnx.load(str(model_path))
    frontend = onnx.compose.add_prefix(frontend, FRONTEND_SCOPE, rename_inputs=False, rename_outputs=False)
    merged = onnx.compose.merge_models(frontend, model,
                                       io_map=[(frontend.graph.output[0].name, model.graph.input[0].name)])
    return save_onnx(merged, out_path)


# ---------------------------------------------------------------------------------------------
# ORT format


ORT_NAME = "model.ort"
OPERATORS_NAME = "required_operators.config"


@dataclass(frozen=True)
class OrtFiles:
    model: Path
    operators: Path  #: the op list a reduced-size onnxruntime build needs (``--include_ops_by_config``)


def convert_to_ort(onnx_path: str | Path, out_dir: str | Path, *,
                   target_platform: Literal["arm", "amd64"] | None = None) -> OrtFiles:
    """ORT-format copy of an ONNX file (``model.ort``) plus its required-operators config.

    Uses onnxruntime's own converter ("Fixed" style, all optimisations). Without a target the
    file stays portable (no x86 NCHWc layouts); ``"arm"`` additionally lets int8 QDQ run as int8
    on ARM kernels. It loads faster and suits reduced runtime builds; it is not smaller.
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="asc-ort-") as tmp:
        source = Path(tmp) / "model.onnx"
        shutil.copyfile(onnx_path, source)
        converted = Path(tmp) / "converted"
        with contextlib.redirect_stdout(io.StringIO()), _quiet("ort_format_model.utils", "root"):
            convert_onnx_models_to_ort(source, output_dir=converted, optimization_styles=[OptimizationStyle.Fixed],
                                       target_platform=target_platform)
        out_dir.mkdir(parents=True, exist_ok=True)
        files = OrtFiles(out_dir / ORT_NAME, out_dir / OPERATORS_NAME)
        shutil.move(converted / "model.ort", files.model)
        config = (converted / "model.required_operators.config").read_text().splitlines()
        # the header names the temporary file it was generated from
        files.operators.write_text("\n".join(f"# - {ORT_NAME}" if line.startswith("# - ") else line
                                             for line in config) + "\n")
    return files
