"""Mixed-precision int8 for onnxruntime on the target CPU: exact int8-friendly rewrites and a measured plan.

Why this exists (numbers in docs/export-latency.md): on x86 onnxruntime only pointwise and dense
convs get faster in int8. Depthwise convs, broadcast adds and every float op left between int8
ops (a DequantizeLinear in, a QuantizeLinear out, often a strided kernel in the NHWC int8
layout) cost more than they save, so plain ``quantize_static`` of BC-ResNet-Mod c=40 ran 1.3-1.7x
*slower* than fp32. Four rewrites of the fp32 graph, each exact in real arithmetic, remove the islands
that made it slow:

* ``subspectral_bands``: the eval-mode sub-spectral norm (Reshape -> BatchNorm -> Reshape, not
  foldable into the conv because its affine changes every few frequency rows) becomes one
  depthwise conv per band with the band's affine folded in, joined by a Concat. onnxruntime
  quantizes that into plain QLinearConvs instead of a float BatchNorm island.
* ``stem_space_to_depth``: a stride-2 conv on one input channel becomes SpaceToDepth + a stride-1
  conv on four channels. int8 kernels handle a 1-channel input badly (the stem was 1.4-1.6x
  slower in int8 than in fp32; on four channels it is 2x faster).
* ``freq_mean_conv``: the mean over frequency (ReduceMean, a strided float reduction once the int8
  graph is NHWC) becomes a depthwise conv with weights 1/F, which runs as QLinearConv.
* ``norm_affine_on_input``: a frequency-wise norm's output ``(x - shift) * scale + offset`` becomes
  ``x * scale + (offset - shift * scale)``, so the shifted copy is only read by the statistics
  and never has to be quantized.

The same rewrites run on a QDQ graph (a PT2E QAT export, whose weights are DequantizeLinear of
int8 codes and whose activations pass trained Q/DQ pairs; :data:`QAT_REWRITES` leaves out the norm
affine, which does not pay there): they move the int8 codes as they
would move float weights, keep every trained scale, and give each new conv a DequantizeLinear
input and a trained QuantizeLinear output so it fuses into a QLinearConv (docs/export-latency.md
§13, §16). QAT quantizes a sub-spectral norm's output, not the conv before it
(asc.compress.quant), so the band convs and the mean conv compute what the trained graph does.

The rewrites tag the nodes they create or match (``.asc_<role>`` in the node name) so that
:func:`node_groups` can tell the pieces apart after ``quant_pre_process``. A
:class:`PrecisionPlan` names the groups that stay float; :func:`plan_precision` times candidate
plans with onnxruntime against fp32 and keeps the fastest one whose top-1 agreement with fp32
meets the bar. The rewrites pay off only in int8: the fp32 bundle keeps the plain graph.
"""

from __future__ import annotations

import tempfile
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

from asc.bench import interleaved
from asc.errors import AscError, ConfigError
from asc.export.onnx import (
    Calibration,
    Int8Options,
    WeightBits,
    ort_session,
    quantize_int8,
    save_onnx,
)
from asc.export.verify import Agreement, compare_logits
from asc.onnx_graph import (
    graph_constants,
    node_attribute,
    prune_dead_nodes,
    tensor_consumers,
    tensor_producers,
)

REWRITES: tuple[str, ...] = ("subspectral_bands", "stem_space_to_depth", "freq_mean_conv", "norm_affine_on_input")
"""All int8-friendly rewrites, in the order they are applied."""

QAT_REWRITES: tuple[str, ...] = ("subspectral_bands", "stem_space_to_depth", "freq_mean_conv")
"""The rewrites ``asc export`` applies to a QAT graph: all but ``norm_affine_on_input``. There the
norm's input is a DequantizeLinear, and once the affine reads it as well as the statistics,
onnxruntime gives each reader its own copy of that DequantizeLinear, a full float pass more per norm;
the trained graph computes ``(x - shift) * scale + offset``, so keeping that form also rounds as
training did: the shipped logits equal the converted graph's on six trained runs, where moving the
affine flipped a clip in two. 2.7 % faster on the 10-s c=40 graph, 2 % slower on the main job's 2-s
c=20 runs (AMD EPYC with AVX-512 VNNI, seeds 0-2; docs/export-latency.md §17)."""


GROUPS: tuple[str, ...] = ("prefix", "norm_stats", "norm_output", "stem", "band_conv", "freq_mean", "depthwise",
                           "pointwise", "dense", "add", "activation", "pool", "other")
"""Node groups a plan can keep float (see :func:`node_groups`)."""

DEFAULT_FLOAT_GROUPS: tuple[str, ...] = ("prefix", "norm_stats", "norm_output")
"""Float by default: the input front (its input is float anyway) and the frequency-wise norms,
whose per-bin scales span decades (up to 1/sqrt(eps) for silent bins). On the trained c=40 model,
putting the input norm in int8 dropped top-1 agreement with fp32 from 98 % to 13 %, the norms'
statistics to 92 %, their output affine to 97 %."""

_TAG = ".asc_"


# ---------------------------------------------------------------------------------------------
# Graph access


class _Graph:
    """An ONNX graph with the lookups the rewrites need; edits go through :meth:`replace`."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.shapes = _static_shapes(model)
        self.constants = graph_constants(self.graph)
        self.producer = tensor_producers(self.graph)
        self.consumers = tensor_consumers(self.graph)
        self._replacements: dict[int, list[onnx.NodeProto]] = {}
        self._dropped: set[int] = set()

    def shape(self, name: str) -> list[int | None] | None:
        return self.shapes.get(name)

    def users(self, name: str) -> list[onnx.NodeProto]:
        """Consumers of a tensor, ignoring ``Shape`` ops (the legacy exporter reads shapes everywhere)."""
        return [node for node in self.consumers.get(name, []) if node.op_type != "Shape"]

    def add_initializer(self, name: str, value: np.ndarray) -> str:
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def replace(self, old: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
        self._replacements[id(old)] = new

    def drop(self, node: onnx.NodeProto) -> None:
        self._dropped.add(id(node))

    def commit(self) -> None:
        """Apply replacements in graph order and remove everything no output depends on any more."""
        nodes: list[onnx.NodeProto] = []
        for node in self.graph.node:
            if id(node) in self._dropped:
                continue
            nodes.extend(self._replacements.get(id(node), [node]))
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        prune_dead_nodes(self.graph)


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Tensor shapes from onnxruntime's symbolic shape inference (symbolic dims become None)."""
    try:
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as error:  # noqa: BLE001 -- the inference raises many types; all mean "no shapes"
        raise AscError(f"shape inference failed on the fp32 graph ({str(error)[:200]}); "
                       "export it with static feature sizes (only the batch may be dynamic)") from None
    graph = inferred.graph
    return {info.name: [dim.dim_value if dim.HasField("dim_value") else None
                        for dim in info.type.tensor_type.shape.dim]
            for info in [*graph.value_info, *graph.input, *graph.output]}


