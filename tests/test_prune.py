"""Pruning building blocks: cubic schedule, magnitude masks as a training hook, channel removal."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asc.compress.prune import (
    MASK,
    LayerSelection,
    MagnitudePruning,
    PruningSchedule,
    cubic_sparsity,
    magnitude_masks,
    masked_modules,
    materialize_masks,
    prune_channels,
    sparsity_report,
)
from asc.config import RunConfig, load_config
from asc.errors import ConfigError
from asc.models.resize import channel_spec, rebuild_pruned
from asc.models import BCResBlock, BCResNet, BCResNetMod, SubSpectralNorm, build_model
from asc.train.checkpoint import load_checkpoint
from asc.train.loop import Trainer


@pytest.fixture(autouse=True)
def one_thread():
    """The test machine is shared; one thread also makes the float results reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(seed: int = 0) -> BCResNetMod:
    torch.manual_seed(seed)
    return BCResNetMod(width=8, dropout=0.0)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(4, 1, 32, 40, generator=generator), torch.randint(0, 10, (4,), generator=generator)


def train(model: nn.Module, hook: MagnitudePruning, optimizer: torch.optim.Optimizer, trainer: SimpleNamespace,
          steps: int, on_step=None) -> None:
    """The order of calls in asc.train.loop.Trainer._train_step."""
    model.train()
    for _ in range(steps):
        x, y = batch(trainer.step)
        outputs = hook.forward(trainer, model, x) or {"logits": model(x)}
        loss = F.cross_entropy(outputs["logits"], y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        hook.after_backward(trainer)
        optimizer.step()
        trainer.step += 1
        hook.after_step(trainer)
        if on_step is not None:
            on_step(trainer.step)


def start(hook: MagnitudePruning, model: nn.Module) -> SimpleNamespace:
    hook.wrap_model(model)
    trainer = SimpleNamespace(step=0)
    hook.setup(trainer)
    return trainer


# ------------------------------------------------------------------------------ schedule


def test_cubic_sparsity_follows_the_formula():
    assert cubic_sparsity(0, 0, 100, 0.8) == 0.0
    assert cubic_sparsity(50, 0, 100, 0.8) == pytest.approx(0.8 - 0.8 * 0.5**3)  # 0.7
    assert cubic_sparsity(25, 0, 100, 0.8) == pytest.approx(0.8 - 0.8 * 0.75**3)
    assert cubic_sparsity(100, 0, 100, 0.8) == pytest.approx(0.8)
    assert cubic_sparsity(500, 0, 100, 0.8) == pytest.approx(0.8)
    # s_t = s_f + (s_i - s_f)(1 - t)^3 with an initial sparsity and a late start
    assert cubic_sparsity(60, 10, 110, 0.8, 0.2) == pytest.approx(0.8 - 0.6 * 0.125)  # 0.725
    assert cubic_sparsity(5, 10, 110, 0.8, 0.2) == pytest.approx(0.2)
    assert cubic_sparsity(9, 10, 10, 0.5) == 0.0 and cubic_sparsity(10, 10, 10, 0.5) == 0.5  # one-shot


def test_schedule_refreshes_every_k_steps_until_the_end_then_freezes():
    schedule = PruningSchedule(final_sparsity=0.5, start_step=8, end_step=42, every=16)
    assert [s for s in range(100) if schedule.refreshes(s)] == [8, 24, 40, 42]
    assert schedule.sparsity(42) == pytest.approx(0.5) and schedule.sparsity(7) == 0.0
    for bad in ({"final_sparsity": 1.0, "end_step": 10}, {"final_sparsity": 0.5, "end_step": 10, "start_step": 11},
                {"final_sparsity": 0.5, "end_step": 10, "every": 0},
                {"final_sparsity": 0.3, "end_step": 10, "initial_sparsity": 0.4}):
        with pytest.raises(ConfigError):
            PruningSchedule(**bad)


# ------------------------------------------------------------------------------ selection and ranking


def test_selection_skips_stem_and_classifier_and_honours_options():
    model = small_model()
    names = set(LayerSelection().select(model))
    assert "head.0" not in names and "classifier" not in names
    assert "stages.0.0.freq_conv.0" in names and "stages.3.2.pointwise" in names
    assert len(names) == 9 * 3 + 4  # 9 blocks x (freq, time, pointwise) + 4 transition convs
    no_dw = set(LayerSelection(depthwise=False).select(model))
    assert no_dw == {n for n in names if "freq_conv" not in n and "time_conv" not in n}
    assert set(LayerSelection(include=r"pointwise", exclude=r"^stages\.0").select(model)) == {
        f"stages.{s}.{b}.pointwise" for s, blocks in enumerate((2, 2, 2, 3)) for b in range(blocks) if s > 0}
    assert "head.0" in LayerSelection(keep_ends=False).select(model)
    with pytest.raises(ConfigError, match="valid regular expression"):
        LayerSelection(include="(").select(model)
    with pytest.raises(ConfigError, match="matches no layer"):
        LayerSelection(include="nothing-like-this").select(model)


@pytest.mark.parametrize("sparsity", [0.3, 0.77])
def test_global_and_per_layer_masks_hit_the_target_to_one_weight(sparsity):
    model = small_model()
    weights = {name: m.weight.detach() for name, m in LayerSelection().select(model).items()}
    total = sum(w.numel() for w in weights.values())

    masks = magnitude_masks(weights, sparsity, "global")
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned == round(sparsity * total)
    assert abs(pruned - sparsity * total) <= 0.5
    # one threshold: every pruned weight is no larger than every kept weight
    pairs = [(w.abs(), masks[name]) for name, w in weights.items()]
    kept_min = min(float(w[m].min()) for w, m in pairs)
    pruned_max = max(float(w[~m].max()) for w, m in pairs if (~m).any())
    assert pruned_max <= kept_min

    per_layer = magnitude_masks(weights, sparsity, "layer")
    for name, mask in per_layer.items():
        assert int((~mask).sum()) == round(sparsity * weights[name].numel())
    # global ranking does not spread evenly: layers end up with different sparsities
    global_rates = [float((~m).float().mean()) for m in masks.values()]
    assert max(global_rates) - min(global_rates) > 0.2


# ------------------------------------------------------------------------------ the hook in training


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
], ids=["sgd-momentum", "adamw"])
def test_pruned_weights_stay_exactly_zero_through_optimizer_steps(make_optimizer):
    model = small_model()
    hook = MagnitudePruning(PruningSchedule(final_sparsity=0.6, start_step=0, end_step=6, every=2))
    trainer = start(hook, model)
    optimizer = make_optimizer(model.parameters())

    def check(step):
        for name, mask in hook.masks.items():
            weight = model.get_parameter(name)
            assert torch.count_nonzero(weight[~mask]) == 0, f"step {step}: {name} has revived weights"
            if step > 6:  # masks frozen: the last backward was masked with these very masks
                assert torch.count_nonzero(weight.grad[~mask]) == 0, f"step {step}: {name} has gradients"

    train(model, hook, optimizer, trainer, 12, on_step=check)
    layers = list(hook.layers)
    report = sparsity_report(model, layers)
    assert report["zeros"] == round(0.6 * report["total"])
    # the optimizer state would have moved the pruned weights: the re-zeroing was needed
    moving = [optimizer.state[model.get_parameter(n)].get("momentum_buffer", optimizer.state[
        model.get_parameter(n)].get("exp_avg"))[~m] for n, m in hook.masks.items()]
    assert any(torch.count_nonzero(v) > 0 for v in moving)


