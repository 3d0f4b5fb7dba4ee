"""FFL (methods.md §9): cutting networks at taps, gradient routing of the mutual terms, the ramp-up,
deploying a branch or the fused network, composition (with PPP's gates), an exact resume, DDP and the
command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from compress_resume import assert_same_tensors, kill_and_resume
from ddp_run import run_two_ranks
from grad_probe import gradient_sizes
from source_run import train_source_run

from asc.cli import main
from asc.compress.base import StageContext
from asc.compress.ffl import (
    FFL,
    LOGITS,
    FFLOptions,
    default_rampup,
    graft,
    rampup_weight,
    split_network,
)
from asc.compress.ppp import PPP, ChannelGate
from asc.compress.stage import compress_run
from asc.config import RunConfig, load_config
from asc.errors import ConfigError
from asc.export.onnx import export_onnx, run_onnx
from asc.models import build_model
from asc.train.checkpoint import load_checkpoint, load_finalized, save_finalized
from asc.train.evaluate import load_run_model
from asc.train.hooks import phase_at
from asc.train.loop import BatchInfo, Trainer, parameter_digest

SHAPE = (1, 32, 63)  #: one example of the tiny runs: 32 mels, 1 s at hop 256


# ------------------------------------------------------------------------------ pieces and schedule


@pytest.mark.parametrize(("name", "args", "shape"), [("bcresnet_mod", {"width": 8}, (3, 1, 32, 63)),
                                                     ("dcase2024_baseline", {}, (3, 1, 256, 40))])
def test_pieces_cut_at_taps_reproduce_the_model_and_graft_back(name: str, args: dict, shape: tuple):
    torch.manual_seed(0)
    model = build_model(name, 5, **args).eval()
    split, fuse = list(model.feature_taps())[-2:]
    stem, rest = split_network(model, None, [split]), split_network(model, split, [fuse, LOGITS])
    x = torch.randn(shape)
    with torch.no_grad():
        maps, logits = rest(stem(x))
        torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
        assert maps.shape[0] == 3 and maps.dim() == 4
    assert set(stem.state_dict()).isdisjoint(rest.state_dict())
    assert set(stem.state_dict()) | set(rest.state_dict()) == set(model.state_dict())
    other = build_model(name, 5, **args)
    with torch.no_grad():
        for p in rest.parameters():
            p.add_(1.0)  # the piece shares the model's weights ...
    grafted = graft(other, rest)  # ... and its weights load into another instance of the architecture
    for key, value in rest.state_dict().items():
        torch.testing.assert_close(grafted.state_dict()[key], value, rtol=0, atol=0)
    for key, value in stem.state_dict().items():
        torch.testing.assert_close(grafted.state_dict()[key], other.state_dict()[key], rtol=0, atol=0)


def test_rampup_weight_follows_the_formula_and_shortens_with_the_run():
    assert rampup_weight(0, 80) == pytest.approx(math.exp(-5))  # 0.006738
    assert rampup_weight(40, 80) == pytest.approx(math.exp(-1.25)) == pytest.approx(0.2865048)
    assert rampup_weight(60, 80) == pytest.approx(math.exp(-5 / 16))
    assert rampup_weight(80, 80) == 1.0 and rampup_weight(200, 80) == 1.0
    assert rampup_weight(0, 0) == 1.0
    assert [default_rampup(epochs) for epochs in (300, 600, 30, 10, 2, 1)] == [80, 80, 8, 3, 1, 0]
    options = FFLOptions()
    ffl = FFL(options, split="stage3", fuse="stage4", context=StageContext(Path("."), SHAPE, 10), spec={})
    assert ffl.rampup == 3
    assert [phase_at(ffl.phases(), e, 10).name for e in range(5)] == ["ramp-up"] * 3 + ["mutual"] * 2
    explicit = FFL(FFLOptions(rampup=5), split=None, fuse="stage4", context=StageContext(Path("."), SHAPE, 10), spec={})
    assert explicit.rampup == 5


def wrapped(cut: str | None, **options) -> tuple[FFL, torch.nn.Module]:
    torch.manual_seed(0)
    student = build_model("bcresnet_mod", 4, width=8)
    spec = {"name": "bcresnet_mod", "args": {"width": 8}, "num_classes": 4}
    ffl = FFL(FFLOptions(**options), split=cut, fuse="stage4", context=StageContext(Path("."), SHAPE, 2), spec=spec)
    return ffl, ffl.wrap_model(student)


def test_branches_are_copies_fresh_copies_or_separate_networks_of_other_widths():
    ffl, student = wrapped("stage3")
    assert ffl.settings()["init"] == "copy"  # init=auto copies the student ...
    piece = ffl.branches.module.pieces[0]
    assert sorted({key.split(".")[0] for key in piece.state_dict()}) == ["classifier", "stages"]  # stage4 only
    for key, value in piece.state_dict().items():  # init=copy: the student's trained weights, not shared
        torch.testing.assert_close(value, student.state_dict()[key], rtol=0, atol=0)
        assert value.data_ptr() != student.state_dict()[key].data_ptr()
    fresh = [wrapped("stage3", init="fresh", seed=seed)[0].branches.module.pieces[0].state_dict() for seed in (0, 0, 1)]
    key = "stages.3.0.pointwise.weight"
    assert not torch.equal(fresh[0][key], student.state_dict()[key])
    assert torch.equal(fresh[0][key], fresh[1][key]) and not torch.equal(fresh[0][key], fresh[2][key])
    ffl, student = wrapped(None, split="input", widths=[12, 4], branches=3)
    assert ffl.settings()["init"] == "fresh"  # ... but another width has nothing to copy
    pieces = ffl.branches.module.pieces
    assert [p.get_submodule("head.0").out_channels for p in pieces] == [24, 8]  # whole networks of widths 12 and 4
    assert ffl.fusion.module.depthwise.in_channels == 20 + 30 + 10  # 2.5 c channels of each branch's stage4
    assert ffl.fusion.module.fc.out_features == 4


@pytest.mark.parametrize(("options", "match"), [
    ({"branches": 1}, "ffl.branches"), ({"widths": [8]}, "ffl.widths needs ffl.split=input"),
    ({"split": "input", "widths": [8, 8]}, "ffl.widths must list 1"), ({"deploy": 2}, "ffl.deploy"),
    ({"init": "random"}, "ffl.init"), ({"split": "input", "widths": [8], "init": "copy"},
                                        "ffl.init=copy cannot apply with ffl.widths.*set ffl.init=fresh"),
    ({"rampup": -1}, "ffl.rampup"), ({"temperature": 0}, "temperature")])
def test_options_are_checked(options: dict, match: str):
    with pytest.raises(ConfigError, match=match):
        FFLOptions(**options)


def test_branch_copies_of_a_gated_student_record_nothing():
    """PPP's gates append their masks to a list PPP empties each step; a copy's gates would append to a
    list of their own that nobody empties, keeping every step's masks and graphs (PPP composed with FFL)."""
    torch.manual_seed(0)
    ppp = PPP.build({}, StageContext(Path("."), SHAPE, 2))
    student = ppp.wrap_model(build_model("bcresnet_mod", 4, width=8))
    ffl = FFL(FFLOptions(), split="stage3", fuse="stage4", context=StageContext(Path("."), SHAPE, 2), spec={})
    ffl.wrap_model(student)
    branches = ffl.branches.module
    assert sum(isinstance(layer, ChannelGate) for layer in branches.modules()) == 3  # one in each of stage4's blocks
    x = torch.randn(2, *SHAPE)
    for _ in range(5):  # the training steps: the student, then the branch on the student's stem
        student(x)
        branches(ffl.stem(x))
        assert ppp.step_masks().shape == (2, ppp.channels)  # PPP still reads the student's masks
    assert [t for layer in branches.modules() for v in vars(layer).values() if isinstance(v, list) for t in v] == []


