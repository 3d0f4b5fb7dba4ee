"""Distillation: the loss itself, every teacher provider, and its effect inside the training loop."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asc.compress.kd import (
    Distillation,
    ModelTeacher,
    OnlinePeers,
    PrecomputedTeacher,
    SelfTeacher,
    kd_loss,
    precompute_teacher_logits,
    teacher_cache_name,
)
from asc.compress.qkd import load_teacher
from asc.config import RunConfig, load_config
from asc.errors import ConfigError
from asc.models import build_model
from asc.run_files import FINALIZED_NAME
from asc.train.checkpoint import load_checkpoint, save_checkpoint, save_finalized
from asc.train.evaluate import load_run_model
from asc.train.loop import Trainer


def test_kd_loss_is_t_squared_kl_and_leaves_the_teacher_alone():
    torch.manual_seed(0)
    student = torch.randn(4, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    t = 3.0
    p = F.softmax(teacher / t, 1)
    expected = t**2 * (p * (p.log() - F.log_softmax(student / t, 1))).sum(1).mean()
    loss = kd_loss(student, teacher, t)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    assert kd_loss(teacher.detach(), teacher.detach(), t).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError):
        kd_loss(student, teacher, 0.0)


def test_probability_targets_match_logit_targets():
    torch.manual_seed(1)
    student, teacher = torch.randn(3, 4), torch.randn(3, 4)
    probs = F.softmax(teacher / 2.0, 1)
    assert kd_loss(student, probs, 2.0, teacher_is_probs=True).item() == pytest.approx(
        kd_loss(student, teacher, 2.0).item(), rel=1e-6)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory, tiny_overrides) -> Path:
    run = tmp_path_factory.mktemp("kd") / "teacher"
    config = load_config(RunConfig, None, [*tiny_overrides(epochs=3), "model.args.width=12"])
    Trainer(config, run, progress=False).fit()
    return run


def _mean_kl(trainer: Trainer, teacher: torch.nn.Module) -> float:
    dataset = trainer.data.eval
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    trainer.model.eval()
    with torch.no_grad():
        return kd_loss(trainer.model(x), teacher.eval()(x), 1.0).item()


class ConfidentTeacher(torch.nn.Module):
    """A fixed random network with sharpened logits: an input-dependent target far from uniform."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(123)
        self.net = build_model("bcresnet_mod", 10, width=8).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 6.0 * self.net(x)


def test_distillation_term_is_nonzero_and_pulls_the_student_to_the_teacher(tiny_overrides, tmp_path: Path):
    teacher = ConfidentTeacher()
    kl = {}
    for weight in (0.0, 5.0):
        config = load_config(RunConfig, None, tiny_overrides(epochs=3))
        provider = ModelTeacher(teacher)
        hook = Distillation(provider, temperature=2.0, weight=weight)
        seen: list[float] = []
        teacher_calls = []
        original_losses, original_logits = hook.extra_losses, provider.logits

        def recording(trainer, outputs, targets, original=original_losses, seen=seen):
            losses = original(trainer, outputs, targets)
            seen.extend(term.item() for name, term in losses.items() if name == "kd")
            return losses

        def counting(trainer, x, original=original_logits, calls=teacher_calls):
            calls.append(len(x))
            return original(trainer, x)

        hook.extra_losses, provider.logits = recording, counting
        trainer = Trainer(config, tmp_path / f"student-{weight}", hooks=[hook], progress=False)
        trainer.fit()
        if weight > 0:
            assert min(seen) > 0 and len(seen) == len(teacher_calls) > 0
        else:  # a fine-tuning baseline: the teacher never runs and adds no term
            assert seen == [] and teacher_calls == []
        kl[weight] = _mean_kl(trainer, teacher)
    assert kl[5.0] < 0.7 * kl[0.0]


