"""FFL: feature fusion for online mutual knowledge distillation (Kim et al. 2019; methods.md §9).

K branches train together. Branch 0 is the student (the run's model, which other methods may
prune or restructure); the others are auxiliary copies of it: either copies of its stages after the
``split`` feature tap, fed by the student's shared stem (the reference code's variant), or whole
separate networks (``split=input``), then optionally of other widths. A fusion module concatenates
every branch's feature maps at the ``fuse`` tap (the last stage by default) and classifies them:

    concat → depthwise 3×3 + BN + ReLU → 1×1 conv (ΣC → ΣC/K) + BN + ReLU → global average pool → FC → z_f

The loss (teacher sides detached by :func:`~asc.compress.kd.kd_loss`, z_ens the mean branch logit):

    L = Σ_k CE(y, z_k) + CE(y, z_f) + w(e) · [Σ_k KL_T(z_f → z_k) + KL_T(z_ens → z_f)]

so the fused classifier teaches every branch and the branch ensemble teaches the fused classifier.
``w(e) = exp(−5 (1 − min(e, R)/R)²)`` ramps the mutual terms up over the first R epochs (the
``ramp-up`` phase). As in the reference code, the fused classifier's losses also reach the branches
through the fused feature maps; ``fusion_feedback=false`` detaches the maps at the fusion input.

The branches other than the student and the fusion module are auxiliary modules: their own lr and
weight decay (the fusion module's is 1e-5, as in the paper), the run's schedule, clipping,
checkpoints and DDP. ``finalize`` deploys branch ``deploy`` as an ordinary model of the run's
architecture, or the fused network (``deploy=fused``) as one module that exports like any other.

The networks are cut at feature taps by tracing (:func:`split_network`), not by editing model
classes: only the containers on the way to the taps are traced, every other module stays one call.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, fx, nn

from asc.compress.base import Job, Method, StageContext, parse_options, register
from asc.compress.kd import kd_loss
from asc.compress.prune import materialize_masks
from asc.errors import ConfigError
from asc.models import build_model
from asc.models.registry import feature_taps
from asc.train.hooks import Auxiliary, Phase

if TYPE_CHECKING:
    from asc.train.loop import Trainer

LOGITS = "logits"  #: the network's output, as an entry of :func:`split_network`'s outputs
INPUT = "input"  #: ``split`` value for fully separate networks (nothing shared)
FUSED = "fused"  #: ``deploy`` value for the fused network
RAMP_UP, MUTUAL = "ramp-up", "mutual"
PAPER_RAMP, PAPER_EPOCHS = 80, 300  #: the reference schedule: ramp-up over 80 of 300 epochs


# ------------------------------------------------------------------------------ cutting a network at taps


class _TapTracer(fx.Tracer):
    """Traces only the containers on the way to the tap modules; every other module stays one call.

    So a module's own control flow (``self.training`` in a norm, say) is never baked into the graph.
    """

    def __init__(self, taps: set[str]) -> None:
        super().__init__()
        self.taps = taps

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return qualname in self.taps or not any(tap.startswith(f"{qualname}.") for tap in self.taps)


def tap_paths(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """Qualified module path of each named feature tap of ``model``."""
    stages = feature_taps(model)
    unknown = [name for name in names if name not in stages]
    if unknown:
        raise ConfigError(f"feature tap {unknown[0]!r} is not a stage of {type(model).__name__}; "
                          f"valid: {', '.join(stages)}")
    paths = {id(module): path for path, module in model.named_modules()}
    return {name: paths[id(stages[name])] for name in names}


def split_network(model: nn.Module, start: str | None, outputs: Sequence[str]) -> fx.GraphModule:
    """A module sharing ``model``'s submodules that maps tap ``start``'s output to ``outputs``.

    ``start`` None takes the model's input; ``outputs`` are tap names or :data:`LOGITS` (one: that
    value, several: a tuple). The part after ``start`` must read nothing computed before it (no skip
    connection across the cut). Parameters keep their names in ``model``, so the weights of a cut
    piece load back into a whole model (:func:`graft`).
    """
    names = [name for name in outputs if name != LOGITS] + ([start] if start else [])
    paths = tap_paths(model, names)
    graph = _TapTracer(set(paths.values())).trace(model)
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    nodes: dict[str, fx.Node] = {}
    for name in names:
        found = calls.get(paths[name], [])
        if len(found) != 1:
            raise ConfigError(f"feature tap {name!r} of {type(model).__name__} runs {len(found)} times in a forward; "
                              "choose a stage that runs once")
        nodes[name] = found[0]
    result = next(node for node in graph.nodes if node.op == "output").args[0]
    if not isinstance(result, fx.Node):
        raise ConfigError(f"{type(model).__name__} returns {type(result).__name__}, not one logits tensor")
    nodes[LOGITS] = result

    cut = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if start is None:
        for node in graph.nodes:
            if node.op != "output":
                env[node] = cut.node_copy(node, env.__getitem__)
    else:
        env[nodes[start]] = cut.placeholder("features")
        after = {nodes[start]}
        for node in graph.nodes:
            if node.op == "output" or not any(arg in after for arg in node.all_input_nodes):
                continue
            after.add(node)
            for arg in node.all_input_nodes:
                if arg in env:
                    continue
                if arg.op != "get_attr":
                    raise ConfigError(f"cannot cut {type(model).__name__} at feature tap {start!r}: {node.name} after "
                                      f"it also reads {arg.name} from before it; choose another ffl.split")
                env[arg] = cut.node_copy(arg)
            env[node] = cut.node_copy(node, env.__getitem__)
        missing = [name for name in outputs if nodes[name] not in env]
        if missing:
            raise ConfigError(f"{missing[0]!r} of {type(model).__name__} is not computed after feature tap {start!r}; "
                              "the split must come before it")
    values = [env[nodes[name]] for name in outputs]
    cut.output(values[0] if len(values) == 1 else tuple(values))
    piece = fx.GraphModule(model, cut, class_name=f"{type(model).__name__}Piece")
    piece.graph.eliminate_dead_code()
    piece.delete_all_unused_submodules()
    piece.recompile()
    return piece


def graft(whole: nn.Module, piece: nn.Module) -> nn.Module:
    """A copy of ``whole`` with the weights of ``piece`` (a :func:`split_network` of its architecture)."""
    grafted = copy.deepcopy(whole)
    state = grafted.state_dict()
    foreign = sorted(set(piece.state_dict()) - set(state))
    if foreign:
        raise ConfigError(f"cannot graft: {foreign[0]!r} is not a weight of {type(whole).__name__}")
    grafted.load_state_dict({**state, **piece.state_dict()})
    return grafted


def without_recorders(module: nn.Module) -> nn.Module:
    """``module`` with every list attribute of its layers set to None (in place), so nothing records.

    Such a list collects values of a forward for whoever set it (PPP's gates append their masks to
    one that PPP empties each step); in a copy it is a new list that nobody empties, which would keep
    every step's tensors and graphs alive. The models themselves hold no list attributes.
    """
    for layer in module.modules():
        for key, value in list(vars(layer).items()):
            if not key.startswith("_") and isinstance(value, list):
                setattr(layer, key, None)
    return module


@torch.no_grad()
def reinitialize(module: nn.Module, seed: int) -> nn.Module:
    """PyTorch's default initialisation for every layer that can reset itself, drawn from ``seed``.

    Works on channel-pruned copies too (a fresh model of the class would have the unpruned shapes);
    the global random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in module.modules():
            if layer is not module and hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
    return module


