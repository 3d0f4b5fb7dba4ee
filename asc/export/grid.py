"""int8 QDQ ONNX on a compression method's own grid (QKD's learned steps, PSG's range).

The default int8 export calibrates every scale afresh (:func:`~asc.export.onnx.quantize_int8`),
which throws away the grid a quantization method trained on. Here the Q/DQ nodes are written
directly from the run's ``quant_grid.json`` (:mod:`asc.compress.grid`):

* every grid layer's weight becomes an int8 initializer ``k = round(clip(w / s, −L, L))`` with the
  method's per-output-channel scales ``s`` (zero point 0) behind a ``DequantizeLinear``, so
  ``k · s`` is the method's finalized weight (where the exporter folds a BatchNorm into the conv,
  ``s`` takes its per-channel factor ``γ/σ`` and ``k`` stays);
* its input passes ``QuantizeLinear → DequantizeLinear`` on the method's input grid (QKD: uint8
  or int8, zero point 0, the learned step), or, when the method trained no input grid (PSG), on a
  uint8 min-max range measured on calibration batches;
* nothing else is quantized: BN, norms and the conv outputs stay float, as in training. Run with
  its Q/DQ as float ops the file computes the method's finalized model (the same on every CPU);
  onnxruntime fuses into ``QLinearConv`` only the convs whose output reaches the next quantized
  input through a ReLU, the others run as float convs on the dequantized int8 weights. Its worth
  is the method's exact int8 weights (a quarter of the fp32 bytes); the calibrated export
  remains the one tuned for onnxruntime's integer kernels.

The float model is the compressed run's float twin (``checkpoints/float.pt``), whose ONNX
initializers keep the module names the grid is keyed by (``<layer>.weight``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from asc.compress.grid import InputGrid, LayerGrid, QuantGrid
from asc.errors import AscError
from asc.export.onnx import (
    FEATURE_INPUT,
    OUTPUT,
    record_int8_operands,
    save_onnx,
    torch_to_onnx,
)
from asc.run_files import FLOAT_CHECKPOINT
from asc.train.evaluate import load_run_model

_QUANTIZABLE = ("Conv", "Gemm")


def grid_int8(run_dir: Path, out_path: str | Path, example: Tensor, *,
              calibration: Iterable[np.ndarray] = ()) -> Path | None:
    """The int8 QDQ file of a compressed run on its methods' grid, or None when they left no grid.

    The graph is built from the run's float twin (``checkpoints/float.pt``): the finalized module
    may hold fake-quant ops that are not the twin's plain convs.
    """
    grid = QuantGrid.read(run_dir)
    if grid is None:
        return None
    model, _ = load_run_model(run_dir, FLOAT_CHECKPOINT)
    return quantize_on_grid(model, grid, example, out_path, calibration=calibration)


def quantize_on_grid(model: nn.Module, grid: QuantGrid, example: Tensor, out_path: str | Path, *,
                     calibration: Iterable[np.ndarray] = ()) -> Path:
    """Write ``model`` (the float twin) as int8 QDQ ONNX on ``grid``; see the module docstring.

    ``calibration`` (batches of the model's input) sets the input ranges of layers without an
    input grid; it is not read when every layer has one. ``example`` needs a batch of at least 2.
    """
    check_int8_widths(grid)
    exported = torch_to_onnx(model.eval(), example, input_name=FEATURE_INPUT, output_name=OUTPUT)
    nodes = _layer_nodes(exported, grid)
    measured = _input_grids(exported, {name: nodes[name] for name, layer in grid.layers.items()
                                       if layer.input is None}, calibration)
    graph = exported.graph
    initializers = {init.name: init for init in graph.initializer}
    weights = {name: parameter.detach().cpu() for name, parameter in model.named_parameters()}
    inserted: dict[str, list[onnx.NodeProto]] = {}  # consumer node name -> its new Q/DQ nodes
    for name, layer in grid.layers.items():
        node = nodes[name]
        inserted[node.name] = [
            _quantize_weight(graph, node, initializers[node.input[1]], weights[f"{name}.weight"], layer),
            *_quantize_input(graph, node, layer.input or measured[name], prefix=name)]
    ordered = [new for node in graph.node for new in [*inserted.get(node.name, []), node]]
    del graph.node[:]
    graph.node.extend(ordered)
    record_int8_operands(exported)
    return save_onnx(exported, out_path)


def check_int8_widths(grid: QuantGrid) -> None:
    """Refuse a grid int8 Q/DQ cannot hold (an input grid of other than 8 bits), naming the layer."""
    for name, layer in grid.layers.items():
        if not 2 <= layer.bits <= 8:
            raise AscError(f"{grid.method}: layer {name} has {layer.bits}-bit weights; an int8 graph holds 2-8 bits")
        if layer.input is not None and layer.input.bits != 8:
            raise AscError(f"{grid.method}: layer {name} trained on a {layer.input.bits}-bit input grid, which "
                           "int8 Q/DQ cannot hold; such a run reports simulated accuracy and size in bits "
                           "(train with 8 bits for an int8 export)")


def _layer_nodes(model: onnx.ModelProto, grid: QuantGrid) -> dict[str, onnx.NodeProto]:
    """The Conv/Gemm node of each grid layer, found by its weight initializer ``<layer>.weight``."""
    by_weight = {node.input[1]: node for node in model.graph.node
                 if node.op_type in _QUANTIZABLE and len(node.input) > 1}
    nodes = {}
    for name in grid.layers:
        node = by_weight.get(f"{name}.weight")
        if node is None:
            raise AscError(f"{grid.method} grid: layer {name} has no Conv/Gemm with weight '{name}.weight' in the "
                           "exported graph; the grid belongs to another model")
        if node.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1 for a in node.attribute):
            raise AscError(f"{grid.method} grid: layer {name} exports as a Gemm with an untransposed weight; "
                           "its output channels are not dimension 0")
        nodes[name] = node
    return nodes


def _input_grids(model: onnx.ModelProto, nodes: dict[str, onnx.NodeProto],
                 calibration: Iterable[np.ndarray]) -> dict[str, InputGrid]:
    """uint8 min-max grids (``[min(0, x), max(0, x)]``) of the layers' inputs over ``calibration``."""
    if not nodes:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    tensors = sorted({node.input[0] for node in nodes.values()})
    known = {output.name for output in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                              for name in tensors if name not in known)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    low, high = dict.fromkeys(tensors, 0.0), dict.fromkeys(tensors, 0.0)
    batches = 0
    for batch in calibration:
        values = session.run(tensors, {session.get_inputs()[0].name: np.ascontiguousarray(batch, np.float32)})
        for name, value in zip(tensors, values, strict=True):
            low[name], high[name] = min(low[name], float(value.min())), max(high[name], float(value.max()))
        batches += 1
    if not batches:
        raise AscError(f"layers {sorted(nodes)[:3]} have no input grid; give calibration batches to measure it")
    grids = {}
    for name, node in nodes.items():
        x = node.input[0]
        scale = float(np.float32((high[x] - low[x]) / 255)) or 1.0
        grids[name] = InputGrid(scale, signed=False, bits=8, zero_point=int(np.clip(np.round(-low[x] / scale), 0, 255)))
    return grids


def _quantize_weight(graph: onnx.GraphProto, node: onnx.NodeProto, weight: onnx.TensorProto, original: Tensor,
                     layer: LayerGrid) -> onnx.NodeProto:
    """Replace the weight by int8 ``k`` and a per-channel ``DequantizeLinear``; returns that node.

    The exporter folds a following BatchNorm into the conv (the initializer keeps its name):
    ``w · γ/σ`` per output channel. The integers are the method's, computed from the model's own
    weight; the scales take the factor.
    """
    values = torch.from_numpy(onnx.numpy_helper.to_array(weight).copy())
    if len(layer.weight_scale) != values.shape[0] or values.shape != original.shape:
        raise AscError(f"grid of {weight.name}: {len(layer.weight_scale)} scales for a weight of shape "
                       f"{tuple(values.shape)} (the model's: {tuple(original.shape)})")
    scale = torch.tensor(layer.weight_scale, dtype=torch.float32) * _channel_factor(values, original, weight.name)
    integers = layer.integers(original.float()).to(torch.int8)  # from the model's weight: the method's own k
    base = weight.name
    graph.initializer.remove(weight)
    graph.initializer.extend([
        numpy_helper.from_array(integers.numpy(), f"{base}_quantized"),
        numpy_helper.from_array(scale.numpy(), f"{base}_scale"),
        numpy_helper.from_array(np.zeros(len(layer.weight_scale), np.int8), f"{base}_zero_point"),
    ])
    node.input[1] = f"{base}_dequantized"
    return helper.make_node("DequantizeLinear", [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"],
                            [node.input[1]], name=f"{base}_DequantizeLinear", axis=0)


def _channel_factor(exported: Tensor, original: Tensor, name: str) -> Tensor:
    """Per output channel ``exported / original`` (1 where unchanged or all zero), checked to be uniform."""
    if torch.equal(exported, original):
        return torch.ones(original.shape[0])
    flat, base = exported.flatten(1), original.flatten(1)
    largest = base.abs().argmax(dim=1, keepdim=True)
    pivot = base.gather(1, largest)
    factor = torch.where(pivot == 0, torch.ones_like(pivot), flat.gather(1, largest) / pivot)
    if not torch.allclose(flat, base * factor, rtol=1e-5, atol=1e-6 * float(flat.abs().max())):
        raise AscError(f"{name}: the exported weight is not a per-channel multiple of the model's; the exporter "
                       "changed it in a way the grid cannot follow")
    return factor.flatten()


def _quantize_input(graph: onnx.GraphProto, node: onnx.NodeProto, grid: InputGrid, *,
                    prefix: str) -> list[onnx.NodeProto]:
    """Route the node's input through ``QuantizeLinear → DequantizeLinear`` on ``grid``; returns both."""
    dtype = np.int8 if grid.signed else np.uint8
    scale, zero, quantized, dequantized = (f"{prefix}.input_{part}" for part in
                                           ("scale", "zero_point", "quantized", "dequantized"))
    graph.initializer.extend([numpy_helper.from_array(np.asarray(grid.scale, np.float32), scale),
                              numpy_helper.from_array(np.asarray(grid.zero_point, dtype), zero)])
    nodes = [helper.make_node("QuantizeLinear", [node.input[0], scale, zero], [quantized],
                              name=f"{prefix}.input_QuantizeLinear"),
             helper.make_node("DequantizeLinear", [quantized, scale, zero], [dequantized],
                              name=f"{prefix}.input_DequantizeLinear")]
    node.input[0] = dequantized
    return nodes
