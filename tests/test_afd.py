"""AFD (methods.md §10): peers, transfer layers and discriminators; the discriminators learn and the
networks learn to fool them; update order D then networks with the gradients kept apart; deploying
one network; composition; an exact resume; DDP and the command line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from compress_resume import assert_same_tensors, kill_and_resume
from ddp_run import run_two_ranks
from grad_probe import gradient_sizes
from source_run import train_source_run

from asc.cli import main
from asc.compress.afd import (
    AFD,
    AFDOptions,
    adversarial_losses,
    cyclic_reals,
    discriminator_loss,
)
from asc.compress.base import StageContext
from asc.compress.stage import compress_run
from asc.config import RunConfig, load_config
from asc.errors import ConfigError
from asc.train.checkpoint import load_checkpoint
from asc.train.evaluate import load_run_model
from asc.train.loop import BatchInfo, Trainer, parameter_digest

SHAPE = (1, 32, 63)  #: one example of the tiny runs: 32 mels, 1 s at hop 256


@pytest.fixture(scope="module")
def source(tiny_overrides, tmp_path_factory) -> Path:
    return train_source_run(tmp_path_factory, tiny_overrides, "afd", "source")


# ------------------------------------------------------------------------------ options and modules


@pytest.mark.parametrize(("options", "match"), [
    ({"widths": []}, "afd.widths"), ({"widths": [0]}, "afd.widths"), ({"runs": []}, "afd.runs"),
    ({"disc_layers": 0}, "afd.disc_layers"), ({"alpha": -1}, "afd.alpha"), ({"disc_lr": 0}, "afd.disc_lr"),
    ({"deploy": -1}, "afd.deploy"), ({"temperature": 0}, "temperature"),
    ({"disc_optimizer": "adam"}, "afd.disc_optimizer")])
def test_options_are_checked(options: dict, match: str):
    with pytest.raises(ConfigError, match=match):
        AFDOptions(**options)


def test_lsgan_losses_and_the_cyclic_pairing():
    maps = torch.arange(3.0).reshape(3, 1)
    assert cyclic_reals(maps).flatten().tolist() == [1.0, 2.0, 0.0]  # D_k's real maps are network (k+1) mod K's
    real, fake = torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    # D_0: (0 + 1)/2 + (0 + 1)/2; D_1: 0.25 + 0.25
    assert float(discriminator_loss(real, fake)) == pytest.approx(1.5)
    assert adversarial_losses(fake).tolist() == pytest.approx([0.5, 0.25])


def wrapped(source: Path, **options) -> tuple[AFD, torch.nn.Module]:
    afd = AFD.build(options, StageContext(source, SHAPE, 2))
    student = load_run_model(source)[0].train()
    return afd, afd.wrap_model(student)


def test_peers_transfer_layers_and_discriminators_follow_the_widths(source):
    afd, _ = wrapped(source)  # default: one fresh peer at twice the student's width
    assert [net.get_submodule("head.0").out_channels for net in afd.peers.module.nets] == [32]
    afd, _ = wrapped(source, widths=[16, 4], disc_channels=12)  # K = 3, cyclic
    assert afd.taps == ["stage4"] * 3  # every network's last stage before pooling
    layers = afd.transfer.module.layers  # stage4 has 2.5 c channels: 20, 40 and 10 -> the widest, 40
    assert isinstance(layers[1], torch.nn.Identity)
    assert [(layer[0].in_channels, layer[0].out_channels) for layer in (layers[0], layers[2])] == [(20, 40), (10, 40)]
    assert isinstance(layers[0][1], torch.nn.BatchNorm2d)
    discriminators = afd.discriminators.module.nets
    assert len(discriminators) == 3 and all(d.body[0].in_channels == 40 for d in discriminators)
    assert afd.discriminators.step_order < 0 == afd.transfer.step_order == afd.peers.step_order
    assert sorted(afd.auxiliaries()) == ["discriminators", "peers", "transfer"]
    afd, _ = wrapped(source, widths=[8])  # same width: no transfer layer to train
    assert sorted(afd.auxiliaries()) == ["discriminators", "peers"]
    with pytest.raises(ConfigError, match="afd.tap"):
        wrapped(source, tap="stage9")
    with pytest.raises(ConfigError, match="afd.deploy must be 0"):
        wrapped(source, deploy=2)


# ------------------------------------------------------------------------------ one trainer, real steps


def started_trainer(source: Path, tiny_overrides, out: Path, run: tuple[str, ...] = (), **options) -> tuple[Trainer, AFD]:
    """A real trainer set up with AFD on the source run's weights (no warm-up: the lr is the run's at once)."""
    afd = AFD.build(options, StageContext(source, SHAPE, 2))
    config = load_config(RunConfig, None, [*tiny_overrides(epochs=2), "optim.warmup_epochs=0", *run])
    trainer = Trainer(config, out, hooks=[afd], progress=False,
                      model_factory=lambda classes: load_run_model(source)[0].train())
    trainer._setup()
    trainer.train_model.train()
    return trainer, afd


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # the tests wrap step
def test_discriminators_step_first_and_each_gradient_reaches_its_own_modules(source, tiny_overrides, tmp_path):
    trainer, afd = started_trainer(source, tiny_overrides, tmp_path / "run")
    discriminators, transfer = afd.discriminators.module, afd.transfer.module
    groups = {"student": list(trainer.model.parameters()), "peer": list(afd.peers.module.parameters()),
              "transfer0": list(transfer.layers[0].parameters()), "discriminators": list(discriminators.parameters())}
    networks = groups["student"] + groups["peer"] + groups["transfer0"]
    assert isinstance(transfer.layers[1], torch.nn.Identity)  # the peer (c = 16) is the wider network
    assert isinstance(afd.disc_optimizer, torch.optim.AdamW) and isinstance(trainer.optimizer, torch.optim.SGD)

    batch = next(iter(trainer._train_loader(0)))
    x, labels, devices, indices = batch
    trainer.batch = BatchInfo(indices, labels, devices, None)
    before = copy.deepcopy(discriminators)
    outputs = trainer._forward(trainer.features(x))
    # the discriminators took their step inside the forward, on detached maps: no network got a gradient
    assert all(p.grad is None for p in networks)
    assert all(p.grad is not None for p in discriminators.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), discriminators.parameters()))
    maps = outputs["afd_maps"]
    fake, real = before(maps.detach(), cyclic_reals(maps.detach()))
    assert float(outputs["afd_disc_loss"]) == pytest.approx(float(discriminator_loss(real, fake).detach()), rel=1e-5)

    terms = trainer._loss_terms(outputs, labels)
    assert sorted(terms) == ["afd.adv0", "afd.adv1", "afd.ce1", "afd.disc", "afd.kd0", "afd.kd1", "task"]
    assert not terms["afd.disc"].requires_grad
    # the networks' adversarial terms are judged by the discriminators *after* their step
    with torch.no_grad():
        updated, stale = adversarial_losses(discriminators(maps)), adversarial_losses(before(maps))
    for k in (0, 1):
        term = float(terms[f"afd.adv{k}"].detach())
        assert term == pytest.approx(float(updated[k]), rel=1e-5) and abs(term - float(stale[k])) > 1e-4
    # adv_k reaches network k (and its transfer layer), never the other network nor a discriminator
    to_student = gradient_sizes(terms["afd.adv0"], groups)
    assert to_student["student"] > 0 and to_student["transfer0"] > 0
    assert to_student["peer"] == 0 and to_student["discriminators"] == 0
    to_peer = gradient_sizes(terms["afd.adv1"], groups)
    assert to_peer["peer"] > 0 and to_peer["student"] == 0 and to_peer["transfer0"] == 0
    assert to_peer["discriminators"] == 0
    # the logit KD of network k reaches network k only (the others' mean is the detached teacher)
    to_student = gradient_sizes(terms["afd.kd0"], groups)
    assert to_student["student"] > 0 and to_student["peer"] == 0

    # a whole training step: optimizer steps that move parameters come in the order D, then the networks
    events: list[str] = []
    names = {id(opt): "discriminators" if opt is afd.disc_optimizer else "networks" for opt in trainer.optimizers}
    for opt in trainer.optimizers:
        step = opt.step

        def recorded(*args, opt=opt, step=step, **kwargs):
            if any(p.grad is not None for group in opt.param_groups for p in group["params"]):
                events.append(names[id(opt)])
            return step(*args, **kwargs)

        opt.step = recorded
    losses = afd.extra_losses

    def recorded_losses(*args, **kwargs):
        events.append("network loss")
        return losses(*args, **kwargs)

    afd.extra_losses = recorded_losses
    trainer._train_step(batch)
    assert events == ["discriminators", "network loss", "networks"]


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # the tests wrap step
def test_discriminators_learn_and_the_networks_learn_to_fool_them(source, tiny_overrides, tmp_path):
    """Fixed data. Networks held: L_D falls below what any constant D scores (it tells the maps apart).
    Then D frozen: the networks' adversarial terms fall. One conv block per D (no batch norm inside D)
    and Adam make D learn within a dozen steps; alpha 20 makes the pull dominate CE and KD."""
    adam = ("optim.name=adamw", "optim.lr=0.05", "optim.weight_decay=0")  # D gets Adam, as in the paper
    trainer, afd = started_trainer(source, tiny_overrides, tmp_path / "run", adam, disc_layers=1, alpha=20.0,
                                   disc_lr=0.01)
    batch = next(iter(trainer._train_loader(0)))
    networks = next(opt for opt in trainer.optimizers if opt is not afd.disc_optimizer)
    for opt, steps in ((networks, 14), (afd.disc_optimizer, 10)):
        step = opt.step
        opt.step = lambda *args, **kwargs: None  # hold these parameters
        for _ in range(steps):
            trainer._train_step(batch)
        opt.step = step
        if opt is networks:
            disc = [float(v) for v in trainer._terms["afd.disc"]]
            held = {name: p.detach().clone() for name, p in afd.discriminators.module.named_parameters()}
            trainer._terms = {}
    # D alone: from above 2 (random D) to well below 1, the loss of the best constant D (0.5 everywhere)
    assert disc[0] > 2 and sum(disc[-3:]) / 3 < 0.6
    # D frozen (its loss still computed, its parameters unchanged): the networks move towards what it calls real
    adversarial = [float(a + b) for a, b in zip(trainer._terms["afd.adv0"], trainer._terms["afd.adv1"])]
    assert sum(adversarial[-3:]) / 3 < 0.85 * adversarial[0]  # 0.78 measured
    assert_same_tensors(dict(afd.discriminators.module.named_parameters()), held)


# ------------------------------------------------------------------------------ the stage

FAST = ["train.epochs=2", "afd.lr=0.03"]


@pytest.mark.slow
def test_afd_killed_mid_run_resumes_to_the_same_weights(source, monkeypatch):
    run = kill_and_resume(source, ["afd"], FAST, 1, monkeypatch, "afd")
    a, b = run.straight_state, run.resumed_state
    assert sorted(a["auxiliaries"]) == ["afd.discriminators", "afd.peers", "afd.transfer"]
    for key in ("model", "auxiliaries"):
        assert_same_tensors(a[key], b[key])
    # the discriminators' optimizer (stepped inside the forward) resumes with its momentum too
    assert_same_tensors(*({str(i): opt["state"] for i, opt in enumerate(s["optimizers"])} for s in (a, b)))
    assert [h["losses"] for h in b["history"]] == [h["losses"] for h in a["history"]]
    assert a["history"][-1]["losses"]["afd.disc"] > 0
    report_a, report_b = run.reports()
    assert report_a["accuracy"] == report_b["accuracy"]


def test_cli_ships_a_peer_alone_and_a_bad_option_is_one_line(source, capsys):
    out = source.with_name("afd-cli")
    assert main(["compress", str(source), "--method", "afd", "--out", str(out), "--quiet", "train.epochs=1",
                 "afd.widths=[12]", "afd.deploy=1", "afd.disc_channels=16"]) == 0
    assert "afd-cli: compressed" in capsys.readouterr().out
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    peer = {key.removeprefix("nets.0."): value for key, value in state["auxiliaries"]["afd.peers"].items()}
    assert peer["head.0.weight"].shape[0] == 24  # width 12 beside the width-8 student
    shipped, _ = load_run_model(out, "float")  # the peer alone, as the run's architecture: no D, no transfer layer
    assert type(shipped).__name__ == "BCResNetMod"
    assert_same_tensors(shipped.state_dict(), peer)
    deployed, _ = load_run_model(out)
    x = torch.randn(2, *SHAPE)
    torch.testing.assert_close(deployed(x), shipped(x), rtol=0, atol=1e-5)
    report = json.loads((out / "report.json").read_text())
    assert report["simulated_accuracy"] == pytest.approx(report["metrics"]["accuracy"])  # eval ran the peer
    assert report["compression"]["methods"][0]["settings"]["taps"] == ["stage4", "stage4"]
    for bad, key in ((["afd.alpha=-1"], "afd.alpha"), (["afd.tap=stage9"], "afd.tap"), (["afd.colour=red"], "afd.colour"),
                     (["afd.deploy=3"], "afd.deploy")):
        assert main(["compress", str(source), "--method", "afd", "--out", str(source.with_name("bad")), "--quiet",
                     *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert key in err and len(err.splitlines()) == 1
        assert not source.with_name("bad").exists()


@pytest.mark.slow
def test_composes_with_structured_and_prune_on_the_student_but_not_in_one_stage_with_qat(source):
    out = source.with_name("afd-pruned")
    compress_run(source, out, ["prune", "afd", "structured"],
                 ["train.epochs=1", "structured.ratio=0.5", "structured.round_to=2", "prune.sparsity=0.5",
                  "prune.end=0.5", "prune.every=1", "afd.disc_channels=16"], progress=False)
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    source_size = sum(v.numel() for v in load_checkpoint(source / "checkpoints" / "last.pt")["model"].values())
    assert sum(v.numel() for v in state["model"].values()) < 0.8 * source_size  # the student lost channels
    narrow = state["model"]["stages.3.2.pointwise.weight"].shape[0]  # the pruned student's stage4 width
    transfer = state["auxiliaries"]["afd.transfer"]["layers.0.0.weight"]
    assert transfer.shape[:2] == (40, narrow)  # its transfer layer maps it to the peer's 40 channels
    float_model = load_checkpoint(out / "checkpoints" / "float.pt")["model"]
    assert float(torch.cat([v.flatten() for k, v in float_model.items() if k.endswith("pointwise.weight")])
                 .eq(0).float().mean()) > 0.3  # the shipped model is the pruned student
    assert "afd.adv0" in json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["losses"]
    with pytest.raises(ConfigError, match="reads the student's feature maps"):  # refused before any folder
        compress_run(source, source.with_name("afd-qat"), ["qat", "afd"], ["train.epochs=1"], progress=False)
    assert not source.with_name("afd-qat").exists()
    with pytest.raises(ConfigError, match="afd.deploy=1"):
        compress_run(source, source.with_name("afd-prune-1"), ["prune", "afd"], ["train.epochs=1", "afd.deploy=1"],
                     progress=False)


# ------------------------------------------------------------------------------ DDP

DRIVER = """
import sys
from pathlib import Path
from asc.compress.stage import compress_run
source, out, *overrides = sys.argv[1:]
compress_run(Path(source), Path(out), ["afd"], overrides, progress=False)
"""


@pytest.mark.slow
def test_two_process_ddp_ranks_finish_with_identical_student_peer_and_discriminators(source, tmp_path):
    """The report keeps every rank's digest of the model and of each trained auxiliary module."""
    out, driver = source.with_name("afd-ddp"), tmp_path / "driver.py"
    driver.write_text(DRIVER)
    run_two_ranks(driver, source, out, "train.epochs=2", "train.device=cpu", "afd.disc_channels=16")
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    model, auxiliaries = report["parameter_digests"], report["auxiliary_digests"]
    assert sorted(auxiliaries) == ["afd.discriminators", "afd.peers", "afd.transfer"]
    assert len(set(model)) == 1 and all(len(set(ranks)) == 1 for ranks in auxiliaries.values())
    assert model[0] != parameter_digest(load_run_model(source)[0])  # it trained
    assert (out / "finalized.pt2").is_file()