def test_masks_refresh_only_on_schedule_and_freeze_after_the_end():
    model = small_model()
    schedule = PruningSchedule(final_sparsity=0.5, initial_sparsity=0.1, start_step=4, end_step=20, every=4)
    hook = MagnitudePruning(schedule, keep_pruned_values=True)
    trainer = start(hook, model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    total = sum(m.numel() for m in hook.masks.values())
    history = {0: {k: v.clone() for k, v in hook.masks.items()}}
    train(model, hook, optimizer, trainer, 30,
          on_step=lambda step: history.__setitem__(step, {k: v.clone() for k, v in hook.masks.items()}))

    changed = [s for s in range(1, 31) if any(not torch.equal(history[s][k], history[s - 1][k]) for k in history[s])]
    assert changed == [4, 8, 12, 16, 20]
    assert all(bool(m.all()) for s in range(4) for m in history[s].values())
    for step in range(31):
        last = max([s for s in changed if s <= step], default=None)
        expected = 0 if last is None else round(schedule.sparsity(last) * total)
        assert sum(int((~m).sum()) for m in history[step].values()) == expected
    # kept values moved after the end: re-ranking them now would give other masks, yet none came
    weights = {name[: -len(".weight")]: model.get_parameter(name) for name in hook.masks}
    fresh = magnitude_masks(weights, 0.5, "global")
    assert any(not torch.equal(fresh[k[: -len(".weight")]], m) for k, m in hook.masks.items())


def test_hook_state_alone_restores_the_masks():
    """A wrapper (the QAT graph) drops the mask buffers from the model's state, so the hook carries them."""
    schedule = PruningSchedule(final_sparsity=0.6, start_step=0, end_step=6, every=2)
    model, hook = small_model(), MagnitudePruning(schedule)
    trainer = start(hook, model)
    train(model, hook, torch.optim.SGD(model.parameters(), lr=0.1), trainer, 8)
    restored = MagnitudePruning(schedule)
    start(restored, small_model(1))
    assert all(bool(mask.all()) for mask in restored.masks.values())
    restored.load_state_dict(hook.state_dict())
    for (name, mask), again in zip(hook.masks.items(), restored.masks.values(), strict=True):
        assert torch.equal(mask, again) and not bool(mask.all()), name


def test_resume_from_state_dicts_reproduces_masks_and_weights():
    def fresh():
        model = small_model()
        hook = MagnitudePruning(PruningSchedule(final_sparsity=0.7, start_step=2, end_step=18, every=3),
                                scope="layer")
        trainer = start(hook, model)
        return model, hook, trainer, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)

    model, hook, trainer, optimizer = fresh()
    train(model, hook, optimizer, trainer, 24)

    model_a, hook_a, trainer_a, optimizer_a = fresh()
    train(model_a, hook_a, optimizer_a, trainer_a, 10)
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "optimizer": optimizer_a.state_dict(), "hook": hook_a.state_dict(),
                "step": trainer_a.step}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert sum(MASK in key for key in state["model"]) == len(hook_a.layers)  # masks travel with the model

    model_b, hook_b, trainer_b, optimizer_b = fresh()
    model_b.load_state_dict(state["model"])
    optimizer_b.load_state_dict(state["optimizer"])
    hook_b.load_state_dict(state["hook"])
    trainer_b.step = state["step"]
    train(model_b, hook_b, optimizer_b, trainer_b, 14)

    for (name, mask), resumed in zip(hook.masks.items(), hook_b.masks.values(), strict=True):
        assert torch.equal(mask, resumed), name
    for (name, p), q in zip(model.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name

    other = MagnitudePruning(PruningSchedule(final_sparsity=0.5, start_step=2, end_step=18, every=3), scope="layer")
    other.wrap_model(small_model())
    with pytest.raises(ConfigError, match="schedule"):
        other.load_state_dict(state["hook"])


def test_finalize_bakes_masks_into_a_plain_module_with_the_same_outputs():
    model = small_model()
    hook = MagnitudePruning(PruningSchedule(final_sparsity=0.5, start_step=0, end_step=8, every=4))
    trainer = start(hook, model)
    train(model, hook, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), trainer, 10)
    model.eval()
    final = hook.finalize(model).eval()

    assert not any(MASK in name for name, _ in final.named_buffers())
    assert len(masked_modules(model)) == len(hook.layers)  # the training model keeps its masks
    report = sparsity_report(final, list(hook.layers))
    assert report["zeros"] == round(0.5 * report["total"])
    assert sparsity_report(final)["sparsity"] < report["sparsity"]  # stem and classifier stayed dense
    x = torch.randn(3, 1, 32, 40)
    with torch.no_grad():
        assert torch.equal(final(x), model(x))
    exported = torch.export.export(final, (x,))
    assert not any(MASK in name for name in exported.state_dict)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), final(x))


