"""QKD: LSQ step sizes, the three phases, the trainable teacher, the stage and an exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from compress_resume import assert_same_tensors, kill_and_resume

from asc.compress.base import StageContext
from asc.compress.grid import QuantGrid
from asc.compress.qkd import (
    MIN_STEP,
    QKD,
    LSQQuantizer,
    QKDOptions,
    fold_weights,
    lsq,
    quantize_layers,
)
from asc.compress.stage import compress_run
from asc.config import RunConfig, load_config
from asc.errors import AscError, ConfigError
from asc.export.bundle import export_run, open_run, run_clipset, sample_clips, split_dataset
from asc.export.grid import grid_int8
from asc.export.onnx import export_onnx, int8_weights, run_onnx
from asc.export.verify import ClipSample
from asc.models import BCResNetMod
from asc.train.checkpoint import load_checkpoint
from asc.train.evaluate import load_run_model
from asc.train.hooks import phase_at
from asc.train.loop import Trainer, parameter_digest, train_or_resume

# ------------------------------------------------------------------------------ LSQ


def test_lsq_step_gradient_matches_the_lsq_formula():
    x = torch.tensor([-2.0, -0.74, -0.2, 0.0, 0.31, 0.55, 1.26, 5.0], requires_grad=True)
    step = torch.tensor(0.25, requires_grad=True)
    qn, qp, g = -4, 3, 1 / math.sqrt(x.numel() * 3)
    out = lsq(x, step, qn, qp, g)
    out.sum().backward()
    v = x.detach() / 0.25
    assert out.detach().tolist() == pytest.approx((torch.clamp(v, qn, qp).round() * 0.25).tolist())
    inside = (v > qn) & (v < qp)
    expected = g * torch.where(inside, v.round() - v, torch.where(v <= qn, torch.tensor(float(qn)),
                                                                   torch.tensor(float(qp)))).sum()
    assert step.grad.item() == pytest.approx(expected.item(), rel=1e-6)
    assert step.grad.item() != 0
    assert x.grad.tolist() == inside.float().tolist()  # straight through inside the range, zero outside


def test_per_channel_weight_steps_start_on_the_min_max_grid_and_learn():
    torch.manual_seed(0)
    weight = torch.randn(3, 2, 3, 3)
    quantizer = LSQQuantizer(4, signed=True, channels=3, ndim=4, weight=True)
    quantizer.initialize(weight)
    torch.testing.assert_close(quantizer.step.detach().flatten(), weight.abs().flatten(1).amax(1) / 7)
    before = quantizer.step.detach().clone()
    optimizer = torch.optim.SGD(quantizer.parameters(), lr=0.05)
    for _ in range(5):
        optimizer.zero_grad()
        loss = (quantizer(weight) - weight).pow(2).sum()  # the step moves to lower the quantization error
        loss.backward()
        optimizer.step()
    assert quantizer.step.grad.shape == (3, 1, 1, 1)
    assert not torch.equal(quantizer.step.detach(), before)
    assert ((quantizer(weight) - weight).pow(2).sum() < (lsq(weight, before, -7, 7, 1.0) - weight).pow(2).sum())


def test_a_step_pushed_below_zero_is_projected_back_after_the_optimizer_step():
    """An over-large learning rate drives a step negative; QKD's after_step puts it back on MIN_STEP,
    so the next forward stays finite instead of dividing by a zero or negative step."""
    torch.manual_seed(0)
    qkd = QKD(QKDOptions(), BCResNetMod(width=8, num_classes=4))
    model = qkd.wrap_model(BCResNetMod(width=8, num_classes=4))
    x = torch.randn(2, 1, 32, 40)
    model.train()(x)
    quantizer = model.stages[0][0].pointwise.weight_quant
    assert quantizer in qkd.quantizers and len(qkd.quantizers) == 2 * len(qkd.widths)
    with torch.no_grad():
        quantizer.step[0] = -0.5
        quantizer.step[1] = 0.0
    healthy = quantizer.step.detach()[2:].clone()
    qkd.after_step(trainer=None)  # type: ignore[arg-type] -- the hook reads nothing of the trainer
    assert quantizer.step[0].item() == quantizer.step[1].item() == pytest.approx(MIN_STEP)
    assert torch.equal(quantizer.step.detach()[2:], healthy)
    assert torch.isfinite(model(x)).all()


def test_activation_quantizer_picks_its_sign_from_the_first_batch():
    unsigned, signed = LSQQuantizer(8, signed=None), LSQQuantizer(8, signed=None)
    positive, mixed = torch.rand(4, 10), torch.randn(4, 10)
    unsigned.train()(positive)
    signed.train()(mixed)
    assert unsigned.bounds() == (0, 255) and signed.bounds() == (-128, 127)
    # LSQ's initial step 2·E|x|/√Qp of the first batch, with Qp of the sign it picked
    assert unsigned.step.item() == pytest.approx(2 * positive.abs().mean().item() / math.sqrt(255), rel=1e-6)
    assert signed.step.item() == pytest.approx(2 * mixed.abs().mean().item() / math.sqrt(127), rel=1e-6)


def test_wrapped_student_keeps_its_keys_and_finalizes_to_the_simulated_forward():
    torch.manual_seed(0)
    model = BCResNetMod(width=8, num_classes=4)
    keys = set(model.state_dict())
    widths = quantize_layers(model, 4)
    assert widths["head.0"] == 8 and widths["classifier"] == 8 and set(widths.values()) == {4, 8}
    x = torch.randn(4, 1, 32, 40)
    model.train()(x)  # initializes the activation steps
    model.eval()
    finalized = fold_weights(model, keep_input_quant=True).eval()
    torch.testing.assert_close(finalized(x), model(x), rtol=0, atol=0)
    twin = fold_weights(model, keep_input_quant=False)
    assert set(twin.state_dict()) == keys
    weight, quant = twin.stages[0][0].pointwise.weight, model.stages[0][0].pointwise.weight_quant
    levels = weight / quant.step.detach()
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)  # on the learned 4-bit grid
    assert levels.abs().max() <= 7


def test_options_are_checked():
    with pytest.raises(ConfigError, match="add up to at most 1"):
        QKDOptions(self_study=0.7, co_study=0.5)
    with pytest.raises(ConfigError, match="qkd.bits"):
        QKDOptions(bits=12)


def test_phases_follow_the_options():
    qkd = QKD(QKDOptions(self_study=0.25, co_study=0.5), BCResNetMod(width=8, num_classes=4))
    assert [phase_at(qkd.phases(), epoch, 8).name for epoch in range(8)] == (
        ["self-study"] * 2 + ["co-study"] * 4 + ["tutor"] * 2)


# ------------------------------------------------------------------------------ the stage on tiny runs


@pytest.fixture(scope="module")
def runs(tiny_overrides, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("qkd")
    student, teacher = root / "student", root / "teacher"
    train_or_resume(load_config(RunConfig, None, tiny_overrides(epochs=1)), student, progress=False)
    train_or_resume(load_config(RunConfig, None, [*tiny_overrides(epochs=1), "model.args.width=16"]), teacher,
                    progress=False)
    return student, teacher


QKD_RUN = ["train.epochs=3", "optim.lr=0.01", "qkd.self_study=0.34", "qkd.co_study=0.33", "qkd.teacher_lr=0.02"]


@pytest.fixture(scope="module")
def compressed(runs, tmp_path_factory):
    """A 3-epoch QKD stage (one epoch per phase) that records the teacher's digest after each epoch."""
    student, teacher = runs
    out = student.with_name("qkd-run")
    digests = []
    original = Trainer._write_epoch

    def record(self, metrics):
        digests.append(parameter_digest(self.auxiliaries["qkd.teacher"].module))
        original(self, metrics)

    patch = pytest.MonkeyPatch()
    patch.setattr(Trainer, "_write_epoch", record)
    try:
        start = parameter_digest(QKD.build({"teacher": str(teacher)}, StageContext(student, (1, 32, 63), 3))
                                 .teacher.module)
        status = compress_run(student, out, ["qkd"], [f"qkd.teacher={teacher}", *QKD_RUN], progress=False)
    finally:
        patch.undo()
    return out, status, start, digests