def test_precomputed_logits_match_the_teacher_and_are_reused(teacher_run: Path, tiny_overrides, tmp_path: Path):
    config = load_config(RunConfig, None, tiny_overrides(epochs=1))
    trainer = Trainer(config, tmp_path / "run", progress=False)
    trainer._setup()
    teacher, _ = load_run_model(teacher_run)
    dataset = trainer.data.train
    path = tmp_path / teacher_cache_name(teacher, dataset)
    table = precompute_teacher_logits(teacher, dataset, path, progress=False)
    assert table.shape == (len(dataset), len(trainer.data.labels)) and path.is_file()
    x = torch.stack([dataset[i][0] for i in (0, 5)])
    with torch.no_grad():
        direct = teacher(x).numpy()
    np.testing.assert_allclose(table[[0, 5]], direct, rtol=1e-5, atol=1e-5)
    stamp = path.stat().st_mtime_ns
    precompute_teacher_logits(teacher, dataset, path, progress=False)
    assert path.stat().st_mtime_ns == stamp

    provider = PrecomputedTeacher(table)
    from asc.train.loop import BatchInfo
    trainer.batch = BatchInfo(torch.tensor([5, 0]), torch.zeros(2, dtype=torch.long), torch.zeros(2), None)
    np.testing.assert_allclose(provider.logits(trainer, x).numpy(), table[[5, 0]])


def test_precomputed_soft_targets_follow_mixup(teacher_run: Path, tiny_overrides, tmp_path: Path):
    config = load_config(RunConfig, None, [*tiny_overrides(epochs=1), "augment.mixup_alpha=0.4"])
    table = np.random.default_rng(0).normal(size=(70, 10)).astype(np.float32) * 3
    trainer = Trainer(config, tmp_path / "run", hooks=[Distillation(PrecomputedTeacher(table))], progress=False)
    trainer.fit()
    batch = trainer.batch
    assert batch.mix is not None
    hook = trainer.hooks[0]
    student = torch.zeros(len(batch.indices), 10)
    teacher = PrecomputedTeacher(table).logits(trainer, student)
    loss = hook.extra_losses(trainer, {"logits": student, "teacher_logits": teacher}, batch.labels)["kd"]
    probs = F.softmax(teacher / 2.0, 1)
    lam = batch.mix.lam[:, None]
    mixed = lam * probs + (1 - lam) * probs[batch.mix.perm]
    expected = 4.0 * (mixed * (mixed.log() + math.log(10))).sum(1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_online_peers_learn_alongside_the_student(tiny_overrides, tmp_path: Path):
    torch.manual_seed(0)
    peer = build_model("bcresnet_mod", 10, width=8)
    before = [p.detach().clone() for p in peer.parameters()]
    config = load_config(RunConfig, None, tiny_overrides(epochs=1))
    trainer = Trainer(config, tmp_path / "run", hooks=[Distillation(OnlinePeers([peer]), weight=1.0)],
                      progress=False)
    trainer.fit()
    assert list(trainer.auxiliaries) == ["kd.peers"]
    assert {id(p) for p in peer.parameters()} <= {id(p) for p in trainer.trained_parameters()}
    changed = sum(not torch.equal(a, b.detach()) for a, b in zip(before, peer.parameters()))
    assert changed > 0.9 * len(before)


def test_self_teacher_calls_the_given_path():
    provider = SelfTeacher(lambda x: x * 2)
    assert torch.equal(provider.logits(None, torch.ones(2, 3)), torch.full((2, 3), 2.0))


def test_a_compressed_runs_teacher_is_its_float_twin(teacher_run: Path, tmp_path: Path):
    """``last`` of a compressed run deploys its finalized program; a teacher (frozen or trained) gets the twin."""
    run = tmp_path / "compressed"
    shutil.copytree(teacher_run, run)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    twin = {name: value * 0.5 if value.is_floating_point() else value for name, value in state["model"].items()}
    save_checkpoint({**state, "model": twin}, run / "checkpoints" / "float.pt")
    model, _ = load_run_model(run)  # the plain trained weights, saved as the "finalized" program
    save_finalized(model, torch.zeros(2, 1, 32, 63), run / FINALIZED_NAME)

    deployed, _ = load_run_model(run)
    assert not any(torch.equal(p, twin[name]) for name, p in deployed.state_dict().items() if name in twin
                   and p.is_floating_point() and p.abs().sum() > 0)
    for teacher in (load_run_model(run, trainable=True)[0], ModelTeacher.from_run(run).model, load_teacher(run, "last")):
        loaded = teacher.state_dict()
        assert loaded.keys() == twin.keys() and all(torch.equal(loaded[name], twin[name]) for name in twin)
    assert all(p.requires_grad for p in load_teacher(run, "last").parameters())  # QKD trains it
