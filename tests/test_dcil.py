"""DCIL (methods.md §8): routed gradients of the two paths, the phases' losses, finalize, the stage, resume, DDP."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from compress_resume import assert_same_tensors, kill_and_resume
from ddp_run import assert_ranks_equal, compress_on_two_ranks
from source_run import train_source_run

from asc.cli import main
from asc.compress.base import StageContext
from asc.compress.dcil import DCIL, MUTUAL, WARMUP, DCILOptions
from asc.compress.dense_path import batch_norm_names
from asc.compress.kd import kd_loss
from asc.compress.prune import MASK, sparsity_report, weight_layers
from asc.compress.stage import build_methods
from asc.errors import ConfigError
from asc.models import BCResNetMod
from asc.run_files import FINALIZED_NAME
from asc.train.checkpoint import load_checkpoint
from asc.train.evaluate import load_run_model
from asc.train.hooks import phase_starts
from asc.train.loop import BatchInfo, parameter_digest

SHAPE = (1, 32, 40)
EPOCHS, STEPS_PER_EPOCH = 4, 2


def stub_trainer(labels: torch.Tensor) -> SimpleNamespace:
    """The trainer attributes DCIL reads, so its hooks can be driven step by step."""
    batch = BatchInfo(indices=torch.arange(len(labels)), labels=labels, devices=torch.zeros_like(labels), mix=None)
    return SimpleNamespace(steps_per_epoch=STEPS_PER_EPOCH, step=0, batch=batch,
                           config=SimpleNamespace(train=SimpleNamespace(epochs=EPOCHS)))


def started(options: DCILOptions) -> SimpleNamespace:
    """A width-8 BC-ResNet-Mod (no dropout) under DCIL, set up at step 0."""
    torch.manual_seed(0)
    model = BCResNetMod(width=8, num_classes=4, dropout=0.0)
    dcil = DCIL(options)
    wrapped = dcil.wrap_model(model)
    x, y = torch.randn(16, *SHAPE), torch.arange(16) % 4
    trainer = stub_trainer(y)
    dcil.setup(trainer)
    return SimpleNamespace(dcil=dcil, model=wrapped, trainer=trainer, x=x, y=y,
                           dense=dcil.auxiliaries()["dense"].module)


def losses_in(setup: SimpleNamespace, phase: str) -> dict[str, torch.Tensor]:
    """The step's named terms as the loop forms them: the task loss on the pruned logits, then DCIL's."""
    setup.dcil.on_phase_start(setup.trainer, next(p for p in setup.dcil.phases() if p.name == phase))
    outputs = setup.dcil.forward(setup.trainer, setup.model, setup.x)
    return {"task": F.cross_entropy(outputs["logits"], setup.y), **setup.dcil.extra_losses(setup.trainer, outputs, setup.y),
            **{f"out.{key}": value for key, value in outputs.items()}}


@pytest.fixture
def final_masks() -> SimpleNamespace:
    """Masks at their 50 % target from step 0 (target 0); warm-up = epochs 0-1 of 4."""
    return started(DCILOptions(sparsity=0.5, target=0.0, warmup=0.5))


def test_each_path_trains_only_its_weights_norms_and_classifier(final_masks):
    setup = final_masks
    dcil, model, dense = setup.dcil, setup.model, setup.dense
    assert "head.0" in dcil.layers and "classifier" not in dcil.layers  # every conv but the classifier
    kept = sum(int(module.get_buffer(MASK).sum()) for module in dcil.layers.values())
    total = sum(module.weight.numel() for module in dcil.layers.values())
    assert kept == total - round(0.5 * total)
    masked = {id(module.weight) for module in dcil.layers.values()}
    shared_own = {name: p for name, p in model.named_parameters() if id(p) not in masked}  # bn_part and fc_part
    assert "classifier.weight" in shared_own and "classifier.bias" in shared_own
    assert dense.names[-1] == "classifier" and len(dense.owned) == len(batch_norm_names(model)) + 1
    shares = {id(p) for p in model.parameters()} & {id(p) for p in dense.parameters()}
    assert not shares  # the dense path's norms and classifier are copies, not the model's

    # the pruned path: task CE + KL(dense -> pruned)
    losses = losses_in(setup, MUTUAL)
    (losses["task"] + losses["kd_pruned"]).backward()
    for name, module in dcil.layers.items():
        grad, mask = module.weight.grad, module.get_buffer(MASK)
        assert grad[~mask].abs().max() == 0, name  # pruned entries: exactly zero
        assert grad[mask].abs().sum() > 0, name
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in shared_own.values())
    assert all(p.grad is None for p in dense.parameters())
    # the gradient is dL/d(W*m) masked: the same network run on W*m as leaf tensors
    leaves = {f"{name}.weight": (module.weight * module.get_buffer(MASK)).detach().requires_grad_()
              for name, module in dcil.layers.items()}
    reference = torch.func.functional_call(model, leaves, (setup.x,))
    torch.testing.assert_close(reference, losses["out.logits"], rtol=0, atol=0)
    (F.cross_entropy(reference, setup.y) + kd_loss(reference, losses["out.dense_logits"])).backward()
    for name, module in dcil.layers.items():
        expected = leaves[f"{name}.weight"].grad * module.get_buffer(MASK)
        torch.testing.assert_close(module.weight.grad, expected, rtol=1e-5, atol=1e-8, msg=name)

    # the dense path: its CE + KL(pruned -> dense)
    model.zero_grad(set_to_none=True)
    losses = losses_in(setup, MUTUAL)
    (losses["dense"] + losses["kd_dense"]).backward()
    for name, module in dcil.layers.items():
        grad, mask = module.weight.grad, module.get_buffer(MASK)
        assert grad[mask].abs().max() == 0, name  # kept entries: exactly zero
        assert grad[~mask].abs().sum() > 0, name
    assert all(p.grad is None for p in shared_own.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dense.parameters())


def test_the_dense_path_runs_the_full_weights_with_its_own_norms_and_classifier(final_masks):
    setup = final_masks
    dense_logits = losses_in(setup, WARMUP)["out.dense_logits"]
    full = BCResNetMod(width=8, num_classes=4, dropout=0.0)  # a plain copy of the unmasked network
    full.load_state_dict({k: v for k, v in setup.model.state_dict().items() if not k.endswith(MASK)})
    full.train()
    torch.testing.assert_close(dense_logits, full(setup.x), rtol=1e-5, atol=1e-6)
    # its norms moved their own running statistics, the pruned path's moved theirs
    moved = setup.dense.own("head.1").running_mean
    assert not torch.equal(moved, setup.model.head[1].running_mean) and moved.abs().sum() > 0
    with torch.no_grad():
        setup.dense.own("classifier").bias.add_(1.0)  # a class-independent shift changes no probability
        setup.dense.own("classifier").weight[0].add_(0.5)
    assert not torch.allclose(setup.dcil.forward(setup.trainer, setup.model, setup.x)["dense_logits"], dense_logits)


def test_mutual_distillation_terms_only_after_the_warm_up(final_masks):
    setup = final_masks
    warm, mutual = setup.dcil.phases()
    assert (warm.name, mutual.name) == (WARMUP, MUTUAL) and phase_starts(setup.dcil.phases(), EPOCHS) == [0, 2]
    terms = losses_in(setup, WARMUP)
    assert {k for k in terms if not k.startswith("out.")} == {"task", "dense"}
    torch.testing.assert_close(terms["dense"], F.cross_entropy(terms["out.dense_logits"], setup.y))
    terms = losses_in(setup, MUTUAL)
    assert {k for k in terms if not k.startswith("out.")} == {"task", "dense", "kd_pruned", "kd_dense"}
    pruned, dense = terms["out.logits"].detach(), terms["out.dense_logits"].detach()

    def kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:  # T² Σ p_t log(p_t / p_s), T = 2
        log_t, log_s = F.log_softmax(teacher / 2, 1), F.log_softmax(student / 2, 1)
        return 4 * (log_t.exp() * (log_t - log_s)).sum(1).mean()

    torch.testing.assert_close(terms["kd_pruned"], kl(dense, pruned))
    torch.testing.assert_close(terms["kd_dense"], kl(pruned, dense))
    assert terms["kd_pruned"] > 1e-4 and terms["kd_dense"] > 1e-4


def test_masks_ramp_cubically_to_the_target_then_hold():
    setup = started(DCILOptions(sparsity=0.6, target=0.5, every=1))  # ramp over 4 of the 8 steps
    dcil, trainer = setup.dcil, setup.trainer
    total = sum(module.weight.numel() for module in dcil.layers.values())
    pruned = []
    for step in range(1, 7):
        trainer.step = step
        dcil.after_step(trainer)
        pruned.append(total - sum(int(module.get_buffer(MASK).sum()) for module in dcil.layers.values()))
    expected = [round((0.6 - 0.6 * (1 - min(step, 4) / 4) ** 3) * total) for step in range(1, 7)]
    assert pruned == expected and pruned[3] == round(0.6 * total)
    weights = torch.cat([module.weight.detach().abs().flatten() for module in dcil.layers.values()])
    keep = torch.cat([module.get_buffer(MASK).flatten() for module in dcil.layers.values()])
    assert weights[keep].min() >= weights[~keep].max()  # one global magnitude threshold


@pytest.mark.parametrize("keep_stem", [False, True])
def test_finalize_ships_the_pruned_path_at_the_target_sparsity(keep_stem: bool):
    setup = started(DCILOptions(sparsity=0.6, target=0.5, every=1, warmup=0.0, keep_stem=keep_stem))
    dcil, model, trainer = setup.dcil, setup.model, setup.trainer
    assert ("head.0" in dcil.layers) != keep_stem
    dcil.on_phase_start(trainer, dcil.phases()[1])
    optimizer = torch.optim.SGD([*model.parameters(), *setup.dense.parameters()], lr=0.05, momentum=0.9)
    for _ in range(5):  # past the ramp's end (step 4)
        model.train()
        outputs = dcil.forward(trainer, model, setup.x)
        loss = F.cross_entropy(outputs["logits"], setup.y) + sum(dcil.extra_losses(trainer, outputs, setup.y).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        trainer.step += 1
        dcil.after_step(trainer)
    model.eval()
    x_test = torch.randn(6, *SHAPE)
    with torch.no_grad():
        simulated = dcil.eval_forward(trainer, model, x_test)
        final = dcil.finalize(model)
        torch.testing.assert_close(final(x_test), simulated, rtol=0, atol=1e-5)
    total = sum(module.weight.numel() for module in dcil.layers.values())
    assert sparsity_report(final, list(dcil.layers))["zeros"] == round(0.6 * total)
    assert not any(MASK in dict(module.named_buffers()) for _, module in weight_layers(final))
    fc_part, fc_full = model.classifier, setup.dense.own("classifier")
    assert torch.equal(final.classifier.weight, fc_part.weight) and torch.equal(final.classifier.bias, fc_part.bias)
    assert not torch.allclose(final.classifier.weight, fc_full.weight)  # the dense path's classifier is dropped
    assert torch.equal(final.head[1].running_mean, model.head[1].running_mean)  # and so are its norms
    assert MASK in dict(model.get_submodule(next(iter(dcil.layers))).named_buffers())  # training model untouched


def test_dcil_owns_masks_and_distillation_and_names_bad_options():
    context = StageContext(Path("unused"), SHAPE, 4)
    for other in ("prune", "pqk", "map"):
        with pytest.raises(ConfigError, match="both do pruning masks"):
            build_methods([other, "dcil"], {}, context)
    for other in ("kd", "qkd"):
        with pytest.raises(ConfigError, match=f"^methods dcil and {other} both do distillation; drop one$"):
            build_methods(["dcil", other], {}, context)
    with pytest.raises(ConfigError, match="dcil.sparsity"):
        build_methods(["dcil"], {"dcil": {"sparsity": 1.0}}, context)
    with pytest.raises(ConfigError, match="dcil.warmup"):
        build_methods(["dcil"], {"dcil": {"warmup": 1.5}}, context)
    assert [method.name for method in build_methods(["qat", "dcil"], {}, context)] == ["dcil", "qat"]
    (method,) = build_methods(["dcil"], {"dcil": {"sparsity": 0.5}}, context)
    assert method.settings() == {
        "sparsity": 0.5, "scope": "global", "target": 0.75, "every": 16, "warmup": 0.25, "temperature": 2.0,
        "keep_stem": False}


# ------------------------------------------------------------------------------- the stage end to end


@pytest.fixture(scope="module")
def source_run(tiny_overrides, tmp_path_factory) -> Path:
    return train_source_run(tmp_path_factory, tiny_overrides, "dcil")


@pytest.mark.slow
def test_asc_compress_dcil_from_the_command_line(source_run: Path, capsys):
    out = source_run.with_name("dcil-cli")
    assert main(["compress", str(source_run), "--method", "dcil", "--out", str(out), "-q", "train.epochs=2",
                 "train.batch_size=16", "optim.lr=0.01", "dcil.sparsity=0.5", "dcil.target=0.5", "dcil.every=2",
                 "dcil.warmup=0.5"]) == 0
    assert (out / FINALIZED_NAME).is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["precision"] == "fp32"
    assert [h["phases"]["dcil"] for h in report["history"]] == [WARMUP, MUTUAL]
    source, _ = load_run_model(source_run)
    prunable = [name for name, _ in weight_layers(source)][:-1]  # all but the classifier
    total = sum(source.get_submodule(name).weight.numel() for name in prunable)
    twin, _ = load_run_model(out, "float")
    assert sparsity_report(twin, prunable)["zeros"] == round(0.5 * total)
    assert report["metrics"]["accuracy"] == report["simulated_accuracy"]  # what shipped is the pruned path

    capsys.readouterr()
    assert main(["compress", str(source_run), "--method", "dcil", "--out", str(out.with_name("bad")), "-q",
                 "dcil.sparsty=0.5"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "dcil.sparsty" in error and "dcil.sparsity" in error


# 4 steps per epoch: warm-up = epochs 0-1, mutual distillation = epoch 2; the ramp ends at step 6
DCIL_RUN = ["train.epochs=3", "train.batch_size=16", "optim.lr=0.01", "dcil.sparsity=0.6", "dcil.target=0.5",
            "dcil.every=2", "dcil.warmup=0.67"]


@pytest.mark.slow
def test_dcil_killed_mid_warm_up_resumes_to_the_same_weights(source_run: Path, monkeypatch):
    """The stop comes after epoch 1 (mid warm-up, mid ramp); the resumed run enters mutual distillation."""
    run = kill_and_resume(source_run, ["dcil"], DCIL_RUN, 1, monkeypatch, "dcil")
    a, b = run.straight_state, run.resumed_state
    for key in ("model", "auxiliaries"):
        assert_same_tensors(a[key], b[key])
    assert set(b["auxiliaries"]) == {"dcil.dense"}
    assert_same_tensors(a["hooks"][0]["pruning"]["masks"], b["hooks"][0]["pruning"]["masks"])
    assert [h["phases"]["dcil"] for h in b["history"]] == [WARMUP, WARMUP, MUTUAL]
    assert [h["losses"] for h in b["history"]] == [h["losses"] for h in a["history"]]
    logged = [json.loads(line)["losses"] for line in (run.stopped / "metrics.jsonl").read_text().splitlines()]
    assert [set(losses) for losses in logged] == [{"task", "dcil.dense"}] * 2 + [
        {"task", "dcil.dense", "dcil.kd_pruned", "dcil.kd_dense"}]
    assert all(value > 0 for losses in logged for value in losses.values())
    twin_a, twin_b = load_run_model(run.straight, "float")[0], load_run_model(run.stopped, "float")[0]
    assert parameter_digest(twin_a) == parameter_digest(twin_b)  # the finalized weights, bit for bit


# ------------------------------------------------------------------------------- two-process DDP


@pytest.mark.slow
def test_two_process_ddp_ranks_finish_with_identical_weights_and_dense_paths(tmp_path: Path, source_run: Path,
                                                                          tiny_overrides):
    """Both ranks hold the same model and the same dense-path norms and classifier (an auxiliary)."""
    out = tmp_path / "dcil"
    ranks = compress_on_two_ranks(source_run, out, ["dcil"], [*tiny_overrides(epochs=2), "train.device=cpu",
                                                             "optim.lr=0.01", "dcil.sparsity=0.5", "dcil.target=0.5",
                                                             "dcil.every=1", "dcil.warmup=0.5"])
    assert (out / FINALIZED_NAME).is_file()
    assert_ranks_equal(ranks, "dcil.dense")
    dense, model = ranks[0]["auxiliaries"]["dcil.dense"], ranks[0]["model"]
    fc_full = dense[f"owned.{max(int(key.split('.')[1]) for key in dense)}.weight"]  # the classifier comes last
    start = load_checkpoint(source_run / "checkpoints" / "last.pt")["model"]["classifier.weight"]
    assert fc_full.shape == start.shape and not torch.equal(fc_full, start)  # the dense path trained (on both ranks)
    assert not torch.equal(fc_full, model["classifier.weight"])
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["phases"]["dcil"] for h in history] == [WARMUP, MUTUAL]


@pytest.mark.slow
def test_two_process_ddp_pqk_ranks_finish_with_identical_weights_and_teacher(tmp_path: Path, source_run: Path,
                                                                          tiny_overrides):
    """PQK's teacher is the same dense path: its norms are all-reduced like DCIL's."""
    out = tmp_path / "pqk"
    ranks = compress_on_two_ranks(source_run, out, ["pqk"], [*tiny_overrides(epochs=2), "train.device=cpu",
                                                            "optim.lr=0.01", "pqk.sparsity=0.5", "pqk.prune_end=0.25",
                                                            "pqk.phase2=0.5", "pqk.freeze_bn_epochs=1",
                                                            "pqk.freeze_observer_epochs=1"])
    assert (out / FINALIZED_NAME).is_file()
    assert_ranks_equal(ranks, "pqk.teacher_norms")
