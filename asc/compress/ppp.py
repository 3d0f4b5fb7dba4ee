"""PPP: prototype-based personalized pruning (ICASSP 2021, arXiv 2103.15564; methods.md §12).

Training (this method) gives the network channel gates and teaches them two habits; deployment
(``asc personalize``, :mod:`asc.personalize`) then prunes the network for one user or device
from a few enrolment clips, without a gradient step.

A gate (:class:`ChannelGate`) sits after the activation of a gated conv: global average pool of
the activation → FC → sigmoid, binarized at 0.5, multiplied into the channels. The binarization
is straight-through: the forward uses the 0/1 mask, the backward the sigmoid's gradient. The loss
adds to the task's cross-entropy

* ``sparsity`` · mean(gate) — the fraction of open channels, so unneeded channels close;
* ``prototype`` · mean_c (g(x) − P[y])² — pulls each clip's gate pattern towards the running mean
  pattern ``P[y]`` of its class (an EMA with ``momentum``, updated after every step from the
  batch, mixup-weighted, all-reduced under DDP, checkpointed for an exact resume); normalized by
  the number of gated channels so its weight does not depend on the width.

Both terms are means over every gated channel, so each gate unit gets a gradient ~1/channels of
the term's weight; the gate FCs therefore learn ``gate_lr`` times faster than the network
(their gradients are scaled after the backward; for SGD that is a learning-rate factor).

Where gates go (:func:`gate_sites`): only where a closed channel can be cut out of the network
exactly, i.e. where the gated tensor feeds nothing but the next conv's inputs, never a residual
sum:

* every broadcasted residual block's 1-D branch, after the temporal depthwise conv's BN + SiLU:
  that tensor feeds only the pointwise conv. Closing channel ``c`` removes row ``c`` of the
  depthwise conv (and its BN), column ``c`` of the pointwise conv, and the depthwise conv's input
  row ``c`` through a channel gather (its input, the frequency-pooled ``z``, also feeds the
  block's sum, so it cannot shrink);
* the stem's output (conv + BN + ReLU), when the first block is a transition block (a 1x1 conv,
  no identity shortcut): closing ``c`` removes the stem filter ``c`` and input ``c`` of that conv;
* BC-ResNet's classifier 1x1 conv + BN + ReLU before pooling and the last conv.

Not gated: a transition block's 1x1 conv output and the pointwise output, because they feed the
block's residual sum (via the frequency-wise depthwise conv and sub-spectral norm), where a closed
channel still carries the norm's bias. The gates start open (zero FC weights, bias +1), so
training starts from the trained network's function.

Finalize keeps the gates (the deployable module prunes itself per clip); the float twin is the
global network with every channel open. :mod:`asc.export.gated` ships the gated model with its
gate outputs and the plan that cuts closed channels out of the ONNX graph.

Jobs: the gates are PPP's channel masks, so it does :attr:`Job.MASKS` (one owner per mask), and
it decides the precision of what ships, a float gated graph that personalization prunes, so it
also does :attr:`Job.QUANTIZATION`: an int8 method's graph would lose the gates, and the stage
refuses the pair before training. Channel removal before training and distillation compose.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from asc.compress.base import Job, Method, StageContext, parse_options, register
from asc.errors import ConfigError
from asc.models.bcresnet import BCResBlock, BCResNet, BCResNetMod

if TYPE_CHECKING:
    from asc.train.loop import Trainer

GATE_BIAS = 1.0
"""Initial FC bias: sigmoid(1) = 0.73, every gate open but still learning (sigmoid' = 0.20)."""


class ChannelGate(nn.Module):
    """``act(x) · m`` with a per-clip, per-channel keep mask ``m = [fc(GAP(act(x))) >= 0]``.

    In training ``m`` is straight-through: its value is the 0/1 mask, its gradient the sigmoid's
    (``sigmoid(z) >= 0.5`` is ``z >= 0``). ``sink``, when set, receives every mask computed in
    training mode (PPP's loss reads them); ``tap``, when set, every mask in any mode (to return
    them from a forward, e.g. as export outputs). ``fixed`` (a 0/1 vector) replaces the computed
    mask: the gated network with a prototype's gates.
    """

    def __init__(self, activation: nn.Module, channels: int) -> None:
        super().__init__()
        self.activation = activation
        self.fc = nn.Linear(channels, channels)
        nn.init.zeros_(self.fc.weight)
        nn.init.constant_(self.fc.bias, GATE_BIAS)
        self.sink: list[Tensor] | None = None
        self.tap: list[Tensor] | None = None
        self.fixed: Tensor | None = None

    @property
    def channels(self) -> int:
        return self.fc.out_features

    def mask(self, activated: Tensor) -> Tensor:
        """``(batch, channels)`` 0/1 keep mask of an activation (straight-through in training)."""
        logits = self.fc(activated.mean(dim=(2, 3)))
        hard = (logits >= 0).to(activated.dtype)
        if not self.training:
            return hard
        soft = torch.sigmoid(logits)
        return soft + (hard - soft).detach()  # exactly 0 or 1: 1 - soft is exact for soft >= 0.5

    def forward(self, x: Tensor) -> Tensor:
        activated = self.activation(x)
        if self.fixed is not None:
            mask = self.fixed.to(activated.dtype).expand(activated.shape[0], -1)
        else:
            mask = self.mask(activated)
        if self.sink is not None and self.training:
            self.sink.append(mask)
        if self.tap is not None:
            self.tap.append(mask)
        return activated * mask[:, :, None, None]


# ---------------------------------------------------------------------------------------------
# Where gates go


def gate_sites(model: nn.Module, *, head: bool = True) -> dict[str, int]:
    """``{activation module name: channels}`` of every exactly removable gate point, in forward order."""
    blocks = [(name, module) for name, module in model.named_modules() if isinstance(module, BCResBlock)]
    if not blocks or not isinstance(model, (BCResNet, BCResNetMod)):
        raise ConfigError(f"ppp: {type(model).__name__} has no gate points PPP knows; use model.name=bcresnet_mod "
                          "or bcresnet")
    sites: dict[str, int] = {}
    if head and not blocks[0][1].identity_shortcut:  # the stem feeds only the first block's 1x1 conv
        sites["head.2"] = model.head[0].out_channels
    for name, block in blocks:
        sites[f"{name}.time_conv.2"] = block.time_conv[0].out_channels
    if isinstance(model, BCResNet):
        sites["classifier.1.2"] = model.classifier[1][0].out_channels
    return sites


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def insert_gates(model: nn.Module, *, head: bool = True) -> dict[str, ChannelGate]:
    """Put a :class:`ChannelGate` around the activation at every gate site (in place); returns them."""
    gates: dict[str, ChannelGate] = {}
    for name, channels in gate_sites(model, head=head).items():
        gates[name] = ChannelGate(model.get_submodule(name), channels)
        _replace(model, name, gates[name])
    return gates


def gates_of(model: nn.Module) -> dict[str, ChannelGate]:
    """The model's gates by name, in forward order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, ChannelGate)}


def without_gates(model: nn.Module) -> nn.Module:
    """A copy with every gate replaced by its activation: the network with all channels open."""
    plain = copy.deepcopy(model)
    for name, gate in gates_of(plain).items():
        _replace(plain, name, gate.activation)
    return plain


def collect_masks(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Logits and every gate's mask for ``x`` (one forward; traceable, so export can return them)."""
    gates = list(gates_of(model).values())
    tap: list[Tensor] = []
    for gate in gates:
        gate.tap = tap
    try:
        logits = model(x)
    finally:
        for gate in gates:
            gate.tap = None
    if len(tap) != len(gates):
        raise ConfigError(f"ppp: {len(gates)} gates but {len(tap)} masks in one forward; a gate ran twice or "
                          "not at all")
    return logits, tap


# ---------------------------------------------------------------------------------------------
# The losses


def sparsity_loss(masks: Tensor) -> Tensor:
    """Mean of the (straight-through) gates: the fraction of open channels."""
    return masks.mean()


def prototype_loss(masks: Tensor, prototypes: Tensor, weights: Tensor) -> Tensor:
    """Mean over clips of ``sum_k w_ik · mean_c (g_ic − P_kc)²``.

    ``masks`` (batch, C), ``prototypes`` (classes, C), ``weights`` (batch, classes): a clip's
    class weights (one-hot, or mixup's two weights), zero for classes without a prototype yet.
    """
    distance = (masks[:, None, :] - prototypes[None, :, :].to(masks.dtype)).square().mean(dim=2)
    return (weights.to(masks.dtype) * distance).sum(dim=1).mean()


def class_weights(labels: Tensor, num_classes: int, perm: Tensor | None = None, lam: Tensor | None = None) -> Tensor:
    """(batch, classes) weight of each clip for each class: one-hot, or mixup's ``lam``/``1 − lam``."""
    own = nn.functional.one_hot(labels, num_classes).float()
    if perm is None or lam is None:
        return own
    lam = lam.float()[:, None]
    return lam * own + (1 - lam) * own[perm]


# ---------------------------------------------------------------------------------------------
# The method


@dataclass
class PPPOptions:
    sparsity: float = 2.0  #: lambda_s, weight of the mean gate (fraction of open channels); see docs/personalize.md
    prototype: float = 0.1  #: lambda_p, weight of the distance to the class's prototype gate pattern
    momentum: float = 0.9  #: EMA factor of the running class prototypes (per optimizer step)
    gate_lr: float = 100.0  #: the gate FCs' gradients are multiplied by this (their relative learning rate)
    head: bool = True  #: also gate the stem's output channels

    def __post_init__(self) -> None:
        for key in ("sparsity", "prototype"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"ppp.{key} must be a number >= 0 (a loss weight), got {value!r}")
        if isinstance(self.gate_lr, bool) or not isinstance(self.gate_lr, (int, float)) or self.gate_lr <= 0:
            raise ConfigError(f"ppp.gate_lr must be a number > 0 (a learning-rate factor), got {self.gate_lr!r}")
        if isinstance(self.momentum, bool) or not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"ppp.momentum must be in [0, 1) (the prototypes' EMA factor), got {self.momentum!r}")