def _reduce_axes(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> list[int] | None:
    """ReduceMean axes from the attribute (opset < 18) or the second input (opset 18)."""
    if len(node.input) > 1 and node.input[1]:
        value = constants.get(node.input[1])
        return None if value is None else [int(a) for a in np.ravel(value)]
    axes = node_attribute(node, "axes")
    return None if axes is None else [int(a) for a in axes]


def _name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _tagged(name: str, role: str) -> str:
    return f"{name}{_TAG}{role}"


# ---------------------------------------------------------------------------------------------
# Rewrites


@dataclass
class RewriteReport:
    """What the rewrites did: how many of each, and which original nodes became which new ones."""

    applied: dict[str, int] = field(default_factory=dict)
    renamed: dict[str, list[str]] = field(default_factory=dict)  #: original node -> its replacement nodes

    def translate(self, names: Iterable[str], graph: onnx.GraphProto) -> list[str]:
        """Node names of the original graph, mapped to the rewritten graph's (gone ones dropped).

        So a caller's float list (e.g. the exporter's frequency-norm nodes) still means the same
        computation after the rewrite.
        """
        present = {node.name for node in graph.node}
        out: list[str] = []
        for name in names:
            out.extend(new for new in self.renamed.get(name, [name]) if new in present)
        return sorted(set(out))


def _subspectral_bands(g: _Graph, report: RewriteReport) -> int:
    count = 0
    for bn in list(g.graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        first = g.producer.get(bn.input[0])
        users = g.users(bn.output[0])
        if first is None or first.op_type != "Reshape" or len(users) != 1 or users[0].op_type != "Reshape":
            continue
        second, x = users[0], first.input[0]
        x_shape, band_shape, y_shape = g.shape(x), g.shape(bn.output[0]), g.shape(second.output[0])
        if not (x_shape and band_shape and y_shape and len(x_shape) == len(band_shape) == 4
                and None not in x_shape[1:] and None not in band_shape[1:] and x_shape[1:] == y_shape[1:]):
            continue
        _, channels, freq, frames = x_shape
        _, stacked, band_rows, band_frames = band_shape
        if band_frames != frames or stacked % channels or stacked // channels * band_rows != freq:
            continue
        params = [g.constants.get(name) for name in bn.input[1:5]]
        if any(p is None for p in params):
            continue
        gamma, beta, mean, var = (np.asarray(p, np.float64) for p in params)
        scale = gamma / np.sqrt(var + float(node_attribute(bn, "epsilon", 1e-5)))
        shift = beta - mean * scale
        bands = stacked // channels
        scale, shift = scale.reshape(channels, bands), shift.reshape(channels, bands)
        nodes = _band_convs(g, x, scale, shift, second.output[0], _name(bn)) \
            or _quantized_band_convs(g, x, scale, shift, second.output[0], _name(bn)) \
            or _band_affine(g, x, scale, shift, band_rows, second.output[0], _name(bn))
        if nodes[-1].op_type == "Concat":  # the band convs replace the conv
            conv = g.producer[x]
            g.replace(conv, nodes)
            g.drop(first)
            report.renamed[_name(conv)] = [node.name for node in nodes if node.op_type == "Conv"]
        else:
            g.replace(first, nodes)
        g.drop(bn)
        g.drop(second)
        report.renamed[_name(bn)] = [node.name for node in nodes]
        count += 1
    return count


def _band_geometry(freq: int, bands: int, kernel: int, pad_top: int, band: int) -> tuple[int, int, int, int]:
    """Rows ``[start, end)`` one band's conv reads (its rows plus the kernel's halo from the
    neighbouring bands) and the zero padding it still needs at the top and bottom of the input."""
    rows = freq // bands
    first, last = band * rows - pad_top, (band + 1) * rows - 1 - pad_top + kernel - 1
    return max(0, first), min(freq - 1, last) + 1, max(0, -first), max(0, last - (freq - 1))


def _quantized_band_convs(g: _Graph, x: str, scale: np.ndarray, shift: np.ndarray, output: str,
                          name: str) -> list[onnx.NodeProto]:
    """The band convs of a QAT graph: the depthwise conv's int8 codes with the band's scale folded
    into the per-channel weight scale, reading slices of the input's codes, quantized with the
    norm output's trained quantizer.

    Exact in real arithmetic (a negative scale flips the symmetric codes' sign): QAT put no
    quantizer between the conv and the norm, and snapped the norm's shift so that each band's
    folded bias lies on its int32 grid (asc.compress.quant.snap_conv_biases).
    """
    conv, out_quantizer = g.producer.get(x), _trained_quantizer(g, output)
    if conv is None or conv.op_type != "Conv" or len(g.users(x)) != 1 or out_quantizer is None:
        return []
    weight, source = _int8_weight(g, conv.input[1]), _dequantized_activation(g, conv.input[0])
    if (weight is None or source is None or weight.zero.shape != (scale.shape[0],) or weight.zero.any()
            or (weight.values == -128).any() or not scale.all()):
        return []
    weight_scale = np.asarray(g.constants[weight.scale], np.float64)
    return _stacked_band_conv(g, conv, weight.values, weight_scale, scale, shift, output, name, source,
                              out_quantizer)


def _stacked_band_conv(g: _Graph, conv: onnx.NodeProto, codes: np.ndarray, weight_scale: np.ndarray,
                       scale: np.ndarray, shift: np.ndarray, output: str, name: str, source: onnx.NodeProto,
                       out_quantizer: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The QAT band convs as one depthwise conv whose channels are (band, channel) pairs.

    Each band's rows are sliced with the conv's halo from the neighbouring bands (the outer bands
    padded with the input's zero point) and the bands are stacked on the channel axis, so one int8
    conv with ``bands x channels`` channels does the work of ``bands`` convs: onnxruntime's depthwise
    int8 kernel pays per output pixel, so a quarter of the pixels at four times the channels costs
    far less (docs/export-latency.md §18). Its output is split back into bands and concatenated on
    frequency: Split and ``QLinearConcat`` only move bytes, so every code is the one the per-band
    convs computed.
    """
    geometry = _band_conv_geometry(g, conv, codes, scale)
    if geometry is None:
        return []
    channels, bands = scale.shape
    freq, kernel, pads, strides, dilations, bias = geometry
    in_scale, in_zero = source.input[1:3]
    out_scale, out_zero = out_quantizer.input[1:3]
    sign = np.sign(scale.T).reshape(-1, 1, 1, 1)  # band-major, like the stacked channels
    tag = _tagged(name, "bands")
    stacked = tag + "_stacked_q"
    axis = g.add_initializer(tag + "_freq_axis", np.array([2], np.int64))
    nodes = []
    for band in range(bands):
        first_row, end_row, top, bottom = _band_geometry(freq, bands, kernel, pads[0], band)
        first = g.add_initializer(f"{tag}{band}_start", np.array([first_row], np.int64))
        end = g.add_initializer(f"{tag}{band}_end", np.array([end_row], np.int64))
        band_q = f"{tag}{band}_in_q"
        sliced = band_q + "_rows" if top or bottom else band_q
        nodes.append(helper.make_node("Slice", [source.input[0], first, end, axis], [sliced],
                                      name=f"{tag}{band}_slice"))
        if top or bottom:  # an outer band: the conv's zero rows, as the input's zero point
            row_pads = g.add_initializer(f"{tag}{band}_row_pads", np.array([0, 0, top, 0, 0, 0, bottom, 0], np.int64))
            nodes.append(helper.make_node("Pad", [sliced, row_pads, in_zero], [band_q], name=f"{tag}{band}_pad"))
    w_codes = g.add_initializer(tag + "_w_int8", (np.tile(codes, (bands, 1, 1, 1)) * sign).astype(np.int8))
    w_scale = g.add_initializer(tag + "_w_scale", (np.tile(weight_scale, bands) * np.abs(scale.T).ravel())
                                .astype(np.float32))
    w_zero = g.add_initializer(tag + "_w_zero", np.zeros(bands * channels, np.int8))
    b = g.add_initializer(tag + "_b", (bias[:, None] * scale + shift).T.ravel().astype(np.float32))
    split = g.add_initializer(tag + "_split", np.full(bands, channels, np.int64))
    nodes += [
        helper.make_node("Concat", [f"{tag}{band}_in_q" for band in range(bands)], [stacked], name=tag + "_stack",
                         axis=1),
        helper.make_node("DequantizeLinear", [stacked, in_scale, in_zero], [tag + "_in"], name=tag + "_in_dq"),
        helper.make_node("DequantizeLinear", [w_codes, w_scale, w_zero], [tag + "_w"], name=tag + "_w_dq", axis=0),
        helper.make_node("Conv", [tag + "_in", tag + "_w", b], [tag + "_y"], name=tag + "_conv",
                         group=bands * channels, kernel_shape=list(codes.shape[2:]), pads=[0, pads[1], 0, pads[3]],
                         strides=strides, dilations=dilations),
        helper.make_node("QuantizeLinear", [tag + "_y", out_scale, out_zero], [tag + "_q"], name=tag + "_q"),
        helper.make_node("Split", [tag + "_q", split], [f"{tag}{band}_q" for band in range(bands)],
                         name=tag + "_split", axis=1)]
    nodes += [helper.make_node("DequantizeLinear", [f"{tag}{band}_q", out_scale, out_zero], [f"{tag}{band}_out"],
                               name=f"{tag}{band}_dq") for band in range(bands)]
    nodes.append(helper.make_node("Concat", [f"{tag}{band}_out" for band in range(bands)], [output],
                                  name=_tagged(name, "band_concat"), axis=2))
    return nodes


def _band_conv_geometry(g: _Graph, conv: onnx.NodeProto, weight: np.ndarray, scale: np.ndarray
                        ) -> tuple[int, int, list[int], list[int], list[int], np.ndarray] | None:
    """(frequency rows, kernel rows, pads, strides, dilations, bias) of a depthwise ``conv`` whose
    output the band convs can replace, or None: it must keep the frequency size, stride 1 on it."""
    channels = scale.shape[0]
    in_shape = g.shape(conv.input[0])
    strides, dilations = node_attribute(conv, "strides", [1, 1]), node_attribute(conv, "dilations", [1, 1])
    pads = node_attribute(conv, "pads", [0, 0, 0, 0])
    if (node_attribute(conv, "group", 1) != channels or weight.ndim != 4 or weight.shape[:2] != (channels, 1)
            or not in_shape or in_shape[2] is None or strides[0] != 1 or dilations[0] != 1
            or node_attribute(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
        return None
    freq, kernel = in_shape[2], weight.shape[2]
    bias = g.constants.get(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros(channels)
    if freq + pads[0] + pads[2] - kernel + 1 != freq or freq % scale.shape[1] or bias is None:
        return None
    return freq, kernel, pads, strides, dilations, np.asarray(bias, np.float64)


def _band_convs(g: _Graph, x: str, scale: np.ndarray, shift: np.ndarray, output: str,
                name: str) -> list[onnx.NodeProto]:
    """One float depthwise conv per band, the band's affine folded into its weights and bias: Slice -> Conv
    per band and a Concat, or [] where the conv's geometry does not allow that.

    Each band reads its rows plus the conv's halo rows from the neighbouring bands, so the
    concatenated result equals conv-then-norm exactly. Post-training quantization then makes each
    band an int8 conv of its own range.
    """
    conv = g.producer.get(x)
    weight = g.constants.get(conv.input[1]) if conv is not None and conv.op_type == "Conv" else None
    geometry = None if weight is None or len(g.users(x)) != 1 else _band_conv_geometry(g, conv, weight, scale)
    if geometry is None:
        return []
    channels, bands = scale.shape
    freq, kernel, pads, strides, dilations, bias = geometry
    axis = g.add_initializer(_tagged(name, "band_axis"), np.array([2], np.int64))
    nodes, outs = [], []
    for band in range(bands):
        first_row, end_row, top, bottom = _band_geometry(freq, bands, kernel, pads[0], band)
        tag = _tagged(name, f"band{band}")
        start = g.add_initializer(tag + "_start", np.array([first_row], np.int64))
        end = g.add_initializer(tag + "_end", np.array([end_row], np.int64))
        w = g.add_initializer(tag + "_w", (weight * scale[:, band].reshape(-1, 1, 1, 1)).astype(np.float32))
        b = g.add_initializer(tag + "_b", (bias * scale[:, band] + shift[:, band]).astype(np.float32))
        nodes += [helper.make_node("Slice", [conv.input[0], start, end, axis], [tag + "_in"], name=tag + "_slice"),
                  helper.make_node("Conv", [tag + "_in", w, b], [tag + "_out"], name=tag + "_conv", group=channels,
                                   kernel_shape=list(weight.shape[2:]), pads=[top, pads[1], bottom, pads[3]],
                                   strides=strides, dilations=dilations)]
        outs.append(tag + "_out")
    nodes.append(helper.make_node("Concat", outs, [output], name=_tagged(name, "band_concat"), axis=2))
    return nodes


def _band_affine(g: _Graph, x: str, scale: np.ndarray, shift: np.ndarray, rows: int, output: str,
                 name: str) -> list[onnx.NodeProto]:
    """Fallback when no depthwise conv precedes the norm: the per-band affine as Mul + Add."""
    channels = scale.shape[0]
    full_scale = np.repeat(scale, rows, axis=1).reshape(1, channels, -1, 1).astype(np.float32)
    full_shift = np.repeat(shift, rows, axis=1).reshape(1, channels, -1, 1).astype(np.float32)
    tag = _tagged(name, "band_affine")
    return [helper.make_node("Mul", [x, g.add_initializer(tag + "_scale", full_scale)], [tag + "_scaled"],
                             name=tag + "_mul"),
            helper.make_node("Add", [tag + "_scaled", g.add_initializer(tag + "_shift", full_shift)], [output],
                             name=tag + "_add")]


def _stem_space_to_depth(g: _Graph, report: RewriteReport) -> int:
    count = 0
    for conv in list(g.graph.node):
        if conv.op_type != "Conv":
            continue
        float_weight = g.constants.get(conv.input[1])
        quantized = None if float_weight is not None else _int8_weight(g, conv.input[1])
        kernel = float_weight if quantized is None else quantized.values
        x_shape, y_shape = g.shape(conv.input[0]), g.shape(conv.output[0])
        if (kernel is None or kernel.ndim != 4 or kernel.shape[1] != 1 or node_attribute(conv, "group", 1) != 1
                or node_attribute(conv, "strides") != [2, 2] or node_attribute(conv, "dilations", [1, 1]) != [1, 1]
                or node_attribute(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
                or not x_shape or not y_shape or None in x_shape[1:] or None in y_shape[1:]):
            continue
        kh, kw = kernel.shape[2:]
        pads = node_attribute(conv, "pads", [0, 0, 0, 0])
        (height, width), (out_h, out_w) = x_shape[2:], y_shape[2:]
        kh2, kw2 = -(-kh // 2), -(-kw // 2)
        bottom = 2 * (out_h - 1 + kh2) - height - pads[0]
        right = 2 * (out_w - 1 + kw2) - width - pads[1]
        if bottom < 0 or right < 0:
            continue
        tag = _tagged(_name(conv), "stem")
        if quantized is None:
            weight_nodes, weight = [], g.add_initializer(tag + "_w", _space_to_depth_kernel(kernel.astype(np.float32)))
        else:
            weight_nodes, weight = _dequantized_weight(g, quantized, _space_to_depth_kernel(kernel, quantized.zero),
                                                       tag + "_w")
        pad_values = g.add_initializer(tag + "_pads", np.array([0, 0, pads[0], pads[1], 0, 0, bottom, right], np.int64))
        nodes = [
            *_space_to_depth_input(g, conv.input[0], pad_values, tag),
            *weight_nodes,
            helper.make_node("Conv", [tag + "_s2d", weight, *conv.input[2:]], list(conv.output), name=tag + "_conv",
                             kernel_shape=[kh2, kw2]),
        ]
        g.replace(conv, nodes)
        report.renamed[_name(conv)] = [node.name for node in nodes]
        count += 1
    return count


def _space_to_depth_kernel(kernel: np.ndarray, zero: np.ndarray | float = 0.0) -> np.ndarray:
    """A stride-2 ``(O, 1, kh, kw)`` kernel as the stride-1 kernel on SpaceToDepth(2)'s four channels.

    The kernel is first padded to even size with ``zero`` (per output channel: an int8 kernel's
    zero point, so the padding dequantizes to exactly 0.0); its dtype is kept, so an int8 kernel
    stays the same int8 codes, only moved.
    """
    out_channels, _, kh, kw = kernel.shape
    kh2, kw2 = -(-kh // 2), -(-kw // 2)
    padded = np.empty((out_channels, 1, 2 * kh2, 2 * kw2), kernel.dtype)
    padded[...] = np.reshape(zero, (-1, 1, 1, 1))
    padded[:, :, :kh, :kw] = kernel
    # SpaceToDepth (DCR) puts input pixel (2i + a, 2j + b) in channel 2a + b at (i, j).
    folded = padded.reshape(out_channels, kh2, 2, kw2, 2).transpose(0, 2, 4, 1, 3)
    return np.ascontiguousarray(folded.reshape(out_channels, 4, kh2, kw2))


def _space_to_depth_input(g: _Graph, x: str, pad_values: str, tag: str) -> list[onnx.NodeProto]:
    """Pad + SpaceToDepth(2) of ``x``, ending in tensor ``tag + "_s2d"``.

    When ``x`` is a quantized activation (a DequantizeLinear output, as in a QAT graph) a
    QuantizeLinear → DequantizeLinear pair with the same trained scale and zero point follows, so
    the new conv still reads a DequantizeLinear and fuses into a QLinearConv. That is exact: the
    padded zeros quantize to the zero point, SpaceToDepth only moves values, and every value was
    already on that grid. Pad and SpaceToDepth stay on the float tensor: onnxruntime 1.27 (the
    newest that runs under the ARM64 emulation, docs/export-latency.md §11) has no uint8 SpaceToDepth.
    """
    nodes = [helper.make_node("Pad", [x, pad_values], [tag + "_padded"], name=tag + "_pad"),
             helper.make_node("SpaceToDepth", [tag + "_padded"], [tag + "_s2d_float"], name=tag + "_s2d", blocksize=2)]
    dq = _dequantized_activation(g, x)
    if dq is None:
        nodes[-1].output[0] = tag + "_s2d"
        return nodes
    scale, zero_point = dq.input[1:3]
    return [*nodes,
            helper.make_node("QuantizeLinear", [tag + "_s2d_float", scale, zero_point], [tag + "_s2d_q"],
                             name=tag + "_s2d_q"),
            helper.make_node("DequantizeLinear", [tag + "_s2d_q", scale, zero_point], [tag + "_s2d"],
                             name=tag + "_s2d_dq")]


MEAN_WEIGHT_CODE = 64
"""int8 code of the mean conv's weights in a QDQ graph, with scale ``1 / (64 F)`` per channel.

``64 * float32(1 / (64 F)) == float32(1 / F)`` exactly (the scale differs from ``1 / F`` by a
power of two), so the dequantized weights are the float graph's weights; 64 is also the 7-bit
weight range every x86 int8 kernel computes without int16 saturation (docs/export-latency.md §10)."""


def _freq_mean_conv(g: _Graph, report: RewriteReport) -> int:
    """Means over frequency as depthwise convs: int8 where a QAT graph quantized both sides, else float."""
    count = 0
    for node in list(g.graph.node):
        if node.op_type != "ReduceMean" or node_attribute(node, "keepdims", 1) != 1:
            continue
        shape = g.shape(node.input[0])
        if (_reduce_axes(node, g.constants) not in ([2], [-2]) or not shape or len(shape) != 4
                or shape[1] is None or shape[2] is None or shape[1] < 2):
            continue
        channels, freq = shape[1], shape[2]
        tag = _tagged(_name(node), "fmean")
        if _dequantized_activation(g, node.input[0]) is not None and _only_quantized(g, node.output[0]):
            nodes = _quantized_mean_conv(g, node.input[0], channels, freq, tag)
        else:
            weight = g.add_initializer(tag + "_w", np.full((channels, 1, freq, 1), 1.0 / freq, np.float32))
            nodes = [helper.make_node("Conv", [node.input[0], weight], [tag + "_out"], name=tag + "_conv",
                                      group=channels, kernel_shape=[freq, 1])]
        nodes[-1].output[0] = node.output[0]
        g.replace(node, nodes)
        report.renamed[_name(node)] = [new.name for new in nodes]
        count += 1
    return count


def _quantized_mean_conv(g: _Graph, dequantized: str, channels: int, freq: int, tag: str) -> list[onnx.NodeProto]:
    """The mean over frequency of a QDQ graph as a conv with int8 weights :data:`MEAN_WEIGHT_CODE`.

    Its input is already a DequantizeLinear and its output goes to a trained quantizer, so it
    fuses into one QLinearConv and no float island is left; the dequantized weights are exactly
    ``1 / F``, so it computes the trained graph's mean.
    """
    weight_codes = g.add_initializer(tag + "_w_int8", np.full((channels, 1, freq, 1), MEAN_WEIGHT_CODE, np.int8))
    weight_scale = g.add_initializer(tag + "_w_scale", np.full(channels, np.float32(1.0 / freq) / MEAN_WEIGHT_CODE,
                                                               np.float32))
    weight_zero = g.add_initializer(tag + "_w_zero_point", np.zeros(channels, np.int8))
    return [helper.make_node("DequantizeLinear", [weight_codes, weight_scale, weight_zero], [tag + "_w"],
                             name=tag + "_w_dq", axis=0),
            helper.make_node("Conv", [dequantized, tag + "_w"], [tag + "_out"], name=tag + "_conv", group=channels,
                             kernel_shape=[freq, 1])]


# ---------------------------------------------------------------------------------------------
# QDQ graphs (PT2E QAT exports): int8 weights and trained activation quantizers


@dataclass(frozen=True)
class _Int8Weight:
    """A weight held as ``DequantizeLinear(int8 codes, scale, zero point)``, as a QAT export holds it.

    A rewrite moves the codes exactly as it would move the float weight and reuses the scale and
    zero point tensors, so the trained quantization carries over bit for bit.
    """

    values: np.ndarray  #: int8 codes
    scale: str
    zero_point: str
    zero: np.ndarray  #: the zero point's value: one per output channel, or one for the tensor
    axis: int


def _int8_weight(g: _Graph, name: str) -> _Int8Weight | None:
    """``name``'s int8 form if it is a DequantizeLinear of int8 constants, per tensor or per output channel."""
    dq = g.producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
        return None
    values, scale, zero = (g.constants.get(part) for part in dq.input[:3])
    if values is None or scale is None or zero is None or values.dtype != np.int8 or values.ndim < 1:
        return None
    axis = int(node_attribute(dq, "axis", 1))
    per_channel = axis == 0 and scale.shape == zero.shape == (values.shape[0],)
    if not per_channel and not scale.size == zero.size == 1:
        return None
    return _Int8Weight(values, dq.input[1], dq.input[2], np.asarray(zero), axis)


def _dequantized_weight(g: _Graph, weight: _Int8Weight, codes: np.ndarray, name: str) -> tuple[list[onnx.NodeProto], str]:
    """A DequantizeLinear of new int8 ``codes`` with ``weight``'s scale and zero point; the node and its output."""
    stored = g.add_initializer(name + "_int8", codes.astype(np.int8))
    return [helper.make_node("DequantizeLinear", [stored, weight.scale, weight.zero_point], [name], name=name + "_dq",
                             axis=weight.axis)], name


def _per_tensor_quantization(g: _Graph, node: onnx.NodeProto) -> bool:
    """A Q or DQ node with constant one-value scale and 8-bit zero point: a trained activation quantizer."""
    if len(node.input) < 3:
        return False
    scale, zero = g.constants.get(node.input[1]), g.constants.get(node.input[2])
    return scale is not None and zero is not None and scale.size == zero.size == 1 and zero.dtype in (np.uint8, np.int8)


def _dequantized_activation(g: _Graph, name: str) -> onnx.NodeProto | None:
    """The DequantizeLinear producing ``name`` when ``name`` is a per-tensor quantized activation."""
    dq = g.producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in g.constants:
        return None
    return dq if _per_tensor_quantization(g, dq) else None


def _trained_quantizer(g: _Graph, name: str) -> onnx.NodeProto | None:
    """A QuantizeLinear that already quantizes tensor ``name`` per tensor, if the graph has one."""
    return next((node for node in g.consumers.get(name, [])
                 if node.op_type == "QuantizeLinear" and node.input[0] == name and _per_tensor_quantization(g, node)),
                None)


def _only_quantized(g: _Graph, name: str) -> bool:
    """Every reader of ``name`` is a QuantizeLinear, so a conv producing it fuses with its output quantizer."""
    readers = g.users(name)
    return bool(readers) and all(node.op_type == "QuantizeLinear" and _per_tensor_quantization(g, node)
                                 for node in readers) and name not in {out.name for out in g.graph.output}


def _per_bin(shape: list[int | None] | None) -> bool:
    """A per-(sample, frequency) statistic: rank 4 with singleton channel and time axes."""
    return shape is not None and len(shape) == 4 and shape[1] == 1 and shape[3] == 1


def _freq_norms(g: _Graph, report: RewriteReport, *, rewrite: bool) -> int:
    """Find ``Add(Mul(Sub(x, shift), scale), offset)`` norms; tag them and optionally rewrite.

    Every node between ``x`` and the output (the statistics) is tagged ``norm_stats``; the output
    multiply and add are tagged ``norm_output``.
    """
    count = 0
    for add in list(g.graph.node):
        if add.op_type != "Add":
            continue
        for mul_in, offset in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
            mul = g.producer.get(mul_in)
            if mul is not None and mul.op_type == "Mul" and _per_bin(g.shape(offset)) and len(g.users(mul_in)) == 1:
                break
        else:
            continue
        for d, scale in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
            sub = g.producer.get(d)
            if sub is not None and sub.op_type == "Sub" and _per_bin(g.shape(scale)):
                break
        else:
            continue
        x, shift = sub.input
        if not _per_bin(g.shape(shift)) or g.shape(x) is None or _per_bin(g.shape(x)):
            continue
        inside = _between(g, x, add) - {id(mul), id(add)}
        for node in g.graph.node:
            if id(node) in inside and _TAG not in node.name:
                new_name = _tagged(_name(node), "norm_stats")
                report.renamed[_name(node)] = [new_name]
                node.name = new_name
        tag = _tagged(_name(add), "norm_output")
        if rewrite:
            nodes = [
                helper.make_node("Mul", [x, scale], [tag + "_xs"], name=tag + "_mul"),
                helper.make_node("Mul", [shift, scale], [tag + "_ss"], name=_tagged(_name(add), "norm_stats") + "_ss"),
                helper.make_node("Sub", [offset, tag + "_ss"], [tag + "_offset"],
                                 name=_tagged(_name(add), "norm_stats") + "_offset"),
                helper.make_node("Add", [tag + "_xs", tag + "_offset"], list(add.output), name=tag + "_add"),
            ]
            report.renamed[_name(mul)] = [nodes[0].name, nodes[1].name]
            report.renamed[_name(add)] = [nodes[2].name, nodes[3].name]
            g.drop(mul)
            g.replace(add, nodes)
        else:
            report.renamed[_name(mul)] = [tag + "_mul"]
            report.renamed[_name(add)] = [tag + "_add"]
            mul.name, add.name = tag + "_mul", tag + "_add"
        count += 1
    return count


def _between(g: _Graph, source: str, sink: onnx.NodeProto) -> set[int]:
    """Ids of nodes that depend on tensor ``source`` and that ``sink`` depends on."""
    ancestors, stack = set(), [sink]
    while stack:
        node = stack.pop()
        if id(node) in ancestors:
            continue
        ancestors.add(id(node))
        stack.extend(p for name in node.input if (p := g.producer.get(name)) is not None)
    descendants, frontier = set(), [source]
    while frontier:
        for node in g.consumers.get(frontier.pop(), []):
            if id(node) not in descendants:
                descendants.add(id(node))
                frontier.extend(node.output)
    return ancestors & descendants


_REWRITE_FUNCTIONS = {
    "subspectral_bands": _subspectral_bands,
    "stem_space_to_depth": _stem_space_to_depth,
    "freq_mean_conv": _freq_mean_conv,
}


def rewrite_for_int8(model: onnx.ModelProto, rewrites: Collection[str] = REWRITES
                     ) -> tuple[onnx.ModelProto, RewriteReport]:
    """A copy of an fp32 or QDQ graph with the chosen rewrites applied and its norms tagged.

    Every rewrite is exact in real arithmetic, on an fp32 graph and on a QDQ graph (a PT2E QAT
    export of asc.compress.quant), where the band convs and the mean conv become int8 convs
    between the trained quantizers. Frequency-wise norms are tagged
    even when ``norm_affine_on_input`` is not chosen, so a plan can keep them float. The graph
    must have static feature sizes (only the batch may be dynamic).
    """
    unknown = sorted(set(rewrites) - set(REWRITES))
    if unknown:
        raise ConfigError(f"unknown int8 rewrites {unknown}; valid: {', '.join(REWRITES)}")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    report = RewriteReport()
    for name in REWRITES:
        if name == "norm_affine_on_input":
            continue
        if name in rewrites:
            g = _Graph(model)
            report.applied[name] = _REWRITE_FUNCTIONS[name](g, report)
            g.commit()
    g = _Graph(model)
    found = _freq_norms(g, report, rewrite="norm_affine_on_input" in rewrites)
    if "norm_affine_on_input" in rewrites:
        report.applied["norm_affine_on_input"] = found
    g.commit()
    return model, report


# ---------------------------------------------------------------------------------------------
# Node groups


def node_groups(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Every node's precision group, by name: see :data:`GROUPS`.

    ``prefix`` is everything the first conv's input depends on (the input norm: its input is
    float, so quantizing it only adds conversions); tagged nodes go to their rewrite's group;
    convs are split by shape (one input channel = stem, grouped = depthwise, 1x1 = pointwise);
    ``activation`` is Sigmoid/Relu/Clip and the multiply of a SiLU.
    """
    graph = model.graph
    constants = graph_constants(graph)
    producer = tensor_producers(graph)
    prefix: set[str] = set()
    first_conv = next((node for node in graph.node if node.op_type == "Conv"), None)
    if first_conv is not None:
        stack = [first_conv.input[0]]
        while stack:
            node = producer.get(stack.pop())
            if node is not None and node.name not in prefix:
                prefix.add(node.name)
                stack.extend(node.input)
    groups: dict[str, list[str]] = {group: [] for group in GROUPS}
    for node in graph.node:
        groups[_group_of(node, prefix, constants, producer)].append(node.name)
    return groups


def _group_of(node: onnx.NodeProto, prefix: set[str], constants: dict[str, np.ndarray],
              producer: dict[str, onnx.NodeProto]) -> str:
    if node.name in prefix:
        return "prefix"
    for role, group in (("norm_output", "norm_output"), ("norm_stats", "norm_stats"), ("band", "band_conv"),
                        ("stem", "stem"), ("fmean", "freq_mean")):
        if f"{_TAG}{role}" in node.name:
            return group
    if node.op_type == "Conv":
        weight = constants.get(node.input[1])
        if weight is None:
            return "dense"
        if weight.shape[1] == 1 and node_attribute(node, "group", 1) == 1:
            return "stem"
        if node_attribute(node, "group", 1) > 1:
            return "depthwise"
        return "pointwise" if all(k == 1 for k in weight.shape[2:]) else "dense"
    if node.op_type in ("Add", "Sum"):
        return "add"
    if node.op_type in ("Sigmoid", "Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Tanh"):
        return "activation"
    if node.op_type == "Mul" and any((p := producer.get(name)) is not None and p.op_type == "Sigmoid"
                                     for name in node.input):
        return "activation"
    if node.op_type in ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"):
        return "pool"
    return "other"


# ---------------------------------------------------------------------------------------------
# Plans


@dataclass(frozen=True)
class PrecisionPlan:
    """Which rewrites to apply and which node groups stay float; plain data, so it can be stored.

    The defaults are the plan measured fastest on this CPU (docs/export-latency.md): all
    rewrites, the input front and the norms float. Calibration defaults to MinMax; percentile
    calibration gained 0.6-1 point of agreement on some trained models, and
    :func:`asc.export.search.search_int8` tries each calibration and keeps the one that agrees best.
    Weights default to 7 bits, the range that computes the same
    logits on x86 CPUs with and without VNNI (:class:`~asc.export.onnx.Int8Options`).
    """

    rewrites: tuple[str, ...] = REWRITES
    float_groups: tuple[str, ...] = DEFAULT_FLOAT_GROUPS
    calibration: Calibration = "minmax"
    percentile: float = 99.999
    weight_bits: WeightBits = 7

    def __post_init__(self) -> None:
        unknown = sorted(set(self.rewrites) - set(REWRITES))
        if unknown:
            raise ConfigError(f"unknown int8 rewrites {unknown}; valid: {', '.join(REWRITES)}")
        unknown = sorted(set(self.float_groups) - set(GROUPS))
        if unknown:
            raise ConfigError(f"unknown precision groups {unknown}; valid: {', '.join(GROUPS)}")
        Int8Options(calibration=self.calibration, percentile=self.percentile, weight_bits=self.weight_bits)

    def keep_float(self, model: onnx.ModelProto) -> list[str]:
        """Names of the nodes of ``model`` (the graph after ``quant_pre_process``) that stay float."""
        groups = node_groups(model)
        return sorted(name for group in self.float_groups for name in groups[group])

    def int8_options(self) -> Int8Options:
        return Int8Options(calibration=self.calibration, percentile=self.percentile, keep_float=self.keep_float,
                           weight_bits=self.weight_bits)

    def toggled(self, group: str) -> PrecisionPlan:
        """This plan with ``group`` moved between float and int8."""
        floats = set(self.float_groups) ^ {group}
        return replace(self, float_groups=tuple(g for g in GROUPS if g in floats))

    def describe(self) -> str:
        rewrites = "+".join(self.rewrites) if self.rewrites else "no rewrites"
        floats = ",".join(self.float_groups) if self.float_groups else "nothing"
        return f"{rewrites}; float: {floats}; {self.calibration}; {self.weight_bits}-bit weights"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrecisionPlan:
        """A stored plan; one stored before ``weight_bits`` existed gets 7 bits, the only range that
        is correct on every x86 CPU (its 8-bit files saturated on CPUs without VNNI)."""
        return cls(rewrites=tuple(data["rewrites"]), float_groups=tuple(data["float_groups"]),
                   calibration=data["calibration"], percentile=float(data["percentile"]),
                   weight_bits=int(data.get("weight_bits", 7)))  # type: ignore[arg-type]


NAIVE_PLAN = PrecisionPlan(rewrites=(), float_groups=(), calibration="minmax")
"""Plain ``quantize_static`` of everything: the baseline the plans are measured against."""


def quantize_planned(fp32_path: str | Path, out_path: str | Path, calibration: Iterable[np.ndarray],
                     plan: PrecisionPlan | None = None, *, float_nodes: Collection[str] = ()) -> Path:
    """Int8 QDQ file of an fp32 ONNX file under ``plan`` (default :class:`PrecisionPlan`).

    ``float_nodes`` are names in the *original* graph that must stay float (the exporter's
    frequency-norm nodes); they are carried through the rewrites.
    """
    plan = plan or PrecisionPlan()
    fp32_path = Path(fp32_path)
    model, report = rewrite_for_int8(onnx.load(str(fp32_path)), plan.rewrites)
    with tempfile.TemporaryDirectory(prefix="asc-precision-") as tmp:
        rewritten = Path(tmp) / fp32_path.name
        onnx.save_model(model, str(rewritten))
        out_path = quantize_int8(rewritten, out_path, calibration, plan.int8_options(),
                                 float_nodes=report.translate(float_nodes, model.graph))
    quantized = onnx.load(str(out_path))
    if share_concat_ranges(quantized):
        save_onnx(quantized, out_path)
    return out_path


def share_concat_ranges(model: onnx.ModelProto, *, tag: str = f"{_TAG}band") -> int:
    """Give a band Concat's inputs and output one uint8 range (the union), in place; returns how many.

    With equal scales onnxruntime's QLinearConcat only copies bytes; with the per-band scales
    calibration picks it requantized every value (1.0 ms -> 0.2 ms over the 9 concats of
    BC-ResNet-Mod c=40). The union is what the Concat output's own range already covers, so no
    value gets clipped; bands with a narrower range get a slightly coarser step.
    """
    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    producer = tensor_producers(graph)
    consumers = tensor_consumers(graph)
    shared = 0
    for concat in graph.node:
        if concat.op_type != "Concat" or tag not in concat.name:
            continue
        dequants = [producer.get(name) for name in concat.input]
        quants = [producer.get(dq.input[0]) if dq is not None else None for dq in dequants]
        outputs = consumers.get(concat.output[0], [])
        if (any(dq is None or dq.op_type != "DequantizeLinear" for dq in dequants)
                or any(q is None or q.op_type != "QuantizeLinear" or len(consumers[q.output[0]]) != 1
                       for q in quants)
                or len(outputs) != 1 or outputs[0].op_type != "QuantizeLinear"):
            continue
        out_dequants = consumers.get(outputs[0].output[0], [])
        nodes = [*dequants, *quants, outputs[0], *out_dequants]
        params = [(constants.get(node.input[1]), constants.get(node.input[2]) if len(node.input) > 2 else None)
                  for node in nodes]
        if any(s is None or z is None or z.data_type != onnx.TensorProto.UINT8 for s, z in params):
            continue
        lows, highs = [], []
        for s, z in params:
            scale, zero = float(numpy_helper.to_array(s)), float(numpy_helper.to_array(z))
            lows.append(-zero * scale)
            highs.append((255.0 - zero) * scale)
        low, high = min(0.0, *lows), max(0.0, *highs)
        scale = np.float32((high - low) / 255.0)
        zero = np.uint8(np.clip(round(-low / float(scale)), 0, 255))
        scale_name = _tagged(concat.name, "shared_scale")
        zero_name = _tagged(concat.name, "shared_zero_point")
        graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), scale_name),
                                  numpy_helper.from_array(np.array(zero, np.uint8), zero_name)])
        for node in nodes:
            node.input[1], node.input[2] = scale_name, zero_name
        shared += 1
    if shared:
        prune_dead_nodes(graph)
    return shared


# ---------------------------------------------------------------------------------------------
# Measuring plans


def session_logits(session: ort.InferenceSession, inputs: np.ndarray, batch: int = 16) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: inputs[i:i + batch]})[0] for i in range(0, len(inputs), batch)])


@dataclass(frozen=True)
class PlanMeasurement:
    """One candidate as measured: latency against fp32 in the same interleaved loop, and parity."""

    name: str
    plan: PrecisionPlan | None  #: None: the fp32 graph itself
    latency_ms: float  #: median, batch 1
    fp32_ms: float  #: fp32's median in the same loop
    agreement: Agreement | None

    @property
    def ratio(self) -> float:
        """Latency relative to fp32 (below 1: faster than fp32)."""
        return self.latency_ms / self.fp32_ms

    def accepted(self, min_agreement: float) -> bool:
        return self.agreement is None or self.agreement.top1_agreement >= min_agreement


@dataclass(frozen=True)
class PlanReport:
    """Every candidate :func:`plan_precision` measured, and the one it chose."""

    chosen: PlanMeasurement
    candidates: tuple[PlanMeasurement, ...]
    min_agreement: float
    threads: int

    @property
    def int8_wins(self) -> bool:
        return self.chosen.plan is not None

    def format(self) -> str:
        lines = [(f"precision plans ({self.threads} thread{'s' if self.threads > 1 else ''}, latency vs fp32 "
                  f"in the same loop, agreement = top-1 vs fp32, bar {self.min_agreement:.0%}):")]
        for c in self.candidates:
            agree = "-" if c.agreement is None else f"{c.agreement.top1_agreement:.1%}"
            mark = "*" if c is self.chosen else " "
            lines.append(f" {mark} {c.name:<24} {c.latency_ms:7.2f} ms  {c.ratio:5.2f}x fp32  agree {agree:>6}  "
                         f"{'' if c.plan is None else c.plan.describe()}")
        verdict = (f"int8 plan '{self.chosen.name}' is {1 / self.chosen.ratio:.2f}x faster than fp32"
                   if self.int8_wins else "no int8 plan beat fp32 at the agreement bar: ship fp32")
        return "\n".join([*lines, verdict])


def _next_step(current: PlanMeasurement, moves: list[PlanMeasurement], min_agreement: float,
               min_gain: float) -> PlanMeasurement | None:
    """The move to take: the fastest accepted one if it gains ``min_gain`` (or if the current plan
    misses the agreement bar); with no accepted move and the bar missed, the move that raises
    agreement most; None to stop."""
    accepted = [m for m in moves if m.accepted(min_agreement)]
    if accepted:
        best = min(accepted, key=lambda m: m.ratio)
        gains = best.ratio <= current.ratio * (1.0 - min_gain)
        return best if gains or not current.accepted(min_agreement) else None
    if current.accepted(min_agreement) or current.agreement is None:
        return None
    closest = max(moves, key=lambda m: m.agreement.top1_agreement if m.agreement else 0.0, default=None)
    if closest is None or closest.agreement is None or \
            closest.agreement.top1_agreement <= current.agreement.top1_agreement:
        return None
    return closest


def plan_precision(fp32_path: str | Path, calibration: Sequence[np.ndarray], inputs: np.ndarray, *,
                   start: PrecisionPlan | None = None, min_agreement: float = 0.99, threads: int = 1,
                   repeats: int = 15, rounds: int = 2, min_gain: float = 0.03, include_naive: bool = True,
                   float_nodes: Collection[str] = (), work_dir: str | Path | None = None) -> PlanReport:
    """Choose the fastest int8 plan whose top-1 agreement with fp32 on ``inputs`` is ``>= min_agreement``.

    Starts from ``start`` (default :class:`PrecisionPlan`) and for up to ``rounds`` rounds tries
    moving each node group between float and int8, keeping the best move if it is at least
    ``min_gain`` faster (while the start misses the agreement bar: the fastest move that meets
    it, else the one that raises agreement most). All candidates of a round are timed round-robin
    (:func:`asc.bench.interleaved`) with fp32 and the current plan: ``repeats`` runs each, batch
    1, ``threads`` intra-op threads. Returns the fp32 graph itself as the choice when no plan is
    faster than fp32. ``calibration`` is a sequence of input batches; ``inputs`` ``(n, ...)`` are
    the parity clips.
    """
    if not 0.0 <= min_agreement <= 1.0:
        raise ConfigError(f"min_agreement must be in [0, 1], got {min_agreement}")
    if len(inputs) < 1 or len(calibration) < 1:
        raise ConfigError("plan_precision needs at least one calibration batch and one parity input")
    fp32_path = Path(fp32_path)
    start = start or PrecisionPlan()
    with tempfile.TemporaryDirectory(prefix="asc-plan-", dir=work_dir) as tmp:
        fp32 = ort_session(fp32_path, threads=threads)
        reference = session_logits(fp32, inputs)
        feed = np.ascontiguousarray(inputs[:1], dtype=np.float32)
        built: dict[PrecisionPlan, tuple[Path, Agreement]] = {}

        def build(plan: PrecisionPlan) -> tuple[Path, Agreement]:
            if plan not in built:
                path = Path(tmp) / f"candidate{len(built)}.onnx"
                quantize_planned(fp32_path, path, calibration, plan, float_nodes=float_nodes)
                built[plan] = (path, compare_logits(reference, session_logits(ort_session(path), inputs),
                                                    reference_name="onnx_fp32", candidate_name=str(path.name)))
            return built[plan]

        def measure(named: dict[str, PrecisionPlan]) -> list[PlanMeasurement]:
            sessions = {"fp32": fp32} | {name: ort_session(build(plan)[0], threads=threads)
                                         for name, plan in named.items()}
            calls = {name: partial(session.run, None, {session.get_inputs()[0].name: feed})
                     for name, session in sessions.items()}
            medians = {name: timing.median_ms for name, timing in interleaved(calls, repeats=repeats).items()}
            out = [PlanMeasurement("fp32", None, medians["fp32"], medians["fp32"], None)]
            out.extend(PlanMeasurement(name, plan, medians[name], medians["fp32"], build(plan)[1])
                       for name, plan in named.items())
            return out

        first = measure(({"naive": NAIVE_PLAN} if include_naive else {}) | {"start": start})
        candidates = list(first)
        current = next(m for m in first if m.name == "start")
        for round_ in range(1, rounds + 1):
            rewritten = rewrite_for_int8(onnx.load(str(fp32_path)), current.plan.rewrites)[0]
            present = {group for group, names in node_groups(rewritten).items() if names}
            moves = {f"r{round_} {'int8' if g in current.plan.float_groups else 'float'} {g}": current.plan.toggled(g)
                     for g in GROUPS if g in present}
            measured = measure({"current": current.plan} | moves)
            candidates.extend(m for m in measured if m.name not in ("fp32", "current"))
            now = next(m for m in measured if m.name == "current")
            step = _next_step(now, [m for m in measured if m.plan is not None and m.name != "current"],
                              min_agreement, min_gain)
            if step is None:
                break
            current = step
        accepted = [m for m in candidates if m.plan is not None and m.accepted(min_agreement)]
        chosen = min(accepted, key=lambda m: m.ratio, default=None)
        if chosen is None or chosen.ratio >= 1.0:
            chosen = first[0]
        return PlanReport(chosen, (first[0], *candidates[1:]), min_agreement, threads)