# ------------------------------------------------------------------------------ the networks


class FusionModule(nn.Module):
    """Fuses the branches' feature maps (same H × W) into the fused logits z_f."""

    def __init__(self, channels: Sequence[int], num_classes: int) -> None:
        super().__init__()
        total = sum(channels)
        width = max(1, round(total / len(channels)))
        self.depthwise = nn.Conv2d(total, total, 3, padding=1, groups=total, bias=False)
        self.bn1 = nn.BatchNorm2d(total)
        self.pointwise = nn.Conv2d(total, width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, maps: list[Tensor]) -> Tensor:
        x = torch.cat(maps, dim=1)
        x = torch.relu(self.bn1(self.depthwise(x)))
        x = torch.relu(self.bn2(self.pointwise(x)))
        return self.fc(x.mean(dim=(2, 3)))


class Branches(nn.Module):
    """The non-student branches, each mapping the shared input to (fused-tap maps, logits)."""

    def __init__(self, pieces: Sequence[nn.Module]) -> None:
        super().__init__()
        self.pieces = nn.ModuleList(pieces)

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        outputs = [piece(x) for piece in self.pieces]
        return [maps for maps, _ in outputs], torch.stack([logits for _, logits in outputs])


class FusedNetwork(nn.Module):
    """Every branch and the fusion module as one network whose output is the fused logits."""

    def __init__(self, stem: nn.Module | None, branches: Sequence[nn.Module], fusion: FusionModule) -> None:
        super().__init__()
        self.stem = stem if stem is not None else nn.Identity()
        self.branches = nn.ModuleList(branches)
        self.fusion = fusion

    def forward(self, x: Tensor) -> Tensor:
        shared = self.stem(x)
        return self.fusion([branch(shared)[0] for branch in self.branches])