def test_keep_pruned_values_masks_the_forward_and_keeps_the_stored_weights():
    model = small_model()
    hook = MagnitudePruning(PruningSchedule(final_sparsity=0.6, start_step=0, end_step=4, every=2),
                            keep_pruned_values=True)
    trainer = start(hook, model)
    train(model, hook, torch.optim.AdamW(model.parameters(), lr=1e-2), trainer, 6)
    hidden = [model.get_parameter(n)[~m] for n, m in hook.masks.items()]
    assert sum(int(torch.count_nonzero(v)) for v in hidden) == sum(v.numel() for v in hidden)  # values kept

    model.eval()
    final = hook.finalize(model).eval()
    x = torch.randn(2, 1, 32, 40)
    with torch.no_grad():
        masked, dense, baked = hook.eval_forward(trainer, model, x), model(x), final(x)
    torch.testing.assert_close(masked, baked, rtol=0, atol=1e-6)
    assert (dense - baked).abs().max() > 1e-3  # the stored dense network is a different one
    total = sum(v.numel() for v in hook.masks.values())
    assert sparsity_report(final, list(hook.layers))["zeros"] == round(0.6 * total)


@pytest.mark.slow
def test_magnitude_pruning_in_the_training_loop(tmp_path):
    config = load_config(RunConfig, None, [
        "data.synth_preset=tiny", f"data.synth_dir={tmp_path / 'corpus'}", f"data.cache_dir={tmp_path / 'cache'}",
        "features.sample_rate=16000", "features.n_fft=512", "features.hop_length=256", "features.n_mels=32",
        "model.args.width=8", "train.epochs=2", "train.batch_size=8", "optim.lr=0.05"])
    schedule = PruningSchedule(final_sparsity=0.7, start_step=2, end_step=10, every=4)
    hook = MagnitudePruning(schedule)
    trainer = Trainer(config, tmp_path / "run", hooks=[hook], progress=False)
    trainer.fit()
    assert trainer.step > schedule.end_step

    # the checkpoint (weights_only) carries the masks; a fresh model + hook restores and finalizes it
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    model = build_model("bcresnet_mod", len(state["labels"]), **state["model_spec"]["args"])
    restored = MagnitudePruning(schedule)
    restored.wrap_model(model)
    model.load_state_dict(state["model"])
    restored.load_state_dict(state["hooks"][0])
    report = sparsity_report(restored.finalize(model), list(restored.layers))
    assert report["zeros"] == round(0.7 * report["total"])