@pytest.mark.slow
def test_teacher_trains_only_in_co_study(compressed):
    _, _, start, digests = compressed
    assert len(digests) == 3
    assert digests[0] == start  # self-study: the teacher is not run
    assert digests[1] != digests[0]  # co-study: it learns (parameters and BN statistics)
    assert digests[2] == digests[1]  # tutoring: frozen


@pytest.mark.slow
def test_phases_switch_and_loss_terms_are_named_per_phase(compressed):
    out, *_ = compressed
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["phases"]["qkd"] for h in history] == ["self-study", "co-study", "tutor"]
    assert [sorted(h["losses"]) for h in history] == [
        ["task"], ["qkd.kd", "qkd.teacher_ce", "qkd.teacher_kd", "task"], ["qkd.kd", "task"]]
    assert all(v > 0 for v in history[1]["losses"].values())


@pytest.mark.slow
def test_stage_writes_finalized_student_report_and_size(compressed, runs):
    out, status, *_ = compressed
    assert status == "compressed"
    assert (out / "finalized.pt2").is_file() and (out / "checkpoints" / "float.pt").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["simulated_accuracy"] == pytest.approx(report["metrics"]["accuracy"])  # same module
    assert report["compression"]["methods"][0]["settings"]["teacher"] == str(runs[1])
    size = json.loads((out / "qkd.json").read_text())
    assert size["bits"] == 8
    assert size["size_bits"] == 8 * size["quantized_weights"] + 32 * (size["other_params"] + size["weight_scales"])
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert any(key.endswith("weight_quant.step") for key in state["model"])
    assert set(state["auxiliaries"]) == {"qkd.teacher"}
    deployed, _ = load_run_model(out)  # the finalized student: float weights on the grid, fixed input steps
    x = torch.randn(2, 1, 32, 63)
    onnx_path = export_onnx(deployed, x, out / "student.onnx")
    # the same float graph in onnxruntime; a value on a rounding boundary may land one step away (float order)
    np.testing.assert_allclose(run_onnx(onnx_path, x), deployed(x).detach().numpy(), atol=0.1)
    teacher_head = state["auxiliaries"]["qkd.teacher"]["head.0.weight"].shape[0]
    assert teacher_head == 2 * state["model"]["head.0.weight"].shape[0]  # the width-16 teacher of a width-8 student


