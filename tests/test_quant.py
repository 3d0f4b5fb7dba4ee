"""Int8 QAT with torchao PT2E: training through the prepared graph, freezing, resume, int8 QDQ ONNX.

A width-8 BC-ResNet-Mod learns four noise textures (temporally smooth, alternating, white,
smooth across frequency) that survive its per-clip frequency-wise norms, so the logits have real
margins when the ONNX file is compared with torch.
"""

from __future__ import annotations

import copy
import io
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from asc.compress.pqk import PQKOptions
from asc.compress.quant import (
    Int8QAT,
    QATConfig,
    QATModel,
    _graph_tensor,
    convert_qat,
    float_scopes,
    int8_conv_weights,
    prepare_qat,
)
from asc.errors import AscError, ConfigError
from asc.export.onnx import export_onnx, run_onnx, save_onnx
from asc.export.precision import rewrite_for_int8
from asc.export.verify import fusion_census
from asc.models import BCResBlock, BCResNetMod

SHAPE = (1, 32, 40)
STEPS = 40  # long enough to converge before BN freezes, with 7-bit weights too
BN_FROZEN_AT, OBSERVERS_FROZEN_AT = STEPS - 4, STEPS - 2


def textures(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes of noise that differ in local correlation, not in per-bin level or spread."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randn(n, *SHAPE, generator=g)
    box = torch.ones(1, 1, 1, 5) / 5**0.5
    smooth_t = F.conv2d(x, box, padding=(0, 2))
    alternating = smooth_t * (-1.0) ** torch.arange(SHAPE[2])
    smooth_f = F.conv2d(x, box.transpose(2, 3), padding=(2, 0))
    pick = lambda k: (y == k).view(-1, 1, 1, 1)
    return torch.where(pick(0), smooth_t, torch.where(pick(1), alternating, torch.where(pick(3), smooth_f, x))), y


def bn_stats(model: nn.Module) -> torch.Tensor:
    """Every BN running statistic (by name: in the exported graph BNs are no longer BatchNorm2d)."""
    stats = [t.flatten() for k, t in model.state_dict().items() if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 2 * 23
    return torch.cat(stats).clone()


def scales(qat: QATModel) -> torch.Tensor:
    return torch.cat([q.scale.flatten() for q in qat.fake_quantizers()]).clone()


@pytest.fixture(scope="module")
def trained() -> SimpleNamespace:
    """QAT from scratch, with BN frozen for the last 4 steps and the ranges for the last 2."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = BCResNetMod(width=8, num_classes=4)
    hook = Int8QAT(SHAPE, QATConfig(freeze_bn_epochs=2, freeze_observer_epochs=1))
    qat = hook.wrap_model(model)
    x, y = textures(64, seed=0)
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.05, momentum=0.9)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / STEPS)))
    qat.train()
    losses, snapshots = [], {}
    for step in range(STEPS):
        if step in (BN_FROZEN_AT, OBSERVERS_FROZEN_AT):
            qat.freeze(bn=True, observers=step == OBSERVERS_FROZEN_AT)
            snapshots[step] = (bn_stats(model), scales(qat))
        loss = F.cross_entropy(qat(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    snapshots[STEPS] = (bn_stats(model), scales(qat))
    return SimpleNamespace(model=model, hook=hook, qat=qat, optimizer=optimizer, losses=losses, snapshots=snapshots,
                           x=x, y=y, x_test=textures(64, seed=1)[0], quantizers=len(qat.fake_quantizers()))


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="freeze_bn_epochs"):
        QATConfig(freeze_bn_epochs=-1)
    with pytest.raises(ConfigError, match="activation_averaging"):
        QATConfig(activation_averaging=0.0)
    with pytest.raises(ConfigError, match="input_shape"):
        Int8QAT((32, 40))  # type: ignore[arg-type]
    assert [QATConfig(freeze_bn_epochs=2, freeze_observer_epochs=1).phase(e, 5) for e in range(5)] == [
        (False, False), (False, False), (False, False), (True, False), (True, True)]


def test_defaults_freeze_batch_norm_only_in_the_last_epoch():
    """Frozen BN halfway through a 4-epoch cosine run (lr 0.01) made every QAT + distillation
    composition diverge within a few steps; frozen in the last epoch they trained normally
    (docs/results-compression.md). PQK's own freeze options follow QAT's defaults."""
    assert [QATConfig().phase(e, 4) for e in range(4)] == [(False, False)] * 3 + [(True, True)]
    assert (PQKOptions().freeze_bn_epochs, PQKOptions().freeze_observer_epochs) == (1, 1)


def test_hook_refuses_a_model_it_did_not_wrap():
    with pytest.raises(AscError, match="QATModel"):
        Int8QAT(SHAPE).finalize(nn.Conv2d(1, 1, 1))


def test_model_without_convs_is_a_config_error():
    with pytest.raises(ConfigError, match="no Conv2d"):
        prepare_qat(nn.Sequential(nn.Flatten(), nn.Linear(32 * 40, 4)), SHAPE)


def test_qat_trains_the_float_models_parameters(trained):
    # the optimizer the loop builds from the wrapped model holds the float model's own tensors
    assert {id(p) for p in trained.qat.parameters()} == {id(p) for p in trained.model.parameters()}
    assert trained.losses[0] == pytest.approx(np.log(4), abs=0.1)
    assert min(trained.losses[:BN_FROZEN_AT]) < 0.3 * trained.losses[0]
    # running statistics lag 36 fast steps, so freezing BN costs loss; training then recovers it (how
    # far depends on the CPU's float kernels: fake-quant rounding amplifies 1e-7 differences)
    assert trained.losses[-1] < trained.losses[BN_FROZEN_AT]
    trained.qat.eval()
    with torch.no_grad():
        accuracy = (trained.qat(trained.x).argmax(1) == trained.y).float().mean().item()
    assert accuracy >= 0.7


def test_every_conv_is_fake_quantized_with_uint8_activations(trained):
    quantizers = trained.qat.fake_quantizers()
    weights = [q for q in quantizers if q.qscheme == torch.per_channel_symmetric]
    activations = [q for q in quantizers if q.qscheme == torch.per_tensor_affine]
    convs = [m for m in trained.model.modules() if isinstance(m, nn.Conv2d)]
    assert len(weights) == len(convs) == 33
    assert all((q.quant_min, q.quant_max, q.dtype) == (-64, 64, torch.int8) for q in weights)  # 7 bits: AVX2-safe
    assert all((q.quant_min, q.quant_max, q.dtype) == (0, 255, torch.uint8) for q in activations)
    assert len(weights) + len(activations) == len(quantizers)


def test_subband_norms_are_quantized_after_the_norm_not_before(trained):
    """A depthwise conv followed by a sub-spectral norm has no quantizer in between: the pair exports as
    int8 band convs. The norm's output quantizer is the one both the mean over frequency and the
    residual add read, so the mean averages exactly the values the int8 graph holds."""
    graph = trained.qat.prepared.graph
    norms = [n for n in graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)
             and n.args[0].op == "call_function" and "reshape" in str(n.args[0].target)]
    assert len(norms) == 9  # one per block
    for norm in norms:
        conv = norm.args[0].args[0]
        assert "conv2d" in str(conv.target) and list(conv.users) == [norm.args[0]]
        (back,) = norm.users
        (quantizer,) = back.users
        assert "activation_post_process" in str(quantizer.target)
        # one quantizer for both readers: the add shares it instead of observing the edge again
        assert sorted(str(user.target) for user in quantizer.users) == ["aten.add.Tensor", "aten.mean.dim"]


def test_frequency_norms_stay_float(trained):
    """No fake-quant sits inside a FreqNorm: any that reads a norm node feeds only code outside it."""
    scopes = float_scopes(trained.model)
    assert scopes == {"input_norm", "stages.0.2", "stages.1.2", "stages.2.2", "stages.3.3"}
    graph = trained.qat.prepared.graph

    def scope(node):
        return {path for path, _ in node.meta.get("nn_module_stack", {}).values()} & scopes

    readers = [n for n in graph.nodes if n.op == "call_module" and "activation_post_process" in str(n.target)]
    boundary = [n for n in readers if scope(n.args[0])]
    assert len(boundary) == 3  # the norms followed by a conv; the other two feed a float max-pool
    for node in boundary:
        assert all(not scope(user) for user in node.users)


def test_freezing_fixes_bn_statistics_then_ranges(trained):
    (bn_a, scales_a), (bn_b, scales_b), (bn_c, scales_c) = (trained.snapshots[k] for k in
                                                           (BN_FROZEN_AT, OBSERVERS_FROZEN_AT, STEPS))
    assert torch.equal(bn_a, bn_b) and torch.equal(bn_b, bn_c)
    assert not torch.equal(scales_a, scales_b)  # ranges still moved while only BN was frozen
    assert torch.equal(scales_b, scales_c)


def test_train_and_eval_switch_dropout_bn_and_observers(trained):
    qat, hook = trained.qat, trained.hook
    nodes = list(qat.prepared.graph.nodes)
    bns = [n for n in nodes if n.target == torch.ops.aten.batch_norm.default]
    drops = [n for n in nodes if n.target == torch.ops.aten.feature_dropout.default]
    assert len(bns) == 23 and len(drops) == 9

    def flags():
        return ({n.args[5] for n in bns}, {n.args[2] for n in drops},
                {int(q.observer_enabled) for q in qat.fake_quantizers()})

    trainer = SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(epochs=5)))
    qat.train()
    hook.on_epoch_start(trainer, 2)
    assert flags() == ({True}, {True}, {1})
    hook.on_epoch_start(trainer, 3)
    assert flags() == ({False}, {True}, {1})
    qat.eval()
    assert flags() == ({False}, {False}, {0})
    before = scales(qat)
    with torch.no_grad():
        first, second = qat(trained.x_test), hook.eval_forward(trainer, qat, trained.x_test)
    assert torch.equal(first, second) and torch.equal(scales(qat), before)  # evaluation moves no range
    qat.train()
    hook.on_epoch_start(trainer, 4)
    assert flags() == ({False}, {True}, {0})
    assert hook.state_dict() == {"bn_frozen": True, "observers_frozen": True}


@pytest.mark.slow
def test_resume_from_state_dicts_is_exact(trained):
    """A fresh model and hook restored from (model, hook) state dicts continue exactly."""
    buffer = io.BytesIO()
    torch.save({"model": trained.qat.state_dict(), "hook": trained.hook.state_dict(),
                "optimizer": trained.optimizer.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    torch.manual_seed(123)  # a different initialisation: everything must come from the state
    hook = Int8QAT(SHAPE, QATConfig(freeze_bn_epochs=2, freeze_observer_epochs=1))
    resumed = hook.wrap_model(BCResNetMod(width=8, num_classes=4))
    resumed.load_state_dict(state["model"])
    hook.load_state_dict(state["hook"])
    assert (resumed.bn_frozen, resumed.observers_frozen) == (True, True)

    original = copy.deepcopy(trained.qat)
    for model in (original, resumed):
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(resumed(trained.x_test), original(trained.x_test), rtol=0, atol=0)

    # one more step with live observers and BN statistics: identical losses and identical ranges
    results = []
    for model in (original, resumed):
        model.train()
        model.freeze(bn=False, observers=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = 0.01  # the schedule ended at 0
        torch.manual_seed(7)
        loss = F.cross_entropy(model(trained.x), trained.y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        results.append((loss.item(), scales(model), bn_stats(model)))
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][2], results[1][2])
    assert not torch.equal(results[0][1], scales(trained.qat))  # the observers did update


def test_copying_a_qat_model_prints_no_deprecation_from_inside_torch():
    """Checkpoints and conversion deep-copy the exported graph, where torch 2.13 warns from copyreg.

    A fresh process, as a user's command runs: pytest restores the warning filters after collecting,
    so an import-time filter cannot be seen from inside a test.
    """
    script = ("import copy; from asc.compress.quant import Int8QAT, QATConfig; from asc.models import BCResNetMod; "
              "copy.deepcopy(Int8QAT((1, 32, 40), QATConfig()).wrap_model(BCResNetMod(width=8, num_classes=4)))")
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr


# ------------------------------------------------------------------------------ finalize and ONNX


@pytest.fixture(scope="module")
def deployed(trained, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    trained.qat.eval()
    with torch.no_grad():
        reference = trained.qat(trained.x_test)
    finalized = trained.hook.finalize(trained.qat)
    folder = tmp_path_factory.mktemp("quant")
    path = export_onnx(finalized, trained.x_test[:2], folder / "int8.onnx")
    shipped = save_onnx(rewrite_for_int8(onnx.load(str(path)))[0], folder / "shipped.onnx")  # as asc export does
    unsnapped = convert_qat(trained.qat, snap_biases=False)  # what QAT evaluated, torchao's float biases
    return SimpleNamespace(finalized=finalized, path=path, shipped=shipped, reference=reference, unsnapped=unsnapped)


@pytest.mark.slow
def test_converted_graph_computes_exactly_what_qat_evaluated(trained, deployed):
    """Before its biases are snapped, the int8 graph computes the fake-quant simulation, up to
    activations that sit on a rounding boundary: the folded conv and the simulated conv-BN sum in
    another order, and where the float result differs by 1e-7 a uint8 activation may round one
    step apart. How many do depends on the CPU's kernels (4 of 256 logits on an AVX-512 Xeon), so
    the test bounds them, not their number 0."""
    with torch.no_grad():
        finalized = deployed.unsnapped(trained.x_test)
    difference = (finalized - deployed.reference).abs()
    assert (difference <= 1e-5).float().mean() >= 0.95  # nearly every logit to float precision
    assert difference.max() < 0.1  # the rest a few activation steps away, far from a wrong graph
    assert (finalized.argmax(1) == deployed.reference.argmax(1)).float().mean() >= 0.95
    # conversion worked on a copy: the QAT graph still has its fake-quant and could train on
    assert len(trained.qat.fake_quantizers()) == trained.quantizers
    assert not any("quantize_per" in str(n.target) for n in trained.qat.prepared.graph.nodes)


@pytest.mark.slow
def test_deployed_biases_sit_on_the_int32_grid_of_the_integer_kernels(trained, deployed):
    """Each conv bias is moved to round(bias / (input scale x weight scale)) steps, float32 as
    onnxruntime computes it, and by at most half a step; the model's decisions stay those of QAT."""
    unsnapped = deployed.unsnapped
    steps = {}
    for node in deployed.finalized.graph.nodes:
        if node.op == "call_function" and "conv2d" in str(node.target) and len(node.args) > 2 and node.args[2]:
            activation_scale, weight_scales = node.args[0].args[1], node.args[1].args[1].target
            steps[node.args[2].target] = (torch.tensor(activation_scale, dtype=torch.float32)
                                          * deployed.finalized.get_buffer(weight_scales).float())
    assert len(steps) == 15  # the BN-folded convs; the others have no bias
    moved = 0
    for name, step in steps.items():
        bias, original = deployed.finalized.get_parameter(name).detach(), unsnapped.get_parameter(name).detach()
        codes = bias / step
        assert torch.equal(torch.round(codes) * step, bias)  # on the grid, as float32 q * step
        assert ((bias - original).abs() <= step / 2 * (1 + 1e-5)).all()
        moved += int(not torch.equal(bias, original))
    assert moved == len(steps)  # float biases are never on the grid by chance
    # the sub-spectral norms' shifts: each band's folded bias a * (0 - mean) + beta on the grid of its band
    # conv, input scale x weight scale x |a|, as asc.export.precision folds and onnxruntime rounds it
    bands = 0
    for node in deployed.finalized.graph.nodes:
        if node.op != "call_function" or "batch_norm" not in str(node.target):
            continue
        conv = node.args[0].args[0]
        step = (torch.tensor(conv.args[0].args[1], dtype=torch.float32)
                * deployed.finalized.get_buffer(conv.args[1].args[1].target).float()).double()
        weight, beta, mean, var = (_graph_tensor(deployed.finalized, arg).double() for arg in node.args[1:5])
        a = weight / torch.sqrt(var + node.args[7])
        band_step = step.repeat_interleave(a.numel() // step.numel()) * a.abs()
        folded = beta - mean * a
        assert ((folded / band_step - torch.round(folded / band_step)).abs() < 1e-3).all()
        old_beta = _graph_tensor(deployed.unsnapped, node.args[2]).double()
        assert ((beta - old_beta).abs() <= band_step / 2 * (1 + 1e-5) + 1e-6).all() and not torch.equal(beta, old_beta)
        bands += 1
    assert bands == 9
    with torch.no_grad():
        snapped, reference = deployed.finalized(trained.x_test), unsnapped(trained.x_test)
    assert (snapped.argmax(1) == reference.argmax(1)).float().mean() >= 0.95
    # each shift moves by under 2 % of an activation step, but the few roundings that flip are amplified
    # by the frequency-wise norms (measured: max |dlogit| 0.33 of 2.76, 63 of 64 decisions kept)
    assert (snapped - reference).abs().max() < 0.2 * reference.abs().max()


@pytest.mark.slow
def test_a_second_conversion_reuses_the_traced_patterns_and_is_identical(trained, deployed):
    import asc.compress.quant as quant

    assert quant._PATTERNS  # the first conversion (the fixture) traced torchao's folding patterns
    traced = dict(quant._PATTERNS)
    again = convert_qat(trained.qat)
    assert quant._PATTERNS == traced  # reused, none traced again
    assert again.code == deployed.finalized.code
    for (name, a), b in zip(deployed.finalized.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(again(trained.x_test), deployed.finalized(trained.x_test))


@pytest.mark.slow
def test_int8_weights_are_the_trained_weights_on_their_grid(trained, deployed):
    """Deployed weight = round(trained (BN-folded) float weight / scale), per output channel."""
    weights = int8_conv_weights(deployed.finalized)
    folded_bn = {}
    for module in trained.model.modules():
        children = list(module.children())
        for conv, after in zip(children, children[1:] + [None]):
            if isinstance(conv, nn.Conv2d) and isinstance(module, nn.Sequential) and isinstance(after, nn.BatchNorm2d):
                folded_bn[conv] = after
    convs = [m for m in trained.model.modules() if isinstance(m, nn.Conv2d)]
    assert len(weights) == len(convs) == 33 and len(folded_bn) == 14  # head, transitions, time convs
    exact = 0
    for deployed_w, conv in zip(weights, convs):
        q, scale = deployed_w.q, deployed_w.scale
        assert q.dtype == torch.int8 and q.shape == conv.weight.shape and int(q.abs().max()) <= 64
        ratio = deployed_w.dequantized().double() / scale.double().view(-1, 1, 1, 1)
        assert ((ratio - ratio.round()).abs() <= 1e-6 * ratio.abs().clamp(min=1)).all()  # float32 q*scale
        w = conv.weight.detach()
        if conv in folded_bn:
            bn = folded_bn[conv]
            w = w * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().view(-1, 1, 1, 1)
        snapped = torch.clamp(torch.round(w / scale.view(-1, 1, 1, 1)), -64, 64)
        assert (snapped - q.float()).abs().max() <= 1  # folding in another order may flip a .5 tie
        exact += int(torch.equal(snapped, q.float()))
    assert exact >= 30


@pytest.mark.slow
def test_onnx_is_small_self_contained_qdq_with_a_dynamic_batch(deployed):
    model = onnx.load(str(deployed.path))
    assert not list(deployed.path.parent.glob("*.data"))
    assert deployed.path.stat().st_size < 100_000  # 78 KB; 582 KB with the exporter's metadata
    assert all(not node.metadata_props for node in model.graph.node) and not model.graph.value_info
    assert model.opset_import[0].version >= 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    int8 = [init[n.input[0]] for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in init and init[n.input[0]].dtype == np.int8]
    assert len(int8) == 33 and max(np.abs(w).max() for w in int8) == 64  # the 7-bit range, reached
    producers = {out: node for node in model.graph.node for out in node.output}
    double = [n for n in model.graph.node if n.op_type == "QuantizeLinear"
              and getattr(producers.get(n.input[0]), "op_type", None) == "DequantizeLinear"]
    assert not double  # no DQ -> Q requantization that ORT would merge into a different rounding


@pytest.mark.slow
def test_onnxruntime_fuses_every_conv_and_keeps_the_norms_float(trained, deployed):
    census = fusion_census(deployed.path)
    blocks = [m for m in trained.model.modules() if isinstance(m, BCResBlock)]
    assert len(int8_conv_weights(deployed.finalized)) == 33
    # as converted, the 9 depthwise convs in front of a sub-spectral norm have no output quantizer
    assert census.qlinear_convs == 24 and census.float_convs == 9
    shipped = fusion_census(deployed.shipped)
    # as shipped: one int8 conv over the 4 bands stacked on channels per block instead of conv + norm, and
    # the mean over frequency as a conv
    assert shipped.float_convs == 0 and shipped.qlinear_convs == 24 + 9 + 9
    assert shipped.op_counts.get("Split") == 9
    assert shipped.op_counts.get("QLinearConcat") == 9 and "BatchNormalization" not in shipped.op_counts
    assert shipped.op_counts.get("QLinearAdd") == sum(1 + b.identity_shortcut for b in blocks) == 14
    assert "QLinearMul" not in shipped.op_counts  # the norms' multiplies run in float
    assert shipped.op_counts["ReduceMean"] == 21  # 4 per norm x 5, 1 in the head


@pytest.mark.slow
def test_onnxruntime_matches_torch(trained, deployed, tmp_path):
    with torch.no_grad():
        reference = deployed.finalized(trained.x_test).numpy()
    # without the int8 kernels ORT reproduces the quantized values torch computed, up to activations
    # on a rounding boundary (see test_converted_graph_computes_exactly_what_qat_evaluated)
    unfused = run_onnx(deployed.path, trained.x_test, fused=False)
    difference = np.abs(unfused - reference)
    assert (difference <= 1e-5).mean() >= 0.95 and difference.max() < 0.1
    # so do the integer kernels: with the biases on their int32 grid and 7-bit weights (no int16
    # saturation in any x86 or ARM kernel) the sums are exact and the roundings the same
    # the shipped file's band convs fold each norm into int8 weights and an int32 bias on its grid
    fused = run_onnx(deployed.shipped, trained.x_test)
    difference = np.abs(fused - reference)
    assert (difference <= 1e-5).mean() >= 0.95 and difference.max() < 0.1
    assert (fused.argmax(1) == reference.argmax(1)).mean() >= 0.95  # a last-bit float flip may move a tie
    single = run_onnx(deployed.shipped, trained.x_test[:1])  # the batch dimension is dynamic
    np.testing.assert_allclose(single, fused[:1], rtol=0, atol=1e-5)
    # with torchao's float biases the kernels round each bias to the grid themselves: off everywhere
    with torch.no_grad():
        unsnapped_reference = deployed.unsnapped(trained.x_test).numpy()
    path = export_onnx(deployed.unsnapped, trained.x_test[:2], tmp_path / "unsnapped.onnx")
    assert (np.abs(run_onnx(path, trained.x_test) - unsnapped_reference) <= 1e-5).mean() < 0.5