def test_one_owner_per_mask():
    model = small_model()
    MagnitudePruning(PruningSchedule(final_sparsity=0.5, end_step=10)).wrap_model(model)
    with pytest.raises(ConfigError, match="already carry pruning masks"):
        MagnitudePruning(PruningSchedule(final_sparsity=0.5, end_step=10)).wrap_model(model)
    with pytest.raises(ConfigError, match="materialize_masks"):
        prune_channels(model, torch.randn(1, 1, 32, 40), 0.5)
    assert prune_channels(materialize_masks(model), torch.randn(1, 1, 32, 40), 0.5) is not model


# ------------------------------------------------------------------------------ structured pruning


@pytest.fixture(scope="module")
def half_pruned():
    torch.manual_seed(0)
    model = BCResNetMod(width=16).eval()
    with torch.no_grad():  # distinct SSN statistics, to follow which channels survive
        for module in model.modules():
            if isinstance(module, SubSpectralNorm):
                module.bn.running_mean.copy_(torch.arange(module.bn.num_features, dtype=torch.float32))
    pruned = prune_channels(model, torch.randn(1, 1, 256, 87), 0.5)
    return model, pruned


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_prune_channels_halves_bcresnet_mod_channels(half_pruned):
    model, pruned = half_pruned
    assert count(model) == 17_178  # the original is untouched
    assert count(pruned) == 5_162  # 3.3x fewer: the stem and classifier rows are kept
    assert pruned.head[0].out_channels == 32 and pruned.classifier.out_channels == 10
    widths = [stage[0].freq_conv[0].out_channels for stage in pruned.stages]
    assert widths == [8, 8, 16, 16]  # 16, 24, 32, 40 halved and rounded down to multiples of 8
    x = torch.randn(2, 1, 256, 87)
    with torch.no_grad():
        before, after = model(x), pruned(x)
    assert after.shape == (2, 10) and torch.isfinite(after).all()
    assert (after - before).abs().max() > 1e-3