# ------------------------------------------------------------------------------ the method


def rampup_weight(epoch: int, rampup: int) -> float:
    """``exp(−5 (1 − min(e, R)/R)²)`` of 0-based epoch e; 1 throughout when R is 0."""
    if rampup <= 0:
        return 1.0
    return math.exp(-5.0 * (1.0 - min(epoch, rampup) / rampup) ** 2)


def default_rampup(epochs: int) -> int:
    """The paper's 80 epochs, shortened to the same share of the run (80 of 300) when the run is shorter."""
    return min(PAPER_RAMP, round(epochs * PAPER_RAMP / PAPER_EPOCHS))


@dataclass
class FFLOptions:
    branches: int = 2  #: K, the number of branches (the student is branch 0)
    split: str = "auto"  #: tap after which the branches part ("auto": the one before ``fuse``; "input": separate nets)
    fuse: str = "auto"  #: tap whose feature maps are fused ("auto": the model's last named stage)
    widths: list[int | float] | None = None  #: model widths of branches 1..K-1, separate networks (needs split=input)
    #: branches 1..K-1 start from the student's trained weights ("copy") or fresh ("fresh"); "auto": copy,
    #: but fresh with ``widths`` (another width has no trained weights to copy, so copy is refused there)
    init: str = "auto"
    seed: int = 0  #: seed of fresh branch weights
    temperature: float = 3.0
    rampup: int | None = None  #: R in epochs (None: 80, or 80/300 of a shorter run)
    fusion_feedback: bool = True  #: the fused classifier's losses also train the branches (reference code)
    lr: float | None = None  #: learning rate of branches 1..K-1 (None: the run's)
    weight_decay: float | None = None  #: their weight decay (None: the run's)
    fusion_lr: float | None = None  #: learning rate of the fusion module (None: the run's)
    fusion_weight_decay: float = 1e-5  #: the fusion module's weight decay (the paper's)
    deploy: int | str = 0  #: branch to ship (0: the student) or "fused" for the fused network

    def __post_init__(self) -> None:
        if isinstance(self.branches, bool) or self.branches < 2:
            raise ConfigError(f"ffl.branches must be a whole number >= 2, got {self.branches!r}")
        if self.init not in ("auto", "copy", "fresh"):
            raise ConfigError(f"ffl.init must be auto, copy or fresh, got {self.init!r}")
        if self.widths is not None:
            if self.split != INPUT:
                raise ConfigError("ffl.widths needs ffl.split=input: copied stages must take the shared stem's "
                                  "channels, so only separate networks may differ in width")
            if len(self.widths) != self.branches - 1 or any(w <= 0 for w in self.widths):
                raise ConfigError(f"ffl.widths must list {self.branches - 1} positive widths (branches 1.."
                                  f"{self.branches - 1}), got {self.widths!r}")
            if self.init == "copy":
                raise ConfigError("ffl.init=copy cannot apply with ffl.widths: branches of another width have no "
                                  "trained weights to copy; set ffl.init=fresh (or leave it auto)")
        if self.init == "auto":
            self.init = "copy" if self.widths is None else "fresh"
        if self.rampup is not None and self.rampup < 0:
            raise ConfigError(f"ffl.rampup must be >= 0 epochs, got {self.rampup!r}")
        for key in ("lr", "fusion_lr"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"ffl.{key} must be > 0, got {value!r}")
        if self.deploy != FUSED and not (isinstance(self.deploy, int) and not isinstance(self.deploy, bool)
                                         and 0 <= self.deploy < self.branches):
            raise ConfigError(f"ffl.deploy must be a branch 0..{self.branches - 1} or {FUSED!r}, got {self.deploy!r}")
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), self.temperature)  # validates the temperature


