"""The compression stage: PQK's two paths and gradient routing, finalization, and `asc compress`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from compress_resume import assert_same_tensors, kill_and_resume
from source_run import train_source_run
from torch.fx import GraphModule

from asc.bench import cpu_line
from asc.cli import main
from asc.complexity import run_complexity
from asc.compress.base import StageContext
from asc.compress.grid import GRID_NAME
from asc.compress.pqk import PQK, PQKOptions
from asc.compress.prune import LayerSelection
from asc.compress.psg import PSG, PSGOptions
from asc.compress.quant import QATModel, convert_qat, int8_conv_weights
from asc.compress.stage import build_methods, compress_run, split_overrides
from asc.errors import ConfigError
from asc.models import BCResNetMod
from asc.run_files import FINALIZED_NAME
from asc.train.evaluate import evaluate_run, load_run_model
from asc.train.hooks import phase_starts
from asc.train.loop import BatchInfo

SHAPE = (1, 32, 40)
EPOCHS, STEPS_PER_EPOCH = 4, 2


def stub_trainer(labels: torch.Tensor) -> SimpleNamespace:
    """The few trainer attributes PQK reads, so its hooks can be driven step by step."""
    batch = BatchInfo(indices=torch.arange(len(labels)), labels=labels, devices=torch.zeros_like(labels), mix=None)
    return SimpleNamespace(steps_per_epoch=STEPS_PER_EPOCH, step=0, batch=batch,
                           config=SimpleNamespace(train=SimpleNamespace(epochs=EPOCHS)))


@pytest.fixture
def pqk_in_phase2() -> SimpleNamespace:
    """A width-8 BC-ResNet-Mod under PQK at 50 % sparsity, masks final, self-teacher started."""
    torch.manual_seed(0)
    options = PQKOptions(sparsity=0.5, prune_end=0.0, phase2=0.5, freeze_bn_epochs=0, freeze_observer_epochs=0)
    pqk = PQK(options, StageContext(Path("unused"), SHAPE, EPOCHS))
    float_model = BCResNetMod(width=8, num_classes=4)
    model = pqk.wrap_model(float_model)
    x, y = torch.randn(16, *SHAPE), torch.arange(16) % 4
    trainer = stub_trainer(y)
    pqk.setup(trainer)
    first, second = pqk.phases()
    assert phase_starts(pqk.phases(), EPOCHS) == [0, EPOCHS // 2]
    pqk.on_phase_start(trainer, first)
    assert not pqk.teaching
    pqk.on_phase_start(trainer, second)
    assert pqk.teaching and pqk.teacher_ready
    return SimpleNamespace(pqk=pqk, model=model, float_model=float_model, trainer=trainer, x=x, y=y)


@pytest.mark.parametrize(("epochs", "fraction"), [(5, 0.5), (10, 0.45)])
def test_pqk_masks_are_final_when_the_self_teacher_starts(epochs: int, fraction: float) -> None:
    """prune_end = phase2, yet epochs round half to even (2.5 -> 2) apart from steps (10 of 20)."""
    options = PQKOptions(sparsity=0.5, prune_end=fraction, phase2=fraction, freeze_bn_epochs=0,
                         freeze_observer_epochs=0)
    pqk = PQK(options, StageContext(Path("unused"), SHAPE, epochs))
    pqk.wrap_model(BCResNetMod(width=8, num_classes=4))
    steps = 4
    pqk.pruning.setup(SimpleNamespace(steps_per_epoch=steps, step=0,
                                      config=SimpleNamespace(train=SimpleNamespace(epochs=epochs))))
    teacher = phase_starts(pqk.phases(), epochs)[1] * steps
    assert round(fraction * epochs * steps) > teacher  # the fraction alone ends the ramp after the teacher starts
    schedule = pqk.pruning.schedule
    assert schedule is not None and schedule.end_step == teacher and schedule.refreshes(teacher)
    assert not any(schedule.refreshes(step) for step in range(teacher + 1, epochs * steps))


def gradients_of(setup: SimpleNamespace, which: str) -> None:
    setup.model.train()
    setup.model.zero_grad(set_to_none=True)
    outputs = setup.pqk.forward(setup.trainer, setup.model, setup.x)
    losses = setup.pqk.extra_losses(setup.trainer, outputs, setup.y)
    if which == "teacher":
        losses["teacher"].backward()
    else:
        (F.cross_entropy(outputs["logits"], setup.y) + losses["kd"]).backward()


def test_masks_reach_the_target_and_the_teacher_starts_from_the_student_norms(pqk_in_phase2):
    pqk = pqk_in_phase2.pqk
    kept = sum(int(mask.sum()) for mask in pqk.pruning.masks.values())
    total = sum(mask.numel() for mask in pqk.pruning.masks.values())
    assert kept == total - round(0.5 * total)
    student_norms = dict(pqk_in_phase2.float_model.named_modules())
    for name, teacher in zip(pqk.norm_names, pqk.teacher_norms, strict=True):
        torch.testing.assert_close(teacher.running_var, student_norms[name].running_var, rtol=0, atol=0)
        assert teacher.weight is not student_norms[name].weight


def test_teacher_loss_updates_only_the_pruned_weights_and_the_teacher_norms(pqk_in_phase2):
    gradients_of(pqk_in_phase2, "teacher")
    pqk = pqk_in_phase2.pqk
    for name, module in pqk.pruning.layers.items():
        grad, mask = module.weight.grad, module.weight_mask
        assert grad[mask].abs().max() == 0, name
        assert grad[~mask].abs().sum() > 0, name
    masked = {id(module.weight) for module in pqk.pruning.layers.values()}
    for name, parameter in pqk_in_phase2.float_model.named_parameters():
        if id(parameter) not in masked:  # stem, classifier and the student's norms stay the student's
            assert parameter.grad is None or parameter.grad.abs().max() == 0, name
    assert all(norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0 for norm in pqk.teacher_norms)


def test_student_losses_update_only_the_kept_weights_and_never_the_teacher_norms(pqk_in_phase2):
    gradients_of(pqk_in_phase2, "student")
    pqk = pqk_in_phase2.pqk
    for name, module in pqk.pruning.layers.items():
        grad, mask = module.weight.grad, module.weight_mask
        assert grad[~mask].abs().max() == 0, name
        assert grad[mask].abs().sum() > 0, name
    assert all(norm.weight.grad is None for norm in pqk.teacher_norms)


def test_distillation_term_is_nonzero_in_phase_two(pqk_in_phase2):
    setup = pqk_in_phase2
    outputs = setup.pqk.forward(setup.trainer, setup.model, setup.x)
    losses = setup.pqk.extra_losses(setup.trainer, outputs, setup.y)
    assert losses["kd"].item() > 1e-4
    assert set(losses) == {"kd", "teacher"}


@pytest.mark.slow
def test_finalized_student_equals_the_simulated_deploy_path_and_keeps_the_sparsity(pqk_in_phase2):
    setup = pqk_in_phase2
    teacher_norms = setup.pqk.auxiliaries()["teacher_norms"].module
    optimizer = torch.optim.SGD([*setup.model.parameters(), *teacher_norms.parameters()], lr=0.05, momentum=0.9)
    pruned_before = {name: module.weight[~module.weight_mask].clone() for name, module in setup.pqk.pruning.layers.items()}
    for _ in range(3):
        setup.model.train()
        outputs = setup.pqk.forward(setup.trainer, setup.model, setup.x)
        loss = F.cross_entropy(outputs["logits"], setup.y)
        loss = loss + sum(setup.pqk.extra_losses(setup.trainer, outputs, setup.y).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = [not torch.equal(module.weight[~module.weight_mask], pruned_before[name])
               for name, module in setup.pqk.pruning.layers.items()]
    assert all(changed)  # the teacher trained the pruned weights; they were kept, not zeroed
    setup.model.eval()
    x_test = torch.randn(8, *SHAPE)
    with torch.no_grad():
        simulated = setup.pqk.eval_forward(setup.trainer, setup.model, x_test)
        finalized = setup.pqk.finalize(setup.model)
        converted = convert_qat(setup.pqk.pruning.finalize(setup.model), snap_biases=False)
        torch.testing.assert_close(converted(x_test), simulated, rtol=0, atol=1e-5)
        # the deployed graph differs only by its biases and band shifts on the int32 grid
        # (tests/test_quant.py; measured: max |dlogit| 0.09 of 0.59)
        deployed = finalized(x_test)
        assert (deployed.argmax(1) == simulated.argmax(1)).float().mean() >= 0.75
        assert (deployed - simulated).abs().max() < 0.2 * simulated.abs().max()
    weights = int8_conv_weights(finalized)
    zeros = sum(int((w.q == 0).sum()) for w in weights)
    assert zeros >= round(0.5 * sum(mask.numel() for mask in setup.pqk.pruning.masks.values()))
    assert isinstance(setup.model, QATModel)  # finalizing worked on a copy


def test_overrides_split_into_run_settings_and_method_options():
    run, options = split_overrides(["train.epochs=3", "pqk.sparsity=0.7", "optim.lr=0.01"], ["pqk"])
    assert run == ["train.epochs=3", "optim.lr=0.01"]
    assert options == {"pqk": {"sparsity": 0.7}}
    with pytest.raises(ConfigError, match="prefix it with one of"):
        split_overrides(["prune.sparsity=0.5"], ["pqk"])


@pytest.mark.parametrize("names, message", [
    ([], "at least one"), (["zip"], "unknown compression method"), (["qat", "qat"], "twice"),
    (["pqk", "prune"], "methods pqk and prune both do pruning masks; drop one"),
])
def test_method_lists_are_validated(names, message):
    with pytest.raises(ConfigError, match=message):
        build_methods(names, {}, StageContext(Path("unused"), SHAPE, 1))


def test_bad_method_options_name_the_key():
    with pytest.raises(ConfigError, match="pqk.sparsit"):
        build_methods(["pqk"], {"pqk": {"sparsit": 0.5}}, StageContext(Path("unused"), SHAPE, 1))
    with pytest.raises(ConfigError, match="prune_end"):
        build_methods(["pqk"], {"pqk": {"prune_end": 0.9, "phase2": 0.5}}, StageContext(Path("unused"), SHAPE, 1))


# ------------------------------------------------------------------------------- the stage end to end


@pytest.fixture(scope="module")
def trained_run(tiny_overrides, tmp_path_factory) -> Path:
    return train_source_run(tmp_path_factory, tiny_overrides, "compress", epochs=2)


@pytest.mark.slow
def test_pqk_stage_writes_a_finalized_int8_run(trained_run: Path, capsys):
    out = trained_run.with_name("pqk")
    code = main(["compress", str(trained_run), "--method", "pqk", "--out", str(out), "-q", "train.epochs=2",
                 "optim.lr=0.01", "pqk.sparsity=0.8", "pqk.freeze_bn_epochs=1"])
    assert code == 0
    assert "int8 model" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["precision"] == "int8"
    size = report["complexity"]
    assert size["bytes"] == size["params"]  # int8: one byte per weight
    source, _ = load_run_model(trained_run)
    prunable = sum(layer.weight.numel() for layer in LayerSelection().select(source).values())
    assert size["nonzero_params"] <= size["params"] - round(0.8 * prunable)  # int8 rounding only adds zeros
    model, state = load_run_model(out)
    assert isinstance(model, GraphModule) and state["precision"] == "int8"
    assert evaluate_run(out, progress=False).accuracy == pytest.approx(report["metrics"]["accuracy"], abs=1e-9)
    assert run_complexity(out).nonzero_bytes == size["nonzero_bytes"]
    assert compress_run(trained_run, out, ["pqk"], ["train.epochs=2", "optim.lr=0.01", "pqk.sparsity=0.8",
                                                    "pqk.freeze_bn_epochs=1"], progress=False) == "finished"
    assert main(["compress", str(trained_run), "--method", "pqk", "--out", str(out), "-q", "train.epochs=2",
                 "optim.lr=0.01", "pqk.sparsity=0.5", "pqk.freeze_bn_epochs=1"]) == 2  # another sparsity
    assert capsys.readouterr().err.strip() == (f"asc: error: {out}: holds a finished compression with other settings "
                                               "(source, methods or overrides); choose another --out, delete it, "
                                               "or repeat the same command")
    assert main(["compress", str(trained_run), "--method", "pqk", "--out", str(out.with_name("mels")), "-q",
                 "features.n_mels=64"]) == 2  # would fine-tune the model on features it was not built for
    assert capsys.readouterr().err.strip() == (f"asc: error: override 'features.n_mels=64' cannot apply: a compressed "
                                               f"run keeps the model and features of {trained_run}; train a run with "
                                               "it, then compress that run")
    lost = out.with_name("pqk-lost")  # a finished compression whose deployable file went missing
    shutil.copytree(out, lost)
    (lost / FINALIZED_NAME).unlink()
    assert main(["evaluate", str(lost), "-q"]) == 2
    assert capsys.readouterr().err.strip() == (f"asc: error: {lost}: a compressed run without its finalized.pt2 "
                                               "(stopped before it finished, or the file was lost); run the same "
                                               "`asc compress` command again to finish it")
    # `asc export` ships it as int8 without being asked; its biases sit on the kernels' int32 grid, so
    # onnxruntime computes what torch evaluated (max |dlogit| 0.004 on an AVX-512 Xeon; the float
    # norms may round a last bit differently on another CPU, hence --force and bounds, not equality)
    bundle = out.with_name("pqk-bundle")
    assert main(["export", str(out), "--out", str(bundle), "-q", "--parity-clips", "64", "--force"]) == 0
    manifest = json.loads((bundle / "bundle.json").read_text())
    metrics = manifest["metrics"]
    assert manifest["precision"] == "int8"
    assert metrics["top1_agreement"] >= 0.95 and metrics["max_abs_logit_diff"] < 0.05
    assert metrics["verified_on"] == f"{cpu_line()}; onnxruntime {onnxruntime.__version__}"  # whose kernels


@pytest.mark.slow
def test_structured_qat_kd_stage_makes_the_model_physically_smaller(trained_run: Path):
    out = trained_run.with_name("structured")
    assert compress_run(trained_run, out, ["kd", "qat", "structured"],
                        ["train.epochs=1", "structured.ratio=0.5", "structured.round_to=2", "qat.freeze_bn_epochs=0",
                         "qat.freeze_observer_epochs=0"], progress=False) == "compressed"
    source = run_complexity(trained_run)
    compressed = json.loads((out / "report.json").read_text())["complexity"]
    assert compressed["params"] < 0.5 * source.params
    assert compressed["bytes"] == compressed["params"]
    plan = (out / "compress.yaml").read_text()
    assert plan.index("structured") < plan.index("qat") < plan.index("kd")  # pipeline order, not argument order
    assert (out / FINALIZED_NAME).is_file()


def test_qat_needs_an_epoch_to_measure_ranges(trained_run: Path):
    out = trained_run.with_name("qat-too-short")
    with pytest.raises(ConfigError, match="freeze_observer_epochs=1"):
        compress_run(trained_run, out, ["qat"], ["train.epochs=1"], progress=False)
    assert not out.exists()  # the setup failed, so no half-made run is left


def test_compress_refuses_what_is_not_a_trained_run(tmp_path: Path, capsys):
    assert main(["compress", str(tmp_path), "--method", "pqk"]) == 2
    error = capsys.readouterr().err
    assert "not a trained run" in error and len(error.strip().splitlines()) == 1


# ------------------------------------------------------------------------------- PSG


def test_psg_scales_each_gradient_by_its_distance_to_the_grid():
    torch.manual_seed(0)
    model = BCResNetMod(width=8, num_classes=4, dropout=0.0).train()
    psg = PSG(PSGOptions(bits=4, scale=150.0, start=0.5))
    psg.wrap_model(model)
    x, y = torch.randn(8, *SHAPE), torch.arange(8) % 4
    trainer = SimpleNamespace()

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        return {name: module.weight.grad.clone() for name, module in psg.layers.items()}

    floating, scaled = psg.phases()
    assert phase_starts(psg.phases(), 4) == [0, 2]
    psg.on_phase_start(trainer, floating)
    plain = gradients()
    psg.after_backward(trainer)
    assert all(torch.equal(module.weight.grad, plain[name]) for name, module in psg.layers.items())
    assert not psg.ranges  # nothing tracked before the scaling phase

    psg.on_phase_start(trainer, scaled)
    plain = gradients()
    psg.after_backward(trainer)
    convs = [name for name, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert list(psg.layers) == convs and {"head.0", "classifier"} <= set(convs)  # stem and classifier included
    for name, module in psg.layers.items():
        w = module.weight.detach()
        step = max(-min(0.0, w.min().item()), max(0.0, w.max().item())) / 7  # 4 bits: levels -7 .. 7
        expected = plain[name] * 150.0 * (w - step * torch.round(torch.clamp(w / step, -7, 7))).abs()
        torch.testing.assert_close(module.weight.grad, expected, rtol=1e-6, atol=1e-12, msg=name)
        assert module.weight.grad.abs().sum() < plain[name].abs().sum() * 150.0 * step / 2 + 1e-12

    name, module = next(iter(psg.layers.items()))
    first = psg.ranges[name].clone()
    with torch.no_grad():
        module.weight.mul_(3.0)
    gradients()
    psg.after_backward(trainer)
    w = module.weight.detach()
    current = torch.stack([w.min().clamp(max=0.0), w.max().clamp(min=0.0)])
    torch.testing.assert_close(psg.ranges[name], 0.9 * first + 0.1 * current)  # moving average, momentum 0.1
    restored = PSG(PSGOptions(bits=4))
    restored.load_state_dict(psg.state_dict())
    assert torch.equal(restored.ranges[name], psg.ranges[name])


@pytest.mark.slow
def test_psg_killed_mid_scaling_resumes_to_the_same_weights_ranges_and_grid(trained_run: Path, monkeypatch):
    """Phases: float = epoch 0, psg = epochs 1-2; the stop comes after epoch 2 of 3 (mid psg)."""
    overrides = ["train.epochs=3", "optim.lr=0.01", "psg.bits=4", "psg.start=0.34"]
    run = kill_and_resume(trained_run, ["psg"], overrides, 2, monkeypatch, "psg")
    a, b = run.straight_state, run.resumed_state
    assert_same_tensors(a["model"], b["model"])
    assert a["hooks"][0]["ranges"] and a["hooks"][0]["ranges"].keys() == b["hooks"][0]["ranges"].keys()
    assert_same_tensors(a["hooks"][0]["ranges"], b["hooks"][0]["ranges"])  # the moving averages shape the gradients
    assert [h["phases"]["psg"] for h in b["history"]] == ["float", "psg", "psg"]
    assert [h["losses"] for h in b["history"]] == [h["losses"] for h in a["history"]]
    grids = [json.loads((path / GRID_NAME).read_text()) for path in (run.straight, run.stopped)]
    assert grids[0] == grids[1]  # the shipped int8 grid, from the final ranges


def test_psg_is_refused_beside_another_quantizer():
    with pytest.raises(ConfigError, match="^methods qat and psg both do quantization; drop one$"):
        build_methods(["qat", "psg"], {}, StageContext(Path("unused"), SHAPE, 1))
    with pytest.raises(ConfigError, match="psg.bits"):
        build_methods(["psg"], {"psg": {"bits": 1}}, StageContext(Path("unused"), SHAPE, 1))