def test_subspectral_norm_keeps_its_sub_bands_of_the_surviving_channels(half_pruned):
    model, pruned = half_pruned
    original = dict(model.named_modules())
    for name, module in pruned.named_modules():
        if not isinstance(module, BCResBlock):
            continue
        conv, ssn = module.freq_conv[0], module.freq_conv[1]
        c, bands = conv.out_channels, ssn.sub_bands
        assert conv.groups == c == module.time_conv[0].groups == module.pointwise.in_channels
        assert ssn.bn.num_features == c * bands
        # which original channels survived: match the depthwise filters
        source = original[name].freq_conv[0].weight.flatten(1)
        kept = [int((source - row).abs().sum(1).argmin()) for row in conv.weight.flatten(1)]
        expected = [k * bands + b for k in kept for b in range(bands)]
        assert ssn.bn.running_mean.tolist() == expected, name



def test_rebuild_from_spec_and_state_dict_gives_identical_outputs(half_pruned):
    _, pruned = half_pruned
    buffer = io.BytesIO()
    torch.save({"spec": channel_spec(pruned), "model": pruned.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    rebuilt = rebuild_pruned(lambda: BCResNetMod(width=16), saved["spec"], saved["model"]).eval()
    assert channel_spec(rebuilt) == channel_spec(pruned) and count(rebuilt) == count(pruned)
    x = torch.randn(2, 1, 256, 87)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), pruned(x))
    with pytest.raises(ConfigError, match="channel spec"):
        rebuild_pruned(lambda: BCResNet(width=1), saved["spec"], saved["model"])


def onnx_bytes(model: nn.Module, x: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
    return buffer.getvalue()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_pruned_model_exports_to_onnx_and_matches_onnxruntime(half_pruned):
    model, pruned = half_pruned
    x = torch.randn(2, 1, 256, 87)
    dense, small = onnx_bytes(model, x), onnx_bytes(pruned, x)
    assert len(small) < 0.7 * len(dense)  # 81.6 KB vs 126 KB at width 16
    session = ort.InferenceSession(small, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        expected = pruned(x).numpy()
    assert np.abs(logits - expected).max() < 1e-4


def test_prune_channels_options():
    torch.manual_seed(1)
    model = BCResNetMod(width=16).eval()
    x = torch.randn(1, 1, 64, 40)
    fine = prune_channels(model, x, 0.5, round_to=4)
    assert [s[0].freq_conv[0].out_channels for s in fine.stages] == [8, 12, 16, 20]
    ranked = prune_channels(model, x, 0.5, round_to=None, global_pruning=True)
    assert count(ranked) < count(model)
    kept_stem = prune_channels(model, x, 0.5, ignored_layers=["classifier"])
    assert kept_stem.head[0].out_channels == 16
    model.train()
    copy = prune_channels(model, x, 0.25)  # traced in eval mode: BN statistics untouched
    assert copy.training and torch.equal(copy.head[1].running_mean, model.head[1].running_mean)
    kws = prune_channels(BCResNet(width=1).eval(), torch.randn(1, 1, 40, 101), 0.5)
    assert kws(torch.randn(1, 1, 40, 101)).shape == (1, 12) and count(kws) < 9_232
    with pytest.raises(ConfigError, match="ratio"):
        prune_channels(model, x, 1.0)
    with pytest.raises(ConfigError, match="ignored_layers"):
        prune_channels(model, x, 0.5, ignored_layers=["stem"])
