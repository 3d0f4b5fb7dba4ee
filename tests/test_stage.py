"""Stage v2: phases, auxiliary modules, feature taps, loss terms, the method registry, resumes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from compress_resume import assert_same_tensors, kill_and_resume
from torch import nn

from asc.cli import main
from asc.compress import base
from asc.compress.kd import Distillation, OnlinePeers
from asc.compress.stage import build_methods, compose
from asc.config import RunConfig, load_config
from asc.errors import ConfigError
from asc.models import BCResNet, BCResNetMod, build_model
from asc.models.registry import feature_taps
from asc.train.checkpoint import load_checkpoint
from asc.train.hooks import Auxiliary, Phase, TrainHook, phase_at, phase_starts
from asc.train.loop import Trainer, train_or_resume

# ------------------------------------------------------------------------------ phases


def test_phases_resolve_from_epochs_and_fractions():
    qkd = [Phase("self-study", epochs=2), Phase("co-study", fraction=0.25), Phase("tutoring")]
    assert phase_starts(qkd, 8) == [0, 2, 4]
    assert [phase_at(qkd, epoch, 8).name for epoch in range(8)] == ["self-study"] * 2 + ["co-study"] * 2 + [
        "tutoring"] * 4
    pqk = [Phase("one", fraction=0.5), Phase("two")]
    assert [phase_at(pqk, epoch, 1).name for epoch in range(1)] == ["two"]  # round(0.5) == 0: phase one is empty
    with pytest.raises(ConfigError, match="need 5 epochs, the run has 4"):
        phase_starts([Phase("warm-up", epochs=5), Phase("rest")], 4)
    with pytest.raises(ConfigError, match="no length but is not the last"):
        phase_starts([Phase("a"), Phase("b")], 4)
    with pytest.raises(ConfigError, match="not both"):
        Phase("a", epochs=1, fraction=0.5)


# ------------------------------------------------------------------------------ feature taps


def test_models_name_their_stages_and_the_taps_are_the_stage_outputs():
    torch.manual_seed(0)
    model = BCResNetMod(width=8, num_classes=3).eval()
    taps = feature_taps(model)
    assert list(taps) == ["input_norm", "head", "stage1", "stage2", "stage3", "stage4"]
    x = torch.randn(2, 1, 32, 40)
    seen = {}
    handles = [module.register_forward_hook(lambda m, i, o, n=name: seen.setdefault(n, o))
               for name, module in taps.items()]
    logits = model(x)
    for handle in handles:
        handle.remove()
    assert seen["stage4"].shape == (2, 20, 4, 5)  # 2.5c channels after the head stride and two pools
    torch.testing.assert_close(model.classifier(seen["stage4"]).mean(dim=(2, 3)), logits)
    assert list(feature_taps(BCResNet(num_classes=3))) == ["head", "stage0", "stage1", "stage2", "stage3"]
    with pytest.raises(ConfigError, match="exposes no named stages"):
        feature_taps(build_model("dcase2021_baseline", 3))


# ------------------------------------------------------------------------------ the loop owns what hooks declare


class ProbeHead(TrainHook):
    """An auxiliary linear probe on a tapped stage, trained with its own lr; a phase without task loss.

    Phase ``probe-only`` (first epoch) switches the task loss off, so only the probe term trains;
    phase ``joint`` trains both. The probe reads the tapped stage4 output without editing the model.
    """

    name = "probe"

    def __init__(self, lr: float) -> None:
        torch.manual_seed(1)
        self.head = Auxiliary(nn.Linear(20, 10), lr=lr, weight_decay=0.0)
        self.critic = Auxiliary(nn.Linear(20, 10), lr=0.01, step_order=-1, optimizer="adamw")  # before the model
        self.started: list[tuple[int, str]] = []

    def phases(self):
        return Phase("probe-only", epochs=1, task_loss=False), Phase("joint")

    def auxiliaries(self):
        return {"head": self.head, "critic": self.critic}

    def feature_taps(self):
        return ["stage4"]

    def on_phase_start(self, trainer, phase):
        self.started.append((trainer.epoch, phase.name))

    def extra_losses(self, trainer, outputs, targets):
        features = trainer.feature("stage4").mean(dim=(2, 3)).detach()
        return {"ce": nn.functional.cross_entropy(self.head(features), trainer.batch.labels),
                "critic": nn.functional.cross_entropy(self.critic(features), trainer.batch.labels)}


def test_loop_phases_taps_auxiliaries_and_loss_terms(tiny_overrides, tmp_path: Path):
    config = load_config(RunConfig, None, tiny_overrides(epochs=3))
    hook = ProbeHead(lr=0.5)
    before = hook.head.module.weight.detach().clone()
    trainer = Trainer(config, tmp_path / "run", hooks=[hook], progress=False)
    trainer.fit()
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["phases"]["probe"] for h in history] == ["probe-only", "joint", "joint"]
    assert set(history[0]["losses"]) == {"probe.ce", "probe.critic"}  # the task loss was off in the first phase
    assert set(history[1]["losses"]) == {"task", "probe.ce", "probe.critic"}
    assert history[1]["train_loss"] == pytest.approx(sum(history[1]["losses"].values()), rel=1e-6)
    assert history[2]["losses"]["probe.ce"] < history[0]["losses"]["probe.ce"]  # the probe learns
    assert hook.started == [(0, "probe-only"), (1, "joint")]
    group = next(g for g in trainer.optimizer.param_groups if any(p is hook.head.module.weight for p in g["params"]))
    assert group["initial_lr"] == 0.5 and group["weight_decay"] == 0.0
    assert not torch.equal(before, hook.head.module.weight)
    first, main = trainer.optimizers  # step order -1 first, then the model's (order 0)
    assert isinstance(first, torch.optim.AdamW) and isinstance(main, torch.optim.SGD)  # the critic's own kind
    assert main is trainer.optimizer and [p for g in first.param_groups for p in g["params"]] == [
        hook.critic.module.weight, hook.critic.module.bias]
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    torch.testing.assert_close(state["auxiliaries"]["probe.head"]["weight"], hook.head.module.weight.detach())
    assert set(state["auxiliaries"]) == {"probe.head", "probe.critic"} and len(state["optimizers"]) == 2


def test_one_optimizer_kind_per_step_order(tiny_overrides, tmp_path: Path):
    hook = ProbeHead(lr=0.5)
    hook.auxiliaries = lambda: {"head": hook.head, "critic": hook.critic,
                                "rival": Auxiliary(nn.Linear(20, 10), step_order=-1)}  # the run's SGD at order -1
    with pytest.raises(ConfigError, match="auxiliary 'probe.rival' asks for the run's optimizer at step order -1, "
                                          "where probe.critic uses adamw"):
        Trainer(load_config(RunConfig, None, tiny_overrides(epochs=1)), tmp_path / "run", hooks=[hook],
                progress=False).fit()


class StopAfter(TrainHook):
    """Raises at the start of epoch ``epoch``: an interruption right after a checkpoint was written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_start(self, trainer, epoch):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def _peers(seed: int) -> OnlinePeers:
    torch.manual_seed(seed)
    return OnlinePeers([build_model("bcresnet_mod", 10, width=8)], lr=0.02)


