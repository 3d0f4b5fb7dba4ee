"""Small edits of ONNX graphs shared by the exporter and on-device personalization, torch-free.

The int8 planner (:mod:`asc.export.precision`, :mod:`asc.export.search`) and the phone-side
pruning of a gated bundle (:mod:`asc.personalize`) both rewrite graphs; the second must not
import torch, so what they share lives here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper


def node_attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of ``node``'s attribute ``name``, or ``default`` when it has none."""
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def graph_constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers plus Constant and Identity-of-constant outputs (the legacy exporter dedups with Identity)."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node_attribute(node, "value") is not None:
            values[node.output[0]] = numpy_helper.to_array(node_attribute(node, "value"))
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def tensor_producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """The node writing each tensor, by tensor name (graph inputs and initializers have none)."""
    return {output: node for node in graph.node for output in node.output}


def tensor_consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """The nodes reading each tensor, in graph order, by tensor name."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def prune_dead_nodes(graph: onnx.GraphProto) -> None:
    """Drop the nodes no graph output depends on, then the initializers no node reads (in place)."""
    needed = {output.name for output in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(name for name in node.input if name)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    used = {name for node in graph.node for name in node.input}
    initializers = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