@register
class PPP(Method):
    """Channel gates trained for sparsity and per-class prototypes; pruned per user by ``asc personalize``."""

    name = "ppp"
    jobs = frozenset({Job.MASKS, Job.QUANTIZATION})

    def __init__(self, options: PPPOptions) -> None:
        self.options = options
        self.gates: dict[str, ChannelGate] = {}
        self._masks: list[Tensor] = []
        self._batch: tuple[Tensor, Tensor] | None = None  #: detached (sum of masks, weight) per class
        self.prototypes = torch.zeros(0, 0)  #: (classes, gated channels) running mean gate patterns
        self.seen = torch.zeros(0, dtype=torch.bool)  #: classes whose prototype has been started
        self._distributed = False

    @classmethod
    def build(cls, options: Mapping[str, Any], context: StageContext) -> PPP:
        return cls(parse_options(PPPOptions, options, cls.name))

    @property
    def channels(self) -> int:
        return sum(gate.channels for gate in self.gates.values())

    # -- hook points

    def wrap_model(self, model: nn.Module) -> nn.Module:
        if gates_of(model):
            raise ConfigError("ppp: the model already has channel gates; compress the run PPP started from")
        self.gates = insert_gates(model, head=self.options.head)
        for gate in self.gates.values():
            gate.sink = self._masks
        return model

    def setup(self, trainer: Trainer) -> None:
        device = trainer.ctx.device
        self.prototypes = torch.zeros(len(trainer.data.labels), self.channels, device=device)
        self.seen = torch.zeros(len(trainer.data.labels), dtype=torch.bool, device=device)
        self._distributed = trainer.ctx.enabled
        self._masks.clear()

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self._masks.clear()

    def step_masks(self) -> Tensor:
        """This step's masks of every gate, ``(batch, gated channels)``, taken from the gates' sink."""
        count = len(self.gates)
        if len(self._masks) < count:
            raise ConfigError(f"ppp: {len(self._masks)} of {count} gates ran in this step; the model's forward "
                              "must run every gate (is a hook replacing it with a copy?)")
        masks = torch.cat(self._masks[:count], dim=1)
        self._masks.clear()
        return masks

    def extra_losses(self, trainer: Trainer, outputs: dict[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
        if not self._masks:  # the student did not run this step (FT's paraphrase phase): no gate to pull
            return {}
        masks = self.step_masks()
        mix = trainer.batch.mix
        weights = class_weights(targets, self.prototypes.shape[0], *((mix.perm, mix.lam) if mix else ()))
        self._batch = (weights.T @ masks.detach().float(), weights.sum(dim=0))
        known = weights * self.seen[None, :].to(weights.dtype)
        return {"sparsity": self.options.sparsity * sparsity_loss(masks),
                "prototype": self.options.prototype * prototype_loss(masks, self.prototypes, known)}

    @torch.no_grad()
    def after_backward(self, trainer: Trainer) -> None:
        for gate in self.gates.values():
            for parameter in gate.fc.parameters():
                if parameter.grad is not None:
                    parameter.grad.mul_(self.options.gate_lr)

    @torch.no_grad()
    def after_step(self, trainer: Trainer) -> None:
        if self._batch is None:
            return
        sums, counts = self._batch
        self._batch = None
        if self._distributed:
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        self.update_prototypes(sums, counts)

    @torch.no_grad()
    def update_prototypes(self, sums: Tensor, counts: Tensor) -> None:
        """EMA of each class's mean mask; a class's first batch starts its prototype."""
        present = counts > 0
        means = sums / counts.clamp_min(torch.finfo(sums.dtype).tiny)[:, None]
        momentum = torch.where(self.seen, self.options.momentum, 0.0)[:, None]
        updated = momentum * self.prototypes + (1 - momentum) * means
        self.prototypes.copy_(torch.where(present[:, None], updated, self.prototypes))
        self.seen |= present

    def finalize(self, model: nn.Module) -> nn.Module:
        """A copy of the gated network (gates dynamic, nothing recorded): it prunes itself per clip."""
        final = copy.deepcopy(model)
        for gate in gates_of(final).values():
            gate.sink = gate.tap = None
        return final

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The global network: the gates removed, every channel open (the stage's float twin)."""
        return without_gates(model)

    def state_dict(self) -> dict[str, Any]:
        return {"prototypes": self.prototypes.clone(), "seen": self.seen.clone(),
                "gates": {name: gate.channels for name, gate in self.gates.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {name: gate.channels for name, gate in self.gates.items()}
        if state["gates"] != mine:
            raise ConfigError(f"ppp: the checkpoint's gates {state['gates']} differ from this model's {mine}; "
                              "resume with the run's own settings")
        self.prototypes.copy_(state["prototypes"])
        self.seen.copy_(state["seen"])

    def settings(self) -> dict[str, Any]:
        return asdict(self.options)