def test_online_peers_resume_exactly(tiny_overrides, tmp_path: Path):
    """Peers are checkpointed with their optimizer state (they used to restart from their first weights)."""
    config = load_config(RunConfig, None, tiny_overrides(epochs=2))
    straight_peers = _peers(0)
    straight = Trainer(config, tmp_path / "straight", hooks=[Distillation(straight_peers), StopAfter(99)],
                       progress=False)
    straight.fit()
    stopped = Trainer(config, tmp_path / "stopped", hooks=[Distillation(_peers(0)), StopAfter(1)], progress=False)
    with pytest.raises(KeyboardInterrupt):
        stopped.fit()
    resumed_peers = _peers(5)  # different starting weights: only the checkpoint can make them equal
    resumed = Trainer(config, tmp_path / "stopped", hooks=[Distillation(resumed_peers), StopAfter(99)],
                      progress=False)
    resumed.fit(resume=True)
    for a, b in zip(straight_peers.peers.module.state_dict().values(), resumed_peers.peers.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [h["losses"] for h in resumed.history] == [h["losses"] for h in straight.history]


# ------------------------------------------------------------------------------ registry


DEMO = '''
from asc.compress.base import Job, Method, register


class _Demo(Method):
    @classmethod
    def build(cls, options, context):
        return cls()

    def output_keys(self):
        return frozenset({"aux_logits"})


@register
class DemoQuant(_Demo):
    name = "demo-quant"
    jobs = frozenset({Job.QUANTIZATION})


@register
class DemoStructure(_Demo):
    name = "demo-structure"
    jobs = frozenset({Job.STRUCTURE})
'''


def test_a_new_method_file_joins_the_registry_without_other_edits(tmp_path: Path, monkeypatch):
    import asc.compress

    (tmp_path / "zz_demo.py").write_text(DEMO)
    base.method_classes()  # the package's own methods register into the real registry first
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr(asc.compress, "__path__", [*asc.compress.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "asc.compress.zz_demo", raising=False)
    try:
        assert {"demo-quant", "demo-structure"} <= set(base.method_classes())
        with pytest.raises(ConfigError, match="^methods qat and demo-quant both do quantization; drop one$"):
            compose(["qat", "demo-quant"])
        assert [cls.name for cls in compose(["kd", "demo-quant", "prune"])] == ["prune", "demo-quant", "kd"]
        with pytest.raises(ConfigError, match="methods demo-structure and demo-quant both produce aux_logits"):
            build_methods(["demo-quant", "demo-structure"], {}, base.StageContext(tmp_path, (1, 32, 40), 1))
        with pytest.raises(TypeError, match="taken by"):
            base.register(type("Other", (base.Method,), {"name": "qat", "jobs": frozenset({base.Job.MASKS}),
                                                          "build": classmethod(lambda cls, o, c: cls())}))
    finally:
        sys.modules.pop("asc.compress.zz_demo", None)


def test_unknown_method_lists_the_registered_ones():
    valid = ", ".join(base.method_classes())
    assert valid.startswith("structured, prune, qat, kd") and "pqk" in valid
    with pytest.raises(ConfigError, match=f"^unknown compression method 'psgx'; valid: {valid}$"):
        compose(["psgx"])


# ------------------------------------------------------------------------------ a bad config leaves no run folder


@pytest.mark.parametrize("override", ["model.args.nope=1", "model.args.width=0"])
def test_bad_model_option_leaves_no_half_made_run(tiny_overrides, tmp_path: Path, capsys, override: str):
    run = tmp_path / "bad"
    assert main(["train", "--quiet", "--out", str(run), *tiny_overrides(epochs=1), override]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not run.exists()


# ------------------------------------------------------------------------------ PQK resumed mid-phase


@pytest.fixture(scope="module")
def source_run(tiny_overrides, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("stage") / "base"
    train_or_resume(load_config(RunConfig, None, tiny_overrides(epochs=1)), run, progress=False)
    return run


PQK_RUN = ["train.epochs=3", "optim.lr=0.01", "pqk.sparsity=0.7", "pqk.prune_end=0.3", "pqk.phase2=0.34",
           "pqk.freeze_bn_epochs=1", "pqk.freeze_observer_epochs=1"]


@pytest.mark.slow
def test_pqk_killed_mid_phase_resumes_to_the_same_weights(source_run: Path, monkeypatch):
    """Phases: prune-quantize = epoch 0, self-distil = epochs 1-2; the stop comes after epoch 2 (mid self-distil)."""
    run = kill_and_resume(source_run, ["pqk"], PQK_RUN, 2, monkeypatch, "pqk")
    a, b = run.straight_state, run.resumed_state
    for key in ("model", "auxiliaries"):
        assert_same_tensors(a[key], b[key])
    assert [h["phases"]["pqk"] for h in b["history"]] == ["prune-quantize", "self-distil", "self-distil"]
    assert [h["losses"] for h in b["history"]] == [h["losses"] for h in a["history"]]
    assert set(b["history"][2]["losses"]) == {"task", "pqk.kd", "pqk.teacher"}
    report_a, report_b = run.reports()
    assert report_a["accuracy"] == report_b["accuracy"]
    assert report_a["log_loss"] == pytest.approx(report_b["log_loss"], abs=1e-9)
