"""PSG deploys int8 on its own grid: the stage writes the grid, the export stores exactly Q(w) / Δ."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from asc.compress.grid import GRID_NAME, QuantGrid
from asc.compress.psg import grid_point, grid_step
from asc.compress.stage import compress_run
from asc.config import RunConfig, load_config
from asc.export.bundle import export_run, open_run, run_clipset, sample_clips, split_dataset
from asc.export.grid import grid_int8
from asc.export.onnx import int8_weights, run_onnx
from asc.train.checkpoint import load_checkpoint
from asc.train.evaluate import load_run_model
from asc.train.loop import train_or_resume


@pytest.fixture(scope="module")
def psg_run(tiny_overrides, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("psg")
    train_or_resume(load_config(RunConfig, None, tiny_overrides(epochs=1)), root / "source", progress=False)
    compress_run(root / "source", root / "psg", ["psg"], ["train.epochs=1", "optim.lr=0.01"], progress=False)
    return root / "psg"


@pytest.mark.slow
def test_psg_int8_export_stores_its_own_grid(psg_run: Path, tmp_path: Path):
    grid = QuantGrid.read(psg_run)
    assert grid is not None and grid.method == "psg"
    ranges = load_checkpoint(psg_run / "checkpoints" / "last.pt")["hooks"][0]["ranges"]
    assert set(grid.layers) == set(ranges)
    for name, layer in grid.layers.items():  # Δ of the final moving-average range, every channel alike
        assert layer.input is None and layer.bits == 8
        assert set(layer.weight_scale) == {grid_step(*ranges[name], 8).item()}

    run = open_run(psg_run)
    clipset = run_clipset(run, progress=False)
    train = sample_clips(split_dataset(run, clipset, run.config.data.train_split, as_features=True, progress=False),
                         32, split="train")
    path = grid_int8(psg_run, tmp_path / "int8.onnx", torch.zeros(2, *train.source[0].shape),
                     calibration=train.batches())
    exported = onnx.load(str(path))
    arrays = {init.name: onnx.numpy_helper.to_array(init) for init in exported.graph.initializer}
    assert set(int8_weights(exported)) == {f"{name}.weight_quantized" for name in grid.layers}
    twin = load_checkpoint(psg_run / "checkpoints" / "float.pt")["model"]
    unfolded = [name for name in grid.layers if name.endswith("pointwise") or name == "classifier"]  # no BN after
    assert len(unfolded) > 4
    for name in grid.layers:
        weight, (w_min, w_max) = twin[f"{name}.weight"], ranges[name]
        step = grid_step(w_min, w_max, 8)
        integers = arrays[f"{name}.weight_quantized"]
        assert np.array_equal(integers, torch.round(torch.clamp(weight / step, -127, 127)).to(torch.int8).numpy())
        if name in unfolded:  # the exporter folded no BN into it: k · Δ is PSG's Q(w), exactly
            scaled = integers.astype(np.float32) * arrays[f"{name}.weight_scale"].reshape(-1, *[1] * (weight.dim() - 1))
            assert torch.equal(torch.from_numpy(scaled), grid_point(weight, w_min, w_max, 8)), name
        assert arrays[f"{name}.input_zero_point"].dtype == np.uint8  # calibrated uint8 inputs

    split = run.config.data.eval_split
    clips = sample_clips(split_dataset(run, clipset, split, as_features=True, progress=False), None, split=split)
    finalized, _ = load_run_model(psg_run)  # the float model PSG trained
    with torch.no_grad():
        reference = np.concatenate([finalized(torch.from_numpy(batch)).numpy() for batch in clips.batches()])
    # Q/DQ run as float ops: what the file stores, the same on every CPU
    deployed = np.concatenate([run_onnx(path, batch, fused=False) for batch in clips.batches()])
    assert (deployed.argmax(1) == reference.argmax(1)).mean() >= 0.95


@pytest.mark.slow
def test_int8_export_of_a_psg_run_ships_its_grid(psg_run: Path, tmp_path: Path):
    manifest = export_run(psg_run, tmp_path / "bundle", precision="int8", parity_clips=64, force=True, ort_format=False,
                          progress=False)
    assert manifest.source["quantization"] == "grid-psg"
    grid = QuantGrid.read(psg_run)
    shipped = onnx.load(str(tmp_path / "bundle" / "model.onnx"))
    twin = load_checkpoint(psg_run / "checkpoints" / "float.pt")["model"]
    ranges = load_checkpoint(psg_run / "checkpoints" / "last.pt")["hooks"][0]["ranges"]
    expected = sorted(torch.round(torch.clamp(twin[f"{name}.weight"] / grid_step(*ranges[name], 8), -127, 127))
                      .to(torch.int8).numpy().tobytes() for name in grid.layers)
    # the shipped file renames its initializers; its int8 weights are exactly PSG's integers, nothing calibrated
    assert sorted(array.tobytes() for array in int8_weights(shipped).values()) == expected
    assert any("psg run's own grid" in note for note in json.loads((tmp_path / "bundle" / "parity.json").read_text())["notes"])


@pytest.mark.slow
def test_psg_above_8_bits_leaves_no_grid(tiny_overrides, psg_run: Path):
    out = psg_run.with_name("psg-12")
    compress_run(psg_run.with_name("source"), out, ["psg"], ["train.epochs=1", "psg.bits=12"], progress=False)
    assert (out / "finalized.pt2").is_file() and not (out / GRID_NAME).exists()