@register
class FFL(Method):
    """K branches and a fusion module distilling into each other; ships one branch or the fused net."""

    name = "ffl"
    jobs = frozenset({Job.DISTILLATION})

    def __init__(self, options: FFLOptions, *, split: str | None, fuse: str, context: StageContext,
                 spec: Mapping[str, Any]) -> None:
        """``split`` None: separate networks; ``spec`` (the run's model name, args, classes) builds other widths."""
        self.options = options
        self.split, self.fuse = split, fuse
        self.input_shape = context.input_shape
        self.spec = dict(spec)
        self.rampup = default_rampup(context.epochs) if options.rampup is None else options.rampup
        self.weight = rampup_weight(0, self.rampup)
        self.branch_nets: list[nn.Module] = []  #: branches 1..K-1 as whole networks (weights shared with the pieces)
        self.stem: nn.Module | None = None  #: the student up to ``split`` (shares its weights)
        self.student_rest: nn.Module | None = None  #: the student from ``split`` to (fused maps, logits)
        self.branches: Auxiliary | None = None
        self.fusion: Auxiliary | None = None
        self._fused: FusedNetwork | None = None

    @classmethod
    def build(cls, options: Mapping[str, Any], context: StageContext) -> FFL:
        from asc.train.evaluate import load_run_model

        parsed = parse_options(FFLOptions, options, cls.name)
        model, state = load_run_model(context.source, trainable=True)
        taps = list(feature_taps(model))
        fuse = taps[-1] if parsed.fuse == "auto" else parsed.fuse
        if fuse not in taps:
            raise ConfigError(f"ffl.fuse: {fuse!r} is not a stage of {type(model).__name__}; valid: {', '.join(taps)}")
        before = taps[: taps.index(fuse)]
        if parsed.split == INPUT:
            split = None
        elif parsed.split == "auto" and before:
            split = before[-1]
        elif parsed.split in before:
            split = parsed.split
        else:
            raise ConfigError(f"ffl.split must be a stage before ffl.fuse={fuse!r} or {INPUT!r}; valid: "
                              f"{', '.join([*before, INPUT])}")
        return cls(parsed, split=split, fuse=fuse, context=context, spec=state["model_spec"])

    # -- declarations

    def phases(self) -> tuple[Phase, Phase]:
        return Phase(RAMP_UP, epochs=self.rampup), Phase(MUTUAL)

    def feature_taps(self) -> tuple[str, ...]:
        return (self.fuse,) if self.split is None else (self.split, self.fuse)

    def output_keys(self) -> frozenset[str]:
        return frozenset({"ffl_branch_logits", "ffl_fused_logits"})

    def auxiliaries(self) -> dict[str, Auxiliary]:
        if self.branches is None or self.fusion is None:
            raise ConfigError("ffl: auxiliaries asked before wrap_model; the trainer wraps the model first")
        return {"branches": self.branches, "fusion": self.fusion}

    # -- building the branches

    def _branch_network(self, student: nn.Module, index: int) -> nn.Module:
        """Branch ``index`` (≥ 1) as a whole network: a copy of the student, or its architecture at another width."""
        options = self.options
        if options.widths is None:
            net = without_recorders(materialize_masks(copy.deepcopy(student)))  # no masks, records nothing
            return reinitialize(net, options.seed + index) if options.init == "fresh" else net
        try:
            with torch.random.fork_rng(devices=[]):  # the model's own initialisation, drawn from the seed
                torch.manual_seed(options.seed + index)
                net = build_model(self.spec["name"], self.spec["num_classes"],
                                  **{**self.spec["args"], "width": options.widths[index - 1]})
        except ConfigError as error:
            raise ConfigError(f"ffl.widths: {error}") from None
        return net.to(next(student.parameters()).device)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        if not hasattr(model, "feature_taps"):
            raise ConfigError(f"ffl: the student is a {type(model).__name__} without named stages (an int8 QAT graph "
                              "cannot be tapped); run --method ffl first, then compress that run with --method qat")
        outputs = [self.fuse, LOGITS]
        self.branch_nets = [self._branch_network(model, index).train() for index in range(1, self.options.branches)]
        pieces = [split_network(net, self.split, outputs) for net in self.branch_nets]
        self.stem = None if self.split is None else split_network(model, None, [self.split])
        self.student_rest = split_network(model, self.split, outputs)
        maps, num_classes = self._probe([self.student_rest, *pieces])
        if len({m.shape[2:] for m in maps}) != 1:
            sizes = ", ".join("x".join(map(str, m.shape[2:])) for m in maps)
            raise ConfigError(f"ffl: the branches' {self.fuse!r} maps differ in size ({sizes}); fusion needs one H x W")
        fusion = FusionModule([m.shape[1] for m in maps], num_classes).to(maps[0].device)
        self.branches = Auxiliary(Branches(pieces), lr=self.options.lr, weight_decay=self.options.weight_decay)
        self.fusion = Auxiliary(fusion, lr=self.options.fusion_lr, weight_decay=self.options.fusion_weight_decay)
        return model

    @torch.no_grad()
    def _probe(self, pieces: Sequence[nn.Module]) -> tuple[list[Tensor], int]:
        """Each branch's fused maps and the number of classes, from copies in eval mode (no statistics move)."""
        stem, rest = copy.deepcopy((self.stem or nn.Identity(), nn.ModuleList(pieces)))
        device = next(rest.parameters()).device
        shared = stem.eval()(torch.zeros((2, *self.input_shape), device=device))
        outputs = [piece(shared) for piece in rest.eval()]
        return [maps for maps, _ in outputs], outputs[0][1].shape[1]

    # -- hook points

    def setup(self, trainer: Trainer) -> None:
        others = [hook.label for hook in trainer.hooks if hook is not self]
        if self.options.deploy != 0 and others:
            raise ConfigError(f"ffl.deploy={self.options.deploy} ships a network that {', '.join(others)} did not "
                              "compress (they change the student, branch 0); keep ffl.deploy=0 when composing")

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self.weight = rampup_weight(epoch, self.rampup)

    def forward(self, trainer: Trainer, model: nn.Module, x: Tensor) -> dict[str, Tensor]:
        assert self.branches is not None and self.fusion is not None
        self.branches.module.train()
        self.fusion.module.train()
        maps, logits = self.branches(x if self.split is None else trainer.feature(self.split))
        maps = [trainer.feature(self.fuse), *maps]
        if not self.options.fusion_feedback:
            maps = [m.detach() for m in maps]
        return {"ffl_branch_logits": logits, "ffl_fused_logits": self.fusion(maps)}

    def extra_losses(self, trainer: Trainer, outputs: dict[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
        """Branch 0's CE is the loop's task term; every KL term is logged per branch (its own teacher/student)."""
        from asc.train.loop import task_loss

        t, w = self.options.temperature, self.weight
        branches = [outputs["logits"], *outputs["ffl_branch_logits"].unbind()]
        fused = outputs["ffl_fused_logits"]
        losses = {f"ce_branch{k}": task_loss(z, trainer.batch) for k, z in enumerate(branches) if k}
        losses["ce_fused"] = task_loss(fused, trainer.batch)
        losses.update({f"kd_branch{k}": w * kd_loss(z, fused, t) for k, z in enumerate(branches)})
        losses["kd_fused"] = w * kd_loss(fused, torch.stack(branches).mean(0), t)
        return losses

    def _fused_network(self) -> FusedNetwork:
        """Every branch and the fusion module as one network (sharing their weights)."""
        assert self.student_rest is not None and self.branches is not None and self.fusion is not None
        if self._fused is None:
            self._fused = FusedNetwork(self.stem, [self.student_rest, *self.branches.module.pieces], self.fusion.module)
        return self._fused

    def eval_forward(self, trainer: Trainer, model: nn.Module, x: Tensor) -> Tensor | None:
        """The deploy path: the student as is, another branch, or the fused network."""
        deploy = self.options.deploy
        if deploy == 0:
            return None
        fused = self._fused_network().eval()
        if deploy == FUSED:
            return fused(x)
        return fused.branches[deploy](fused.stem(x))[1]

    def finalize(self, model: nn.Module) -> nn.Module:
        deploy = self.options.deploy
        if deploy == 0:
            return model
        if deploy == FUSED:
            shipped = copy.deepcopy(self._fused_network())
            for module in shipped.modules():  # the student's stages carry the trainer's feature-tap hooks
                module._forward_hooks.clear()
            return shipped.eval()
        net = self.branch_nets[deploy - 1]
        return (copy.deepcopy(net) if self.stem is None else graft(net, self.stem)).eval()

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model if self.options.deploy == 0 else self.finalize(model)

    def settings(self) -> dict[str, Any]:
        return {**asdict(self.options), "split": self.split or INPUT, "fuse": self.fuse, "rampup": self.rampup}
