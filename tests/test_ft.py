"""FT: factor loss, paraphraser and translator, the two phases held exactly, resume, CLI and composition."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from compress_resume import assert_same_tensors, kill_and_resume
from ddp_run import assert_ranks_equal, compress_on_two_ranks
from torch import nn

from asc.cli import main
from asc.compress.base import StageContext
from asc.compress.ft import (
    FT,
    FTOptions,
    Paraphraser,
    Translator,
    factor_loss,
    reconstruction_loss,
)
from asc.compress.kd import ModelTeacher
from asc.compress.prune import prune_channels
from asc.compress.stage import build_methods
from asc.config import RunConfig, load_config
from asc.errors import ConfigError
from asc.models import BCResNetMod
from asc.train.checkpoint import load_checkpoint
from asc.train.evaluate import load_run_model
from asc.train.loop import Trainer, parameter_digest, train_or_resume

# ------------------------------------------------------------------------------ losses and modules


def test_factor_loss_matches_a_hand_computation():
    # two samples of a (1, 2, 2) factor; each is flattened and divided by its L2 norm
    student = torch.tensor([[[[3.0, 4.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]], requires_grad=True)
    teacher = torch.tensor([[[[0.0, 2.0], [0.0, 0.0]]], [[[-2.0, 0.0], [0.0, 0.0]]]], requires_grad=True)
    # sample 1: (0.6, 0.8, 0, 0) − (0, 1, 0, 0) → |·| = 0.6 + 0.2 = 0.8
    # sample 2: (0.5, 0.5, 0.5, 0.5) − (−1, 0, 0, 0) → |·| = 1.5 + 0.5 + 0.5 + 0.5 = 3.0
    loss = factor_loss(student, teacher)
    assert loss.item() == pytest.approx((0.8 + 3.0) / 8, abs=1e-7)
    loss.backward()
    assert teacher.grad is None and student.grad is not None and student.grad.abs().sum() > 0


def test_factor_loss_resizes_the_student_factor_to_the_teachers_size():
    teacher = torch.zeros(1, 2, 4, 6)
    teacher[0, 0] = 1.0  # channel 0 everywhere: normalized, 1/sqrt(24) per element of that channel
    student = torch.zeros(1, 2, 2, 3)
    student[0, 0] = 5.0  # bilinear resizing keeps a constant map constant: the same factor after normalizing
    assert factor_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-7)
    student[0, 1] = 5.0  # now both channels: 1/sqrt(48) each against (1/sqrt(24), 0)
    expected = (24 * (1 / 24**0.5 - 1 / 48**0.5) + 24 / 48**0.5) / 48
    assert factor_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_reconstruction_loss_is_l1_or_l2():
    target = torch.tensor([[1.0, -2.0, 0.5, 0.0]])
    out = torch.tensor([[0.0, -1.0, 0.5, 2.0]], requires_grad=True)
    assert reconstruction_loss(out, target, "l1").item() == pytest.approx((1 + 1 + 0 + 2) / 4)
    assert reconstruction_loss(out, target, "l2").item() == pytest.approx((1 + 1 + 0 + 4) / 4)


def test_paraphraser_and_translator_follow_the_spec():
    paraphraser = Paraphraser(20, rate=0.5)
    convs = [m for m in paraphraser.encoder if isinstance(m, nn.Conv2d)]
    deconvs = [m for m in paraphraser.decoder if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [(20, 20), (20, 10), (10, 10)]
    assert [(m.in_channels, m.out_channels) for m in deconvs] == [(10, 10), (10, 20), (20, 20)]
    layers = [*convs, *deconvs]
    assert all(m.kernel_size == (3, 3) and m.stride == (1, 1) and m.bias is not None for m in layers)
    slopes = [m.negative_slope for m in paraphraser.modules() if isinstance(m, nn.LeakyReLU)]
    assert slopes == [0.1] * 6
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in paraphraser.modules())
    x = torch.randn(2, 20, 4, 7)
    assert paraphraser(x).shape == x.shape and paraphraser.encoder(x).shape == (2, 10, 4, 7)
    translator = Translator(12, 10)
    assert [(m.in_channels, m.out_channels) for m in translator if isinstance(m, nn.Conv2d)] == [
        (12, 12), (12, 10), (10, 10)]
    assert translator(torch.randn(2, 12, 4, 7)).shape == (2, 10, 4, 7)


def test_options_are_checked():
    with pytest.raises(ConfigError, match="ft.rate"):
        FTOptions(teacher="t", rate=0.0)
    with pytest.raises(ConfigError, match="ft.reconstruction"):
        FTOptions(teacher="t", reconstruction="l3")
    with pytest.raises(ConfigError, match="ft.paraphrase_epochs"):
        FTOptions(teacher="t", paraphrase_epochs=0)


def _ft(teacher: nn.Module, **options) -> FT:
    return FT(FTOptions(teacher="t", **options), ModelTeacher(teacher), (1, 32, 40))


def test_translator_is_built_for_the_student_it_gets_channel_pruned_or_not():
    torch.manual_seed(0)
    ft = _ft(BCResNetMod(width=16, num_classes=4))  # teacher stage4: 2.5 * 16 = 40 channels, 4 x 5 frames
    assert ft.teacher_tap == "stage4" and ft.tap == "stage4" and tuple(ft.teacher_shape) == (40, 4, 5)
    student = BCResNetMod(width=8, num_classes=4)
    pruned = prune_channels(student, torch.zeros(2, 1, 32, 40), 0.5, round_to=None)
    for model, channels in ((student, 20), (pruned, pruned.classifier.in_channels)):
        before = parameter_digest(model)
        assert ft.wrap_model(model) is model and parameter_digest(model) == before  # probing moves nothing
        first = ft.translator.module[0]
        assert first.in_channels == channels and ft.translator.module[-2].out_channels == 20
        assert ft.paraphraser.module.encoder[-2].out_channels == 20
    assert channels < 20
    with pytest.raises(ConfigError, match=r"^ft\.tap: Sequential has no named stages .* not with an exported graph"):
        ft.wrap_model(nn.Sequential(nn.Conv2d(1, 4, 3)))
    with pytest.raises(ConfigError, match=r"^ft\.teacher_tap=stage9 is not a stage of BCResNetMod; valid: "):
        _ft(BCResNetMod(width=16, num_classes=4), teacher_tap="stage9")


# ------------------------------------------------------------------------------ the stage on tiny runs


@pytest.fixture(scope="module")
def runs(tiny_overrides, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ft")
    student, teacher = root / "student", root / "teacher"
    train_or_resume(load_config(RunConfig, None, tiny_overrides(epochs=1)), student, progress=False)
    train_or_resume(load_config(RunConfig, None, [*tiny_overrides(epochs=1), "model.args.width=12"]), teacher,
                    progress=False)
    return student, teacher


FT_RUN = ["train.epochs=3", "train.batch_size=16", "ft.paraphrase_epochs=1", "optim.lr=0.05",
          "ft.paraphraser_lr=4.0", "ft.paraphraser_weight_decay=0.0005", "ft.translator_weight_decay=0.001"]
ROLES = ("model", "teacher", "paraphraser", "translator")


@pytest.mark.slow
def test_phases_hold_exactly_and_a_run_killed_mid_transfer_resumes_to_the_same_weights(runs, monkeypatch):
    """One paraphrase epoch, two transfer epochs (SGD with momentum and weight decay everywhere); stop after 2."""
    student, teacher = runs
    digests: list[dict[str, str]] = []
    paraphrasers: list[dict[str, torch.Tensor]] = []  #: the initial weights of each run
    reconstruction: list[float] = []
    teacher_maps: list[torch.Tensor] = []

    def digest(trainer: Trainer) -> dict[str, str]:
        modules = {"model": trainer.model, **{role: trainer.auxiliaries[f"ft.{role}"].module for role in ROLES[1:]}}
        return {role: parameter_digest(module) for role, module in modules.items()}

    original_setup, original_write, original_losses = FT.setup, Trainer._write_epoch, FT.extra_losses

    def setup(self, trainer):
        digests.append(digest(trainer))
        paraphrasers.append({k: v.clone() for k, v in self.paraphraser.module.state_dict().items()})
        original_setup(self, trainer)

    def write(self, metrics):
        digests.append(digest(self))
        original_write(self, metrics)

    def losses(self, trainer, outputs, targets):
        terms = original_losses(self, trainer, outputs, targets)
        if "reconstruction" in terms:
            reconstruction.append(float(terms["reconstruction"].detach()))
            teacher_maps.append(outputs["ft_teacher_map"].detach().clone())
        return terms

    record = pytest.MonkeyPatch()  # its own patch: kill_and_resume undoes the fixture's
    for owner, name, patched in ((FT, "setup", setup), (Trainer, "_write_epoch", write),
                                 (FT, "extra_losses", losses)):
        record.setattr(owner, name, patched)
    try:
        run = kill_and_resume(student, ["ft"], [f"ft.teacher={teacher}", *FT_RUN], 2, monkeypatch, "ft")
    finally:
        record.undo()
    start, paraphrased, transfer1, transfer2 = digests[:4]  # the uninterrupted run
    assert start["model"] == parameter_digest(load_run_model(student)[0])
    assert start["teacher"] == parameter_digest(ModelTeacher.from_run(teacher).model)
    # paraphrase: student (weights and BN statistics) and teacher bit-identical, translator untouched
    assert paraphrased["model"] == start["model"] and paraphrased["teacher"] == start["teacher"]
    assert paraphrased["translator"] == start["translator"] and paraphrased["paraphraser"] != start["paraphraser"]
    # transfer: the paraphraser (despite momentum and weight decay in its group) and the teacher bit-identical
    for later in (transfer1, transfer2):
        assert later["paraphraser"] == paraphrased["paraphraser"] and later["teacher"] == start["teacher"]
    assert transfer1["model"] != paraphrased["model"] and transfer1["translator"] != start["translator"]
    assert transfer2["model"] != transfer1["model"] and transfer2["translator"] != transfer1["translator"]
    steps = len(reconstruction) // 2  # the paraphrase epoch of the straight and the stopped run
    assert reconstruction[:steps] == reconstruction[steps:]
    assert_same_tensors(paraphrasers[0], paraphrasers[1])  # two fresh runs start alike (built after seeding)
    paraphraser, batch = Paraphraser(teacher_maps[0].shape[1]), teacher_maps[0]  # the first batch's teacher map
    losses = []
    for weights in (paraphrasers[0], run.straight_state["auxiliaries"]["ft.paraphraser"]):
        paraphraser.load_state_dict(weights)
        with torch.no_grad():
            losses.append(reconstruction_loss(paraphraser(batch), batch, "l1").item())
    assert losses[0] == pytest.approx(reconstruction[0], rel=1e-5)  # what the first step saw
    assert losses[1] < 0.95 * losses[0], losses  # one epoch of the phase lowers it

    a, b = run.straight_state, run.resumed_state
    for key in ("model", "auxiliaries"):
        assert_same_tensors(a[key], b[key])
    assert set(a["auxiliaries"]) == {"ft.paraphraser", "ft.translator"}  # the frozen teacher is rebuilt
    assert [h["phases"]["ft"] for h in b["history"]] == ["paraphrase", "transfer", "transfer"]
    assert [sorted(h["losses"]) for h in b["history"]] == [["ft.reconstruction"], ["ft.factor", "task"],
                                                           ["ft.factor", "task"]]
    assert [h["losses"] for h in b["history"]] == [h["losses"] for h in a["history"]]
    assert run.reports()[0]["accuracy"] == run.reports()[1]["accuracy"]
    # the finalized student is the plain student: same tensors as the trained model, nothing of FT
    shipped, _ = load_run_model(run.straight, "float")
    assert_same_tensors(shipped.state_dict(), a["model"])


@pytest.mark.slow
def test_cli_composes_ft_with_pruning(runs, tmp_path, capsys):
    student, teacher = runs
    out = tmp_path / "pruned-ft"
    assert main(["compress", "--quiet", str(student), "--method", "ft", "--method", "prune", "--out", str(out),
                 f"ft.teacher={teacher}", "train.epochs=2", "train.batch_size=16", "ft.paraphrase_epochs=1",
                 "ft.beta=100", "prune.sparsity=0.5", "prune.start=0.5", "prune.end=0.75", "prune.every=2"]) == 0
    assert "finalized fp32 model" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert [m["name"] for m in report["compression"]["methods"]] == ["prune", "ft"]
    assert report["compression"]["methods"][1]["settings"]["tap"] == "stage4"
    size = report["complexity"]
    assert size["nonzero_params"] < 0.8 * size["params"]
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(history[1]["losses"]) == ["ft.factor", "task"] and history[1]["losses"]["ft.factor"] > 0
    shipped, _ = load_run_model(out)
    assert shipped(torch.zeros(2, 1, 32, 63)).shape == (2, 10)
    assert set(load_checkpoint(out / "checkpoints" / "float.pt")["model"]) == set(
        load_run_model(student)[0].state_dict())  # the student alone: paraphraser and translator dropped


@pytest.mark.parametrize("teacher", ["missing-run", "not-a-run"])
def test_missing_or_bad_teacher_is_one_line_naming_ft_teacher(runs, tmp_path, capsys, teacher):
    student, _ = runs
    (tmp_path / "not-a-run").mkdir()
    out = tmp_path / "out"
    assert main(["compress", "--quiet", str(student), "--method", "ft", "--out", str(out),
                 f"ft.teacher={tmp_path / teacher}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "ft.teacher" in error[0]
    assert not out.exists()


def test_ft_refuses_a_second_replacement_of_the_students_forward(runs):
    student, teacher = runs
    with pytest.raises(ConfigError, match="^methods map and ft both produce logits; drop one$"):
        build_methods(["ft", "map"], {"ft": {"paraphrase_epochs": 1}}, StageContext(student, (1, 32, 63), 3))
    with pytest.raises(ConfigError, match="^ft.paraphrase_epochs=3 leaves no epoch"):
        build_methods(["ft"], {"ft": {"teacher": str(teacher), "paraphrase_epochs": 3}},
                      StageContext(student, (1, 32, 63), 3))


@pytest.mark.slow
def test_two_process_ddp_ranks_finish_with_identical_student_paraphraser_and_translator(runs, tmp_path):
    """Both phases under DDP: the paraphraser trains in the first, the student and translator in the second."""
    student, teacher = runs
    ranks = compress_on_two_ranks(student, tmp_path / "ft", ["ft"],
                                  [*FT_RUN, f"ft.teacher={teacher}", "train.device=cpu"])
    assert_ranks_equal(ranks, "ft.teacher", "ft.paraphraser", "ft.translator")
    start = load_checkpoint(student / "checkpoints" / "last.pt")["model"]
    assert any(not torch.equal(start[name], value) for name, value in ranks[0]["model"].items())  # it trained
    history = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [h["phases"]["ft"] for h in history] == ["paraphrase", "transfer", "transfer"]