def eval_clips(run_dir: Path) -> ClipSample:
    """Every clip of the run's eval split as log-mels (real clips of its corpus)."""
    run = open_run(run_dir)
    split = run.config.data.eval_split
    return sample_clips(split_dataset(run, run_clipset(run, progress=False), split, as_features=True,
                                      progress=False), None, split=split)


def top1_agreement(onnx_path: Path, model: torch.nn.Module, clips: ClipSample) -> float:
    """Top-1 agreement of the ONNX file, run with its Q/DQ as float ops (the same on every CPU), and ``model``."""
    with torch.no_grad():
        reference = np.concatenate([model(torch.from_numpy(batch)).numpy() for batch in clips.batches()])
    deployed = np.concatenate([run_onnx(onnx_path, batch, fused=False) for batch in clips.batches()])
    return float((deployed.argmax(1) == reference.argmax(1)).mean())


@pytest.mark.slow
def test_w8a8_exports_int8_on_its_learned_grid(compressed, tmp_path):
    out, *_ = compressed
    grid = QuantGrid.read(out)
    assert grid is not None and grid.method == "qkd"
    clips = eval_clips(out)
    path = grid_int8(out, tmp_path / "int8.onnx", torch.zeros(2, *clips.source[0].shape))
    exported = onnx.load(str(path))
    arrays = {init.name: onnx.numpy_helper.to_array(init) for init in exported.graph.initializer}
    trained = load_checkpoint(out / "checkpoints" / "last.pt")["model"]
    twin = load_checkpoint(out / "checkpoints" / "float.pt")["model"]
    assert set(int8_weights(exported)) == {f"{name}.weight_quantized" for name in grid.layers}
    unfolded = [name for name in grid.layers if name.endswith("pointwise") or name == "classifier"]  # no BN after
    assert len(unfolded) > 4
    for name, layer in grid.layers.items():
        weight, step = trained[f"{name}.weight"], trained[f"{name}.weight_quant.step"]
        integers, scale = arrays[f"{name}.weight_quantized"], arrays[f"{name}.weight_scale"]
        # the method's integers, from the raw weight and its learned step (a BN the exporter folds scales s only)
        assert np.array_equal(integers, torch.clamp(weight / step, -127, 127).round().to(torch.int8).numpy()), name
        if name in unfolded:
            assert np.array_equal(scale, step.flatten().numpy()), name
            scaled = integers.astype(np.float32) * scale.reshape(-1, *[1] * (weight.dim() - 1))
            assert torch.equal(torch.from_numpy(scaled), twin[f"{name}.weight"]), name  # the finalized weight
        assert arrays[f"{name}.input_scale"] == trained[f"{name}.input_quant.step"].item()
        assert layer.input is not None and arrays[f"{name}.input_zero_point"].dtype == (
            np.int8 if layer.input.signed else np.uint8)
    finalized, _ = load_run_model(out)
    assert top1_agreement(path, finalized, clips) >= 0.95