# ------------------------------------------------------------------------------ the stage on tiny runs


@pytest.fixture(scope="module")
def source(tiny_overrides, tmp_path_factory) -> Path:
    return train_source_run(tmp_path_factory, tiny_overrides, "ffl", "source")


def started_trainer(source: Path, tiny_overrides, out: Path, **options) -> tuple[Trainer, FFL]:
    """A real trainer set up with FFL on the source run's weights, ready for one step."""
    ffl = FFL.build(options, StageContext(source, SHAPE, 2))
    config = load_config(RunConfig, None, tiny_overrides(epochs=2))
    trainer = Trainer(config, out, hooks=[ffl], progress=False,
                      model_factory=lambda classes: load_run_model(source)[0].train())
    trainer._setup()
    return trainer, ffl


def first_step(trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Outputs and loss terms of the first training step in epoch 0 (the loop's forward and loss)."""
    x, labels, devices, indices = next(iter(trainer._train_loader(0)))
    trainer.batch = BatchInfo(indices, labels, devices, None)
    for hook in trainer.hooks:
        hook.on_epoch_start(trainer, 0)
    outputs = trainer._forward(trainer.features(x))
    return outputs, trainer._loss_terms(outputs, labels)


@pytest.mark.parametrize("feedback", [True, False])
def test_fused_classifier_teaches_the_branches_and_the_ensemble_teaches_the_fused_classifier(
        source, tiny_overrides, tmp_path, feedback):
    trainer, ffl = started_trainer(source, tiny_overrides, tmp_path / "run", fusion_feedback=feedback)
    student = trainer.model
    rest = set(map(id, ffl.student_rest.parameters()))
    piece = ffl.branches.module.pieces[0]
    groups = {
        "stem": [p for p in student.parameters() if id(p) not in rest],  # shared by both branches
        "student_features": list(student.stages[3].parameters()),  # branch 0 after the split
        "student_classifier": list(student.classifier.parameters()),
        "branch1_features": list(piece.get_submodule("stages.3").parameters()),
        "branch1_classifier": list(piece.get_submodule("classifier").parameters()),
        "fusion": list(ffl.fusion.module.parameters()),
    }
    assert all(groups.values())
    outputs, terms = first_step(trainer)
    assert sorted(terms) == ["ffl.ce_branch1", "ffl.ce_fused", "ffl.kd_branch0", "ffl.kd_branch1", "ffl.kd_fused",
                             "task"]
    assert all(float(term.detach()) > 0 for term in terms.values())

    # KL_T(z_f -> z_k): reaches branch k (and the stem it reads), never the fusion module or the other branch
    to_student = gradient_sizes(terms["ffl.kd_branch0"], groups)
    assert to_student["student_features"] > 0 and to_student["student_classifier"] > 0 and to_student["stem"] > 0
    assert to_student["fusion"] == 0 and to_student["branch1_features"] == 0 and to_student["branch1_classifier"] == 0
    to_branch1 = gradient_sizes(terms["ffl.kd_branch1"], groups)
    assert to_branch1["branch1_features"] > 0 and to_branch1["branch1_classifier"] > 0 and to_branch1["stem"] > 0
    assert to_branch1["fusion"] == 0 and to_branch1["student_features"] == 0 and to_branch1["student_classifier"] == 0

    # KL_T(z_ens -> z_f): reaches the fusion module, never a branch's classifier (the ensemble is detached);
    # the branches' feature maps feed the fusion module, so they learn from it only with fusion_feedback
    to_fused = gradient_sizes(terms["ffl.kd_fused"], groups)
    assert to_fused["fusion"] > 0
    assert to_fused["student_classifier"] == 0 and to_fused["branch1_classifier"] == 0
    fed = [to_fused[name] for name in ("stem", "student_features", "branch1_features")]
    assert all(size > 0 for size in fed) if feedback else fed == [0, 0, 0]

    # the mutual terms carry the ramp-up weight: exp(-5) in epoch 0, 1 from epoch R = 1 on (a 2-epoch run)
    assert ffl.rampup == 1 and ffl.weight == pytest.approx(math.exp(-5))
    ffl.on_epoch_start(trainer, 1)
    later = ffl.extra_losses(trainer, outputs, trainer.batch.labels)
    for name, value in later.items():
        scale = math.exp(5) if name.startswith("kd_") else 1.0
        assert float(value.detach()) == pytest.approx(scale * float(terms[f"ffl.{name}"].detach()), rel=1e-5)


FAST = ["train.epochs=2", "optim.lr=0.02", "ffl.lr=0.03"]


@pytest.mark.slow
def test_ffl_killed_mid_run_resumes_to_the_same_weights(source, monkeypatch):
    run = kill_and_resume(source, ["ffl"], FAST, 1, monkeypatch, "ffl")
    a, b = run.straight_state, run.resumed_state
    assert sorted(a["auxiliaries"]) == ["ffl.branches", "ffl.fusion"]
    for key in ("model", "auxiliaries"):
        assert_same_tensors(a[key], b[key])
    assert [h["phases"]["ffl"] for h in b["history"]] == ["ramp-up", "mutual"]
    assert [h["losses"] for h in b["history"]] == [h["losses"] for h in a["history"]]
    report_a, report_b = run.reports()
    assert report_a["accuracy"] == report_b["accuracy"]


@pytest.mark.slow
def test_cli_ships_a_separate_wider_branch_as_an_ordinary_model_and_a_bad_option_is_one_line(source, capsys):
    out = source.with_name("ffl-wide")
    assert main(["compress", str(source), "--method", "ffl", "--out", str(out), "--quiet", "train.epochs=1",
                 "ffl.split=input", "ffl.widths=[12]", "ffl.deploy=1"]) == 0
    assert "ffl-wide: compressed" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    settings = report["compression"]["methods"][0]["settings"]
    assert (settings["split"], settings["fuse"], settings["rampup"]) == ("input", "stage4", 0)
    assert report["simulated_accuracy"] == pytest.approx(report["metrics"]["accuracy"])  # eval ran branch 1
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    branch = {key.removeprefix("pieces.0."): value for key, value in state["auxiliaries"]["ffl.branches"].items()}
    assert branch["head.0.weight"].shape[0] == 24  # width 12 beside the width-8 student
    shipped, _ = load_run_model(out, "float")  # branch 1 rebuilt as the run's architecture
    assert type(shipped).__name__ == "BCResNetMod"
    assert_same_tensors(shipped.state_dict(), branch)
    deployed, _ = load_run_model(out)
    x = torch.randn(2, *SHAPE)
    torch.testing.assert_close(deployed(x), shipped(x), rtol=0, atol=1e-5)
    for bad, key in ((["ffl.branches=1"], "ffl.branches"), (["ffl.split=stage4"], "ffl.split"),
                     (["ffl.colour=red"], "ffl.colour")):
        assert main(["compress", str(source), "--method", "ffl", "--out", str(source.with_name("bad")), "--quiet",
                     *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert key in err and len(err.splitlines()) == 1
        assert not source.with_name("bad").exists()


def test_fused_network_is_the_eval_path_and_exports_to_onnx(source, tiny_overrides, tmp_path):
    trainer, ffl = started_trainer(source, tiny_overrides, tmp_path / "run", deploy="fused")
    x = torch.randn(2, *SHAPE)
    shipped = trainer.finalized_model()
    assert type(shipped).__name__ == "FusedNetwork" and not shipped.training
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(shipped(x), ffl.eval_forward(trainer, trainer.model, x), rtol=0, atol=0)
    student = sum(p.numel() for p in trainer.model.parameters())
    assert sum(p.numel() for p in shipped.parameters()) > student  # the stem, two last stages, the fusion module
    save_finalized(shipped, x, tmp_path / "fused.pt2")  # stored like every finalized module
    deployed = load_finalized(tmp_path / "fused.pt2")
    path = export_onnx(deployed, x, tmp_path / "fused.onnx")
    np.testing.assert_allclose(run_onnx(path, x), shipped(x).detach().numpy(), atol=1e-4)


@pytest.mark.slow
def test_composes_with_structured_and_prune_but_not_in_one_stage_with_qat(source):
    out = source.with_name("ffl-pruned")
    compress_run(source, out, ["prune", "ffl", "structured"],
                 ["train.epochs=1", "structured.ratio=0.5", "structured.round_to=2", "prune.sparsity=0.5",
                  "prune.end=0.5", "prune.every=1"], progress=False)
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    source_size = sum(v.numel() for v in load_checkpoint(source / "checkpoints" / "last.pt")["model"].values())
    assert state["model"]["stages.3.0.pointwise.weight"].shape == \
        state["auxiliaries"]["ffl.branches"]["pieces.0.stages.3.0.pointwise.weight"].shape  # copies of the pruned student
    assert sum(v.numel() for v in state["model"].values()) < 0.8 * source_size  # channels were removed
    float_model = load_checkpoint(out / "checkpoints" / "float.pt")["model"]
    assert float(torch.cat([v.flatten() for k, v in float_model.items() if k.endswith("pointwise.weight")])
                 .eq(0).float().mean()) > 0.3  # the shipped student is the pruned one
    with pytest.raises(ConfigError, match="reads the student.s feature maps, which qat.s traced graph"):
        compress_run(source, source.with_name("ffl-qat"), ["qat", "ffl"], ["train.epochs=1"], progress=False)
    with pytest.raises(ConfigError, match="ffl.deploy=1"):
        compress_run(source, source.with_name("ffl-prune-1"), ["prune", "ffl"], ["train.epochs=1", "ffl.deploy=1"],
                     progress=False)
    with pytest.raises(ConfigError, match="both do distillation"):
        compress_run(source, source.with_name("ffl-kd"), ["kd", "ffl"], [], progress=False)


# ------------------------------------------------------------------------------ DDP

DRIVER = """
import json, os, sys
from asc.train.loop import Trainer, parameter_digest
finish = Trainer._finish
def record(self, metrics):
    digests = {"model": parameter_digest(self.model),
               **{name: parameter_digest(aux.module) for name, aux in self.auxiliaries.items()}}
    with open(os.path.join(sys.argv[1], f"digests-{self.ctx.rank}.json"), "w") as handle:
        json.dump(digests, handle)
    return finish(self, metrics)
Trainer._finish = record
from asc.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_two_process_ddp_ranks_finish_with_identical_student_branches_and_fusion(source, tmp_path):
    """report.json's digests cover the model only, so every rank also writes its auxiliaries' digests."""
    out, driver = source.with_name("ffl-ddp"), tmp_path / "driver.py"
    driver.write_text(DRIVER)
    run_two_ranks(driver, tmp_path, "compress", source, "--method", "ffl", "--out", out, "--quiet", "train.epochs=2",
                  "train.device=cpu", "ffl.lr=0.03")
    ranks = [json.loads((tmp_path / f"digests-{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(ranks[0]) == ["ffl.branches", "ffl.fusion", "model"]
    assert ranks[0] == ranks[1]
    assert ranks[0]["model"] != parameter_digest(load_run_model(source)[0])  # it trained
