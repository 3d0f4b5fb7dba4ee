"""MAP (methods.md §7): attention-scaled gradients, dynamic then frozen masks, folding, the stage, resume."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from compress_resume import assert_same_tensors, kill_and_resume
from torch import nn

from asc.compress.base import StageContext
from asc.compress.map import (
    EXPLOITATION,
    EXPLORATION,
    MAP,
    MAPOptions,
    magnitude_attention,
)
from asc.compress.prune import MASK, LayerSelection, sparsity_report
from asc.compress.qkd import QKD, QKDOptions
from asc.compress.stage import build_methods, compose, compress_run, float_twin
from asc.config import RunConfig, load_config
from asc.errors import ConfigError
from asc.features import FeatureConfig
from asc.models import BCResNetMod
from asc.run_files import FINALIZED_NAME
from asc.train.checkpoint import load_checkpoint
from asc.train.evaluate import evaluate_run, load_run_model
from asc.train.hooks import phase_starts
from asc.train.loop import Trainer, parameter_digest, train_or_resume

SHAPE = (1, 32, 40)


def stub_trainer(epochs: int = 4, steps_per_epoch: int = 2) -> SimpleNamespace:
    """The trainer attributes MAP reads, so its hooks can be driven step by step."""
    return SimpleNamespace(step=0, steps_per_epoch=steps_per_epoch,
                           config=SimpleNamespace(train=SimpleNamespace(epochs=epochs)))


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def started(options: MAPOptions, model: nn.Module, **trainer: int) -> tuple[MAP, SimpleNamespace]:
    method = MAP(options)
    method.wrap_model(model)
    stub = stub_trainer(**trainer)
    method.setup(stub)
    return method, stub


@pytest.mark.parametrize("phase", [EXPLORATION, EXPLOITATION])
def test_backward_is_the_effective_weight_gradient_times_the_attention(phase: str):
    model = small_net()
    # ramp 0: the final sparsity from the start, so half of every weight is masked
    method, stub = started(MAPOptions(sparsity=0.5, exploration=0.5, ramp=0.0, scope="layer", keep_ends=False), model)
    assert phase_starts(method.phases(), 4) == [0, 2]
    method.on_phase_start(stub, next(p for p in method.phases() if p.name == phase))
    x, y = torch.randn(5, 2, 6, 6), torch.tensor([0, 1, 2, 0, 1])
    F.cross_entropy(method.forward(stub, model, x)["logits"], y).backward()

    leaves = {}  # the same network run on W_eff = W · |W|/max|W| · m as leaf tensors: dL/dW_eff
    for name, module in method.layers.items():
        w = module.weight.detach()
        leaves[f"{name}.weight"] = (w * (w.abs() / w.abs().max()) * module.get_buffer(MASK)).requires_grad_()
    reference = torch.func.functional_call(model, leaves, (x,))
    torch.testing.assert_close(method.forward(stub, model, x)["logits"], reference, rtol=0, atol=0)
    F.cross_entropy(reference, y).backward()

    assert set(method.layers) == {"0", "4"}  # conv and linear
    for name, module in method.layers.items():
        w, mask = module.weight.detach(), module.get_buffer(MASK)
        assert int((~mask).sum()) == round(0.5 * w.numel())
        expected = leaves[f"{name}.weight"].grad * (w.abs() / w.abs().max())
        if phase == EXPLOITATION:
            expected = expected * mask
        torch.testing.assert_close(module.weight.grad, expected, rtol=1e-6, atol=1e-9)
        pruned_grad = module.weight.grad[~mask].abs().sum()
        assert pruned_grad > 0 if phase == EXPLORATION else pruned_grad == 0  # straight-through only while exploring
    assert model[0].bias.grad is not None and model[0].bias.grad.abs().sum() > 0  # biases train unchanged


def test_attention_is_the_magnitude_over_the_layer_maximum():
    w = torch.tensor([[-2.0, 1.0], [0.5, 0.0]])
    torch.testing.assert_close(magnitude_attention(w), torch.tensor([[1.0, 0.5], [0.25, 0.0]]))
    assert torch.equal(magnitude_attention(torch.zeros(3)), torch.zeros(3))


def test_exploration_lets_a_pruned_weight_regrow_and_exploitation_freezes_the_masks():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.9, 0.1, 0.2]]))
    model = nn.Sequential(layer)
    # 3 epochs x 1 step: exploration = steps 1-2, masks refreshed after every step at 50 % sparsity
    method, stub = started(MAPOptions(sparsity=0.5, exploration=0.67, ramp=0.0, every=1, scope="layer",
                                      keep_ends=False), model, epochs=3, steps_per_epoch=1)
    assert method.exploration_end == 2
    mask = layer.get_buffer(MASK)
    assert mask.tolist() == [[True, True, False, False]]  # pruned at step 0: 0.1 and 0.2
    optimizer = torch.optim.SGD(model.parameters(), lr=10.0)
    x = torch.tensor([[0.0, 0.0, 1.0, 0.0]])  # the loss rewards the pruned weight 2

    def step() -> None:
        optimizer.zero_grad()
        (-method.forward(stub, model, x)["logits"].sum()).backward()
        optimizer.step()
        stub.step += 1
        method.after_step(stub)

    method.on_phase_start(stub, method.phases()[0])
    step()  # gradient of w2: -1 · a2 = -0.1 (straight through the mask), so w2 = 0.1 + 10 · 0.1
    torch.testing.assert_close(layer.weight.detach(), torch.tensor([[1.0, 0.9, 1.1, 0.2]]))
    assert mask.tolist() == [[True, False, True, False]]  # w2 regrew, w1 (now the second smallest) is pruned
    step()  # now max |W| = w2, so a2 = 1 and w2 = 1.1 + 10 · 1; w1 gets no gradient (x1 = 0): the masks stay
    torch.testing.assert_close(layer.weight.detach(), torch.tensor([[1.0, 0.9, 11.1, 0.2]]))
    assert mask.tolist() == [[True, False, True, False]]

    method.on_phase_start(stub, method.phases()[1])
    frozen_values = torch.tensor([[1.0, 0.0, 11.1, 0.0]])
    torch.testing.assert_close(layer.weight.detach(), frozen_values, rtol=0, atol=0)  # pruned weights zero from now on
    frozen = mask.clone()
    with torch.no_grad():
        layer.weight[0, 3] = 5.0  # even a pruned weight that grew does not come back
    x = torch.tensor([[0.0, 1.0, 0.0, 1.0]])  # and the loss now rewards only pruned weights
    step()
    assert torch.equal(mask, frozen)
    assert layer.weight.grad.tolist() == [[0.0, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(layer.weight.detach(), frozen_values, rtol=0, atol=0)


def test_masks_refresh_on_the_ramp_schedule_and_its_grid_until_exploration_ends():
    # 5 epochs x 4 steps, exploration 0.8 = steps 1-16, ramp 0.25 of it = steps 1-4, every 3 steps
    method, _ = started(MAPOptions(sparsity=0.5, exploration=0.8, ramp=0.25, every=3, keep_ends=False), small_net(),
                        epochs=5, steps_per_epoch=4)
    assert (method.ramp_end, method.exploration_end) == (4, 16)
    assert [step for step in range(1, 21) if method.refreshes(step)] == [3, 4, 6, 9, 12, 15, 16]
    assert method.pruning.schedule.sparsity(2) < 0.5 == method.pruning.schedule.sparsity(4)


def test_finalize_folds_the_attention_and_equals_the_evaluation_forward():
    torch.manual_seed(0)
    model = BCResNetMod(width=8, num_classes=4, dropout=0.0)
    method, stub = started(MAPOptions(sparsity=0.6, exploration=0.5, ramp=0.5, every=1), model)
    method.on_phase_start(stub, method.phases()[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(8, *SHAPE), torch.arange(8) % 4
    for _ in range(3):
        model.train()
        optimizer.zero_grad()
        F.cross_entropy(method.forward(stub, model, x)["logits"], y).backward()
        optimizer.step()
        stub.step += 1
        method.after_step(stub)
    assert stub.step > method.ramp_end  # final sparsity reached
    selected = LayerSelection().select(model)
    assert set(method.layers) == set(selected) and "head.0" not in method.layers and "classifier" not in method.layers
    model.eval()
    x_test = torch.randn(6, *SHAPE)
    with torch.no_grad():
        simulated = method.eval_forward(stub, model, x_test)
        final = method.finalize(model)
        torch.testing.assert_close(final(x_test), simulated, rtol=0, atol=1e-6)
    modules = dict(final.named_modules())
    for name, module in method.layers.items():
        w, mask = module.weight.detach(), module.get_buffer(MASK)
        torch.testing.assert_close(modules[name].weight, w * (w.abs() / w.abs().max()) * mask, rtol=0, atol=0)
        assert MASK not in dict(modules[name].named_buffers())
    total = sum(m.weight.numel() for m in method.layers.values())
    assert sparsity_report(final, list(method.layers))["zeros"] == round(0.6 * total)
    assert MASK in dict(model.get_submodule(next(iter(method.layers))).named_buffers())  # training model untouched
    twin = method.unwrap(model)  # the stage's float twin carries the folded weights too
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), final.state_dict().values()))


def test_float_twin_with_qkd_holds_the_finalized_weights_attention_included():
    """QKD's unwrap hands MAP a folded copy: the twin (the int8 export's source) must still be Q(W · a · m)."""
    torch.manual_seed(0)
    model = BCResNetMod(width=8, num_classes=4, dropout=0.0)
    methods = [MAP(MAPOptions(sparsity=0.6, exploration=0.5, ramp=0.0)),
               QKD(QKDOptions(bits=4), BCResNetMod(width=8, num_classes=4, dropout=0.0))]
    assert [type(method) for method in methods] == compose(["qkd", "map"])  # the stage's pipeline order
    for method in methods:
        model = method.wrap_model(model)
    stub = stub_trainer()
    stub.model, stub.hooks = model, methods
    methods[0].setup(stub)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(8, *SHAPE), torch.arange(8) % 4
    for _ in range(2):  # the first step initializes the activation quantizers
        optimizer.zero_grad()
        F.cross_entropy(methods[0].forward(stub, model, x)["logits"], y).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        twin = float_twin(stub, methods)
        final = Trainer.finalized_model(stub)
        for name in methods[0].layers:
            torch.testing.assert_close(twin.get_submodule(name).weight, final.get_submodule(name).weight,
                                       rtol=0, atol=0)
        for module in final.modules():  # the twin is the float network: compare without activation quant
            if hasattr(module, "input_quant"):
                module.input_quant = nn.Identity()
        x_test = torch.randn(6, *SHAPE)
        torch.testing.assert_close(twin(x_test), final(x_test), rtol=0, atol=1e-5)


def test_map_owns_its_masks_and_names_bad_options():
    context = StageContext(Path("unused"), SHAPE, 4)
    with pytest.raises(ConfigError, match="^methods prune and map both do pruning masks; drop one$"):
        build_methods(["prune", "map"], {}, context)
    with pytest.raises(ConfigError, match="^methods map and pqk both do pruning masks; drop one$"):
        build_methods(["map", "pqk"], {}, context)
    with pytest.raises(ConfigError, match="map.sparsity"):
        build_methods(["map"], {"map": {"sparsity": 1.0}}, context)
    with pytest.raises(ConfigError, match="map.sparsit"):
        build_methods(["map"], {"map": {"sparsit": 0.5}}, context)
    (method,) = build_methods(["map"], {"map": {"sparsity": 0.5, "exploration": 0.5, "every": 4,
                                                                    "keep_ends": False}}, context)
    assert method.settings() == {"sparsity": 0.5, "exploration": 0.5, "ramp": 1.0, "every": 4, "scope": "global",
                                 "include": None, "exclude": None, "depthwise": True, "keep_ends": False}
    model = small_net()
    method.wrap_model(model)
    with pytest.raises(ConfigError, match="already carry pruning masks"):
        MAP(MAPOptions(keep_ends=False)).wrap_model(model)


# ------------------------------------------------------------------------------- the stage end to end


@pytest.fixture(scope="module")
def source_run(tiny_overrides, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("map") / "base"
    train_or_resume(load_config(RunConfig, None, tiny_overrides(epochs=1)), run, progress=False)
    return run


@pytest.mark.slow
def test_map_stage_reaches_the_sparsity_and_writes_a_finalized_run(source_run: Path):
    out = source_run.with_name("map")
    overrides = ["train.epochs=2", "optim.lr=0.01", "map.sparsity=0.5", "map.exploration=0.5", "map.every=2"]
    assert compress_run(source_run, out, ["map"], overrides, progress=False) == "compressed"
    assert (out / FINALIZED_NAME).is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["precision"] == "fp32"
    assert [h["phases"]["map"] for h in report["history"]] == [EXPLORATION, EXPLOITATION]
    source, _ = load_run_model(source_run)
    prunable = list(LayerSelection().select(source))
    total = sum(source.get_submodule(name).weight.numel() for name in prunable)
    twin, _ = load_run_model(out, "float")
    assert sparsity_report(twin, prunable)["zeros"] == round(0.5 * total)
    assert report["complexity"]["nonzero_params"] == report["complexity"]["params"] - round(0.5 * total)
    # the deployed module is what the last epoch evaluated (the attention is folded, not dropped)
    assert report["metrics"]["accuracy"] == report["simulated_accuracy"]
    finalized, _ = load_run_model(out)
    meta = load_checkpoint(out / "checkpoints" / "float.pt")
    x = torch.randn(3, 1, 32, FeatureConfig.from_dict(meta["features"]).num_frames(meta["num_samples"]))
    with torch.no_grad():
        torch.testing.assert_close(finalized(x), twin(x), rtol=1e-5, atol=1e-5)
    assert evaluate_run(out, progress=False).accuracy == pytest.approx(report["metrics"]["accuracy"], abs=1e-9)
    assert "map" in (out / "compress.yaml").read_text()
    assert compress_run(source_run, out, ["map"], overrides, progress=False) == "finished"


@pytest.mark.slow
def test_map_composes_with_int8_qat_and_distillation(source_run: Path):
    """The QAT graph shares MAP's weights: MAP's forward and finalize find them by identity."""
    out = source_run.with_name("map-qat-kd")
    assert compress_run(source_run, out, ["kd", "qat", "map"],
                        ["train.epochs=2", "train.batch_size=16", "map.sparsity=0.5", "map.exploration=0.5",
                         "map.every=2", "qat.freeze_bn_epochs=0", "qat.freeze_observer_epochs=1"],
                        progress=False) == "compressed"
    report = json.loads((out / "report.json").read_text())
    assert report["precision"] == "int8"
    source, _ = load_run_model(source_run)
    prunable = sum(layer.weight.numel() for layer in LayerSelection().select(source).values())
    size = report["complexity"]
    assert size["nonzero_params"] <= size["params"] - round(0.5 * prunable)  # int8 rounding only adds zeros


# 4 steps per epoch: exploration = steps 1-8 (ramp to 60 % by step 4, refreshes after steps 3, 4, 6, 8)
MAP_RUN = ["train.epochs=3", "train.batch_size=16", "optim.lr=0.01", "map.sparsity=0.6", "map.exploration=0.67",
           "map.ramp=0.5", "map.every=3"]


@pytest.mark.slow
def test_map_killed_mid_exploration_resumes_to_the_same_weights(source_run: Path, monkeypatch):
    """Phases: exploration = epochs 0-1, exploitation = epoch 2; the stop comes after epoch 1 (mid exploration)."""
    run = kill_and_resume(source_run, ["map"], MAP_RUN, 1, monkeypatch, "map")
    a, b = run.straight_state, run.resumed_state
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["hooks"][0]["pruning"]["masks"], b["hooks"][0]["pruning"]["masks"])
    assert [h["phases"]["map"] for h in b["history"]] == [EXPLORATION, EXPLORATION, EXPLOITATION]
    assert [h["losses"] for h in b["history"]] == [h["losses"] for h in a["history"]]
    twin_a, twin_b = load_run_model(run.straight, "float")[0], load_run_model(run.stopped, "float")[0]
    assert parameter_digest(twin_a) == parameter_digest(twin_b)  # the finalized weights, bit for bit
