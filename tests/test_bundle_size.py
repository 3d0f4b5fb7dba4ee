"""A bundle as small as its weights: compacted model.onnx, the xz container, and the runtime reading it."""

from __future__ import annotations

import copy
import dataclasses
import lzma
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from asc.bundle_manifest import BundleManifest
from asc.config import RunConfig, load_config
from asc.export import export_trained, open_run, run_clipset, split_dataset
from asc.export.onnx import compact_onnx, model_bytes
from asc.runtime import Classifier
from asc.train.loop import train_or_resume

SPARSITY = 0.85  # share of every conv weight tensor zeroed by magnitude: a PQK-like sparse model
PER_NONZERO = 1.3  # container bytes per non-zero int8 weight allowed on top of the fixed overhead


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, tiny_overrides) -> SimpleNamespace:
    """fp32, post-training int8 and sparse int8 bundles of one tiny trained run (external front end)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("size")
    train_or_resume(load_config(RunConfig, overrides=tiny_overrides(6)), root / "run", progress=False)
    run = open_run(root / "run")
    sparse = copy.deepcopy(run.model)
    with torch.no_grad():
        for conv in (m for m in sparse.modules() if isinstance(m, nn.Conv2d)):
            weight = conv.weight
            cut = torch.quantile(weight.abs().flatten(), SPARSITY)
            weight.mul_(weight.abs() > cut)
    options = {"frontend": "external", "calibration_clips": 32, "parity_clips": 48, "min_agreement": 0.0,
               "progress": False}
    export_trained(run, root / "fp32", precision="fp32", **options)
    export_trained(run, root / "int8", precision="int8", **options)
    export_trained(dataclasses.replace(run, model=sparse), root / "sparse", precision="int8", **options)
    waves = split_dataset(run, run_clipset(run, progress=False), "evaluate", as_features=False, progress=False)
    audio = np.stack([waves[i][0].numpy() for i in range(16)])
    return SimpleNamespace(root=root, run=run, audio=audio, **{name: root / name for name in ("fp32", "int8", "sparse")})


def _manifest(bundle: Path) -> BundleManifest:
    return BundleManifest.read(bundle)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fp32", "int8", "sparse"])
def test_shipped_file_is_compact_and_the_container_is_it_byte_for_byte(bundles, name: str) -> None:
    bundle = getattr(bundles, name)
    manifest = _manifest(bundle)
    assert manifest.container_file == "model.onnx.xz"
    data = (bundle / "model.onnx").read_bytes()
    assert lzma.decompress((bundle / "model.onnx.xz").read_bytes()) == data
    model = onnx.load_from_string(data)
    assert all(re.fullmatch(r"n[0-9a-f]+", node.name) for node in model.graph.node)  # no front end in the graph
    keys = [(t.data_type, tuple(t.dims), onnx.numpy_helper.to_array(t).tobytes()) for t in model.graph.initializer]
    assert len(keys) == len(set(keys))  # every constant stored once
    sizes = manifest.metrics["bytes"]
    assert sizes == {**model_bytes(bundle / "model.onnx").to_dict(), "container": len(
        (bundle / "model.onnx.xz").read_bytes()), "ort": (bundle / "model.ort").stat().st_size}
    # short names: ~58 bytes per node (op, attributes, 2-3 tensor names), against ~107 as exported
    assert sum(node.ByteSize() for node in model.graph.node) < 70 * len(model.graph.node)
    assert not model.graph.metadata_props  # the exporter's graph signature (~14 KB) is gone
    compact_onnx(model)  # compacting again changes nothing
    assert model.SerializeToString() == onnx.load_from_string(data).SerializeToString()


@pytest.mark.slow
def test_container_costs_little_more_than_the_nonzero_int8_weights(bundles) -> None:
    fp32, int8, sparse = (_manifest(b).metrics["bytes"] for b in (bundles.fp32, bundles.int8, bundles.sparse))
    for sizes in (int8, sparse):
        assert sizes["container"] <= PER_NONZERO * sizes["nonzero_int8_weights"] + sizes["packed_without_weights"]
        assert sizes["container"] < 0.6 * sizes["file"]
    assert fp32["nonzero_int8_weights"] == 0 and fp32["int8_weights"] == 0
    # 15 % of the conv weights survive pruning; the int8 graph adds dense ones of its own (the
    # frequency-mean convs), so ~22 % of the int8 model's non-zeros remain; the container shrinks
    # by at least half a byte per weight it lost
    assert sparse["nonzero_int8_weights"] < 0.25 * int8["nonzero_int8_weights"]
    dropped = int8["nonzero_int8_weights"] - sparse["nonzero_int8_weights"]
    assert int8["container"] - sparse["container"] >= 0.5 * dropped
    # int8 storage shows in what ships: the int8 container is smaller than the fp32 one
    assert int8["container"] < fp32["container"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fp32", "sparse"])
def test_runtime_classifies_identically_from_the_container_alone(bundles, name: str, tmp_path: Path) -> None:
    bundle = getattr(bundles, name)
    onnx_only = tmp_path / "onnx"
    shipped = tmp_path / "container"
    for folder, drop in ((onnx_only, ("model.ort", "model.onnx.xz")), (shipped, ("model.ort", "model.onnx"))):
        shutil.copytree(bundle, folder)
        for file in drop:
            (folder / file).unlink()
    from_container = Classifier(shipped)
    assert from_container.model_path.name == "model.onnx.xz"
    np.testing.assert_array_equal(from_container.logits(bundles.audio), Classifier(onnx_only).logits(bundles.audio))
    np.testing.assert_allclose(from_container.logits(bundles.audio), Classifier(bundle).logits(bundles.audio),
                               atol=1e-4)