@pytest.mark.slow
def test_low_bit_widths_report_their_size_and_have_no_int8_grid_export(runs, tmp_path):
    student, teacher = runs
    out = student.with_name("qkd-4bit")
    compress_run(student, out, ["qkd"], [f"qkd.teacher={teacher}", "qkd.bits=4", "train.epochs=1",
                                         "qkd.self_study=0", "qkd.co_study=1"], progress=False)
    size = json.loads((out / "qkd.json").read_text())
    assert size["bits"] == 4 and set(size["layer_bits"].values()) == {4, 8}
    assert size["size_bits"] < 8 * size["quantized_weights"] + 32 * (size["other_params"] + size["weight_scales"])
    with pytest.raises(AscError, match="4-bit input grid"):
        grid_int8(out, tmp_path / "int8.onnx", torch.zeros(2, 1, 32, 63))
    manifest = export_run(out, tmp_path / "bundle", parity_clips=32, ort_format=False, progress=False)  # auto
    assert manifest.precision == "fp32"
    assert "4-bit input grid" in manifest.source["precision_decision"]["reason"]


# ------------------------------------------------------------------------------ resume


RESUME_RUN = ["train.epochs=3", "optim.lr=0.01", "qkd.self_study=0.34", "qkd.co_study=0.33", "qkd.teacher_lr=0.02"]


@pytest.mark.slow
def test_qkd_killed_after_co_study_resumes_into_tutoring_to_the_same_weights(runs, monkeypatch):
    """One epoch per phase; the stop comes after the co-study epoch (student, steps, teacher and its
    optimizer all moved), so the resumed run enters tutoring, with the teacher frozen, from the checkpoint."""
    student, teacher = runs
    run = kill_and_resume(student, ["qkd"], [f"qkd.teacher={teacher}", *RESUME_RUN], 2, monkeypatch, "qkd")
    a, b = run.straight_state, run.resumed_state
    for key in ("model", "auxiliaries"):
        assert_same_tensors(a[key], b[key])
    assert [h["phases"]["qkd"] for h in b["history"]] == ["self-study", "co-study", "tutor"]
    assert [h["losses"] for h in b["history"]] == [h["losses"] for h in a["history"]]
    report_a, report_b = run.reports()
    assert report_a["accuracy"] == report_b["accuracy"]
