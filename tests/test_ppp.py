"""PPP (methods.md §12): STE gates, the losses, exact channel removal, the stage, resume and `asc personalize`."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import soundfile as sf
import torch
from compress_resume import assert_same_tensors, kill_and_resume
from ddp_run import assert_ranks_equal, compress_on_two_ranks
from source_run import train_source_run
from torch import nn

from asc.audio import fit_length, load_audio
from asc.cli import main
from asc.compress.base import StageContext
from asc.compress.ppp import (
    PPP,
    ChannelGate,
    PPPOptions,
    class_weights,
    gate_sites,
    gates_of,
    insert_gates,
    prototype_loss,
    sparsity_loss,
    without_gates,
)
from asc.compress.stage import build_methods, compose
from asc.config import RunConfig, load_config
from asc.errors import ConfigError
from asc.export.gated import gated_onnx, open_gated_run
from asc.feature_spec import FastLogMel
from asc.models import BCResNet, BCResNetMod
from asc.models.baseline import DCASE2021Baseline
from asc.personalize import fix_gates, prune_graph
from asc.train.evaluate import load_run_model
from asc.train.loop import parameter_digest

SHAPE = (1, 32, 63)  #: the tiny runs' log-mel: 32 mels, 1 s at hop 256


# ------------------------------------------------------------------------------ the gate and the losses


def test_gate_is_binary_forward_and_sigmoid_gradient_backward():
    torch.manual_seed(0)
    gate = ChannelGate(nn.ReLU(), 4)
    x = torch.randn(3, 4, 5, 6)
    torch.testing.assert_close(gate(x), torch.relu(x), rtol=0, atol=0)  # a new gate is open everywhere
    with torch.no_grad():
        gate.fc.weight.copy_(torch.randn(4, 4))
        gate.fc.bias.copy_(torch.tensor([0.5, -0.5, 2.0, -2.0]))
    pooled = torch.relu(x).mean(dim=(2, 3))
    z = (pooled @ gate.fc.weight.T + gate.fc.bias).detach()
    mask = gate.mask(torch.relu(x))
    assert torch.equal(mask.detach(), (z >= 0).float())  # exactly 0 or 1
    assert 0 < int(mask.sum()) < mask.numel()
    r = torch.randn(3, 4)
    (mask * r).sum().backward()
    slope = r * torch.sigmoid(z) * (1 - torch.sigmoid(z))  # straight through: d mask / d z = sigmoid'(z)
    torch.testing.assert_close(gate.fc.bias.grad, slope.sum(0))
    torch.testing.assert_close(gate.fc.weight.grad, slope.T @ pooled)
    torch.testing.assert_close(gate(x), torch.relu(x) * mask.detach()[:, :, None, None], rtol=0, atol=0)
    gate.eval()
    assert gate.mask(torch.relu(x)).grad_fn is None  # deployed: a plain threshold


def test_sparsity_and_prototype_losses_by_hand():
    masks = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    assert sparsity_loss(masks).item() == 0.5
    prototypes = torch.tensor([[1.0, 0.0, 0.5, 1.0], [0.0, 1.0, 1.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    labels = torch.tensor([0, 1])
    # clip 0 vs P0: (0, 0, .5, 0)^2 -> mean .0625; clip 1 vs P1: (0, 1, 0, 0)^2 -> .25
    assert prototype_loss(masks, prototypes, class_weights(labels, 3)).item() == pytest.approx((0.0625 + 0.25) / 2)
    mixed = class_weights(labels, 3, torch.tensor([1, 0]), torch.tensor([0.75, 0.5]))
    assert mixed.tolist() == [[0.75, 0.25, 0.0], [0.5, 0.5, 0.0]]
    # clip 0 vs P1: mean (1, 1, 0, 1) = .75; clip 1 vs P0: mean (1, 0, .25, 1) = .5625
    expected = ((0.75 * 0.0625 + 0.25 * 0.75) + (0.5 * 0.25 + 0.5 * 0.5625)) / 2
    assert prototype_loss(masks, prototypes, mixed).item() == pytest.approx(expected)


def stub_trainer(labels: int = 3) -> SimpleNamespace:
    return SimpleNamespace(hooks=[], ctx=SimpleNamespace(device=torch.device("cpu"), enabled=False),
                           data=SimpleNamespace(labels=[str(i) for i in range(labels)]),
                           batch=SimpleNamespace(mix=None))


def test_method_reads_every_gate_scales_their_gradients_and_keeps_running_prototypes():
    torch.manual_seed(0)
    method = PPP(PPPOptions(sparsity=0.5, prototype=2.0, momentum=0.5, gate_lr=10.0))
    model = method.wrap_model(BCResNetMod(width=8, num_classes=3)).train()
    stub = stub_trainer()
    stub.hooks = [method]
    method.setup(stub)
    assert method.channels == 16 + 2 * 8 + 2 * 12 + 2 * 16 + 3 * 20
    for gate in method.gates.values():  # some gates open, some closed, differently per clip
        nn.init.normal_(gate.fc.weight, std=3.0)
        nn.init.normal_(gate.fc.bias, std=0.5)
    targets = torch.tensor([0, 0, 2, 2])
    model(torch.randn(4, *SHAPE))
    masks = torch.cat([m.detach() for m in method._masks], dim=1)
    terms = method.extra_losses(stub, {}, targets)
    assert terms["sparsity"].item() == pytest.approx(0.5 * masks.mean().item())
    assert terms["prototype"].item() == 0.0  # no class has a prototype yet
    terms["sparsity"].backward()
    gate = method.gates["head.2"]
    grad = gate.fc.bias.grad.clone()
    method.after_backward(stub)
    torch.testing.assert_close(gate.fc.bias.grad, 10.0 * grad)
    method.after_step(stub)
    assert method.seen.tolist() == [True, False, True]
    torch.testing.assert_close(method.prototypes[0], masks[:2].mean(0))  # a class's first batch starts it
    torch.testing.assert_close(method.prototypes[1], torch.zeros(method.channels))
    first = method.prototypes.clone()
    model(torch.randn(4, *SHAPE))
    masks = torch.cat([m.detach() for m in method._masks], dim=1)
    terms = method.extra_losses(stub, {}, targets)
    distances = [(masks[i] - first[t]).square().mean().item() for i, t in enumerate(targets.tolist())]
    assert terms["prototype"].item() == pytest.approx(2.0 * np.mean(distances), rel=1e-6)
    method.after_step(stub)
    torch.testing.assert_close(method.prototypes[2], 0.5 * first[2] + 0.5 * masks[2:].mean(0))  # EMA
    state = method.state_dict()
    fresh = PPP(PPPOptions(momentum=0.5))
    fresh.wrap_model(BCResNetMod(width=8, num_classes=3))
    fresh.setup(stub)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.prototypes, method.prototypes) and torch.equal(fresh.seen, method.seen)


def test_gates_go_where_channels_can_be_cut_and_start_open():
    model = BCResNetMod(width=8, num_classes=3).eval()
    base = copy.deepcopy(model)
    gates = insert_gates(model)
    assert {name: gate.channels for name, gate in gates.items()} == {
        "head.2": 16, "stages.0.0.time_conv.2": 8, "stages.0.1.time_conv.2": 8, "stages.1.0.time_conv.2": 12,
        "stages.1.1.time_conv.2": 12, "stages.2.0.time_conv.2": 16, "stages.2.1.time_conv.2": 16,
        "stages.3.0.time_conv.2": 20, "stages.3.1.time_conv.2": 20, "stages.3.2.time_conv.2": 20}
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), base(x))  # the trained function is where training starts
        plain = without_gates(model)
        assert not gates_of(plain) and torch.equal(plain(x), base(x))
    assert list(gate_sites(BCResNet(width=1, num_classes=3)))[::6] == ["head.2", "blocks.5.time_conv.2",
                                                                        "blocks.11.time_conv.2"]
    assert "classifier.1.2" in gate_sites(BCResNet(width=1, num_classes=3))
    assert "head.2" not in gate_sites(BCResNetMod(width=8, num_classes=3), head=False)
    with pytest.raises(ConfigError, match="model.name=bcresnet_mod"):
        gate_sites(DCASE2021Baseline(num_classes=3))


def test_options_and_compositions_are_checked():
    context = StageContext(Path("run"), SHAPE, 2)
    with pytest.raises(ConfigError, match="ppp.sparsity"):
        build_methods(["ppp"], {"ppp": {"sparsity": -1}}, context)
    with pytest.raises(ConfigError, match="ppp.momentum"):
        build_methods(["ppp"], {"ppp": {"momentum": 1.0}}, context)
    for other, job in [("prune", "pruning masks"), ("map", "pruning masks"), ("qat", "quantization"),
                       ("psg", "quantization"), ("pqk", "pruning masks and quantization")]:
        with pytest.raises(ConfigError, match=f"both do {job}"):
            compose(["ppp", other])  # an int8 graph would lose the gates personalization reads
    assert [cls.name for cls in compose(["kd", "ppp", "structured"])] == ["structured", "ppp", "kd"]


# ------------------------------------------------------------------------------ exact channel removal


def random_gated(kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(1)
    model, shape = ((BCResNetMod(width=8, num_classes=3), SHAPE) if kind == "bcresnet_mod"
                    else (BCResNet(width=1, num_classes=3), (1, 40, 32)))
    for module in model.modules():  # trained-looking norms, so folded biases are not zero
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.normal_(module.bias, std=0.3)
            module.running_mean.normal_(std=0.2)
            module.running_var.uniform_(0.5, 2.0)
    insert_gates(model)
    for gate in gates_of(model).values():
        nn.init.normal_(gate.fc.weight, std=2.0)
    return model.eval(), shape


def conv_weights(model: onnx.ModelProto) -> int:
    constants = {init.name: init for init in model.graph.initializer}
    return sum(int(np.prod(constants[node.input[1]].dims)) for node in model.graph.node if node.op_type == "Conv")


@pytest.mark.parametrize("kind", ["bcresnet_mod", pytest.param("bcresnet", marks=pytest.mark.slow)])
def test_pruned_graph_has_fewer_channels_and_computes_the_fixed_gates(kind: str, tmp_path: Path):
    model, shape = random_gated(kind)
    graph, plans = gated_onnx(model, torch.zeros(2, *shape), tmp_path)
    assert [o.name for o in graph.graph.output] == ["logits", *[f"gate.{i}" for i in range(len(plans))]]
    rng = np.random.default_rng(0)
    keeps = [rng.random(plan.channels) < 0.5 for plan in plans]
    keeps[1][:] = False  # a gate closed everywhere keeps one zero-weighted channel
    keeps[2][:] = True
    pruned = prune_graph(graph, plans, keeps)
    onnx.checker.check_model(pruned, full_check=True)
    assert [o.name for o in pruned.graph.output] == ["logits"]
    assert not any(node.op_type in ("Gemm", "GreaterOrEqual") for node in pruned.graph.node)  # gates deleted
    constants = {init.name: init for init in pruned.graph.initializer}
    nodes = {node.name: node for node in pruned.graph.node}
    for plan, keep in zip(plans, keeps, strict=True):
        for piece in plan.slices:
            dims = constants[nodes[piece.node].input[piece.input]].dims
            assert dims[piece.axis] == max(int(keep.sum()), 1), (plan.name, piece)
    assert conv_weights(pruned) < conv_weights(graph)

    for gate, keep in zip(gates_of(model).values(), keeps, strict=True):
        gate.fixed = torch.tensor(keep, dtype=torch.float32)
    x = torch.randn(6, *shape)
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["logits"], {"log_mel": x.numpy()})[0], expected, atol=1e-4, rtol=0)
    reference = ort.InferenceSession(fix_gates(graph, plans, keeps).SerializeToString(),
                                     providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(reference.run(["logits"], {"log_mel": x.numpy()})[0], expected, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------ the stage and the command


@pytest.fixture(scope="module")
def source_run(tiny_overrides, tmp_path_factory) -> Path:
    return train_source_run(tmp_path_factory, tiny_overrides, "ppp")


# strong sparsity and fast gates, so one tiny epoch closes channels
PPP_FAST = ["train.epochs=1", "ppp.sparsity=1.0", "ppp.gate_lr=1000"]


@pytest.fixture(scope="module")
def ppp_run(source_run: Path) -> Path:
    out = source_run.with_name("ppp")
    assert main(["compress", str(source_run), "--method", "ppp", "--out", str(out), "-q", *PPP_FAST]) == 0
    return out


@pytest.fixture(scope="module")
def enrolment(source_run: Path) -> list[Path]:
    corpus = Path(load_config(RunConfig, source_run / "config.yaml").data.synth_dir) / "audio"
    return sorted(corpus.glob("*-s4.wav"))[:10]


@pytest.mark.slow
def test_stage_trains_gates_and_ships_the_gated_network(ppp_run: Path):
    report = json.loads((ppp_run / "report.json").read_text())
    losses = report["history"][-1]["losses"]
    assert 0 < losses["ppp.sparsity"] < 1.0  # 1.0 * the open fraction: some channels closed
    assert losses["ppp.prototype"] > 0
    gated = open_gated_run(ppp_run).model
    finalized, _ = load_run_model(ppp_run)
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(finalized(x), gated(x), rtol=1e-5, atol=1e-5)  # the deployable = gated net
    twin, _ = load_run_model(ppp_run, "float")
    assert not gates_of(twin) and len(gates_of(gated)) == 10


@pytest.mark.slow
def test_personalize_a_run_then_torch_free_on_its_gated_bundle(ppp_run: Path, enrolment: list[Path],
                                                                tmp_path: Path, without_torch, capsys):
    first = tmp_path / "first"
    assert main(["personalize", str(ppp_run), "--enrol", *map(str, enrolment), "--out", str(first), "-q"]) == 0
    assert "exporting the gated bundle" in capsys.readouterr().err
    gated_bundle = ppp_run / "gated-bundle"
    script = "from asc.cli import main\ncode = main(sys.argv[1:])\nassert not BLOCKED, BLOCKED\nsys.exit(code)\n"
    out = tmp_path / "personal"
    done = without_torch(script, "personalize", gated_bundle, "--enrol", *enrolment, "--out", out, "-q")
    assert done.returncode == 0, done.stderr
    assert (out / "bundle.json").read_text() == (first / "bundle.json").read_text()  # with or without torch

    record = json.loads((out / "bundle.json").read_text())["metrics"]["personalization"]
    kept = record["kept"]
    gated = onnx.load(str(gated_bundle / "model.onnx"))
    personal = onnx.load(str(out / "model.onnx"))
    assert conv_weights(personal) < conv_weights(gated)
    plans = json.loads((gated_bundle / "ppp.json").read_text())["gates"]
    constants = {init.name: init for init in personal.graph.initializer}
    nodes = {node.name: node for node in personal.graph.node}
    for plan in plans:
        for piece in plan["slices"]:
            assert constants[nodes[piece["node"]].input[piece["input"]]].dims[piece["axis"]] == \
                max(len(kept[plan["name"]]), 1)
    assert sum(map(len, kept.values())) < sum(p["channels"] for p in plans)

    # the personalized bundle runs in the torch-free runtime and equals the gated net with the prototype's gates
    classify = ("from asc.runtime import Classifier\nimport numpy as np\nfrom asc.audio import fit_length, load_audio\n"
                "c = Classifier(sys.argv[1])\n"
                "clips = np.stack([fit_length(load_audio(p, c.sample_rate)[0], c.clip_samples) for p in sys.argv[2:]])\n"
                "np.save(sys.argv[1] + '/../logits.npy', c.logits(clips))\nassert not BLOCKED, BLOCKED\n")
    done = without_torch(classify, out, *enrolment)
    assert done.returncode == 0, done.stderr
    model = open_gated_run(ppp_run).model
    for name, gate in gates_of(model).items():
        gate.fixed = torch.zeros(gate.channels).index_fill_(0, torch.tensor(kept[name], dtype=torch.long), 1.0)
    manifest = json.loads((out / "bundle.json").read_text())
    frontend = FastLogMel(load_config(RunConfig, ppp_run / "config.yaml").features)
    clips = np.stack([fit_length(load_audio(p, manifest["sample_rate"])[0], manifest["clip_samples"])
                      for p in enrolment])
    with torch.no_grad():
        expected = model(torch.from_numpy(frontend(clips.astype(np.float32)))).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_personalize_errors_are_one_line(ppp_run: Path, enrolment: list[Path], tmp_path: Path, capsys):
    bundle = ppp_run / "gated-bundle"
    if not bundle.is_dir():
        assert main(["personalize", str(ppp_run), "--enrol", str(enrolment[0]), "--out", str(tmp_path / "x"),
                     "-q"]) == 0
    capsys.readouterr()
    broken = tmp_path / "broken.wav"
    broken.write_text("not audio")
    silent = tmp_path / "silent.wav"
    rate = sf.info(enrolment[0]).samplerate
    sf.write(silent, np.zeros(rate, np.float32), rate)
    assert main(["personalize", str(bundle), "--enrol", str(broken), str(enrolment[0]), str(silent), "--out",
                 str(tmp_path / "one"), "-q"]) == 1  # the bad file is reported, the good one used
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and (tmp_path / "one" / "model.onnx").is_file()
    assert err[0] == f"asc: warning: {silent}: the recording is silent (digital silence); its gate pattern reflects no sound"
    assert err[1].startswith(f"asc: error: {broken}:")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    # nothing usable: every bad recording gets its line, then one line says none was usable
    assert main(["personalize", str(bundle), "--enrol", str(broken), str(empty), str(tmp_path / "nowhere.wav"),
                 "--out", str(tmp_path / "none"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert sorted(line.removeprefix("asc: error: ").split(":")[0] for line in err[:3]) == sorted(
        [str(broken), str(empty), str(tmp_path / "nowhere.wav")])
    assert err[3:] == [("asc: error: --enrol: none of the 3 recordings is usable (each is named above); give WAV "
                        "files of the user's or device's audio")] and not (tmp_path / "none").exists()
    cases = {"not-a-bundle": [str(tmp_path), "--enrol", str(enrolment[0])]}
    plain, corrupt = tmp_path / "plain", tmp_path / "corrupt-bundle"
    shutil.copytree(bundle, plain)
    shutil.copytree(bundle, corrupt)
    (plain / "ppp.json").unlink()
    (corrupt / "model.onnx").write_bytes(b"\x08\x07 not a protobuf")
    cases["no-gates"] = [str(plain), "--enrol", str(enrolment[0])]
    cases["corrupt"] = [str(corrupt), "--enrol", str(enrolment[0])]
    expected = {"not-a-bundle": "neither a bundle", "no-gates": "no channel gates",
                "corrupt": "model.onnx: not a readable ONNX model"}
    for case, arguments in cases.items():
        assert main(["personalize", *arguments, "--out", str(tmp_path / case), "-q"]) == 2, case
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected[case] in err[0], (case, err)
        assert not (tmp_path / case).exists()
    assert main(["compress", str(ppp_run.with_name("base")), "--method", "ppp", "--method", "qat", "--out",
                 str(tmp_path / "qat"), "-q", "train.epochs=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["asc: error: methods ppp and qat both do quantization; drop one"] and not (tmp_path / "qat").exists()
    assert main(["compress", str(ppp_run.with_name("base")), "--method", "ppp", "--out", str(tmp_path / "bad"),
                 "-q", "ppp.momentum=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ppp.momentum" in err[0] and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_ppp_killed_mid_run_resumes_to_the_same_weights_and_prototypes(source_run: Path, monkeypatch):
    run = kill_and_resume(source_run, ["ppp"], ["train.epochs=2", "ppp.sparsity=1.0", "ppp.gate_lr=1000"], 1,
                          monkeypatch, "ppp")
    a, b = run.straight_state, run.resumed_state
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["hooks"][0], b["hooks"][0])
    assert bool(a["hooks"][0]["seen"].all())
    assert [h["losses"] for h in b["history"]] == [h["losses"] for h in a["history"]]
    gated_a, gated_b = open_gated_run(run.straight).model, open_gated_run(run.stopped).model
    assert parameter_digest(gated_a) == parameter_digest(gated_b)


@pytest.mark.slow
def test_two_process_ddp_ranks_finish_with_identical_gates_and_prototypes(source_run: Path, tmp_path: Path):
    """Each rank sees other clips; the prototypes are summed over ranks, so they stay identical."""
    ranks = compress_on_two_ranks(source_run, tmp_path / "ppp", ["ppp"], ["train.device=cpu", *PPP_FAST])
    assert_ranks_equal(ranks)
    assert_same_tensors(ranks[0]["hooks"][0], ranks[1]["hooks"][0])
    assert bool(ranks[0]["hooks"][0]["seen"].all())
