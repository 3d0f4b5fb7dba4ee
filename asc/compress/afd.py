"""AFD: online adversarial feature-map distillation (Chung et al., ICML 2020; methods.md §10).

K networks train together: network 0 is the student (the run's model, which other methods may
prune or restructure), networks 1..K-1 are peers — the student's architecture at other widths
(fresh weights) or the models of trained runs. Each network k exposes the feature map F_k of a
named stage (``tap``: by default its last stage before global pooling). Where channel counts
differ, a 1x1 conv + BN *transfer layer* maps F_k to the widest network's channels; where
spatial sizes differ, adaptive average pooling brings every map to the smallest H x W. Each
network k has a discriminator D_k (``disc_layers`` stride-2 3x3 conv + BN + LeakyReLU(0.2) blocks,
no BN in the first; global pooling; a linear head with one output) that calls its own network's
map fake and the next network's map real (the cyclic scheme: F_{(k+1) mod K}; for K = 2, each the other's). With
least-squares GAN losses:

    L_D      = Σ_k (D_k(F_{(k+1) mod K}) − 1)² + D_k(F_k)²                 (maps detached)
    L_k      = CE(y, z_k) + kd_weight · KL_T(mean_{j≠k} z_j → z_k) + alpha · (D_k(F_k) − 1)²

Every iteration updates the discriminators first and then the networks, and the networks'
adversarial terms see the *updated* discriminators. The loop has one backward per step, so the
discriminator update happens inside this hook's forward, between the networks' forward and their
loss: L_D on detached maps, its own backward (reaching the discriminators only), clipping and a
step of the discriminators' optimizer (the trainer's optimizer of ``step_order`` −1, which the
trainer schedules and checkpoints; its own step later in the iteration finds no gradient and
does nothing). The adversarial terms then run the updated discriminators with their parameters
detached (:func:`torch.func.functional_call`), so they reach network k (and its transfer layer)
only and never write a gradient into D_k.

The peers, the transfer layers and the discriminators are auxiliary modules of the trainer (own
lr and weight decay, the run's schedule, clipping, checkpoints, DDP). The discriminators have an
optimizer of their own kind: Adam at 2e-4 as in the paper (``disc_optimizer`` adamw at weight
decay 0). With the networks' SGD at the run's learning rate instead, the LSGAN game diverged
(the adversarial loss reached 1e19 within an epoch in two of three seeds on the synthetic corpus).
``finalize`` ships network ``deploy`` alone (0: the student); discriminators and transfer layers
are dropped.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asc.compress.base import Job, Method, StageContext, parse_options, register
from asc.compress.kd import kd_loss
from asc.config import OPTIMIZERS, OptimizerName
from asc.errors import ConfigError
from asc.models import build_model
from asc.models.registry import feature_taps
from asc.train.hooks import Auxiliary

if TYPE_CHECKING:
    from asc.train.loop import Trainer

AUTO = "auto"
DISC_ORDER = -1  #: step order of the discriminators' optimizer: before the networks'


# ------------------------------------------------------------------------------ the modules


def tapped_forward(net: nn.Module, tap: str, x: Tensor) -> tuple[Tensor, Tensor]:
    """``net``'s output of stage ``tap`` and its logits, from one forward (no hook left behind)."""
    seen: list[Tensor] = []
    handle = feature_taps(net)[tap].register_forward_hook(lambda _module, _inputs, output: seen.append(output))
    try:
        logits = net(x)
    finally:
        handle.remove()
    return seen[0], logits


class TappedNetworks(nn.Module):
    """The peers, run on one input: their tap's feature maps and their stacked logits (peers, batch, classes)."""

    def __init__(self, nets: Sequence[nn.Module], taps: Sequence[str]) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.taps = list(taps)

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        outputs = [tapped_forward(net, tap, x) for net, tap in zip(self.nets, self.taps, strict=True)]
        return [maps for maps, _ in outputs], torch.stack([logits for _, logits in outputs])


class Transfer(nn.Module):
    """Brings every network's map to ``channels`` (1x1 conv + BN where it has fewer) and ``size`` (avg pool)."""

    def __init__(self, channels: Sequence[int], width: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = tuple(size)
        self.layers = nn.ModuleList(
            nn.Identity() if c == width else nn.Sequential(nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width))
            for c in channels)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        """The transferred maps stacked as (networks, batch, channels, H, W)."""
        out = []
        for layer, m in zip(self.layers, maps, strict=True):
            if tuple(m.shape[2:]) != self.size:
                m = F.adaptive_avg_pool2d(m, self.size)
            out.append(layer(m))
        return torch.stack(out)


class Discriminator(nn.Module):
    """Stride-2 3x3 conv + BN + LeakyReLU(0.2) blocks, global average pooling, one linear output per example.

    The first block has no BN (as in DCGAN): D sees real and fake maps as separate batches, and a
    batch norm right after the first conv would subtract exactly the per-channel offsets of the maps
    that D should learn to tell apart.
    """

    def __init__(self, channels: int, hidden: int, layers: int) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for index in range(layers):
            conv = nn.Conv2d(channels if index == 0 else hidden, hidden, 3, stride=2, padding=1, bias=index == 0)
            blocks += [conv, nn.BatchNorm2d(hidden), nn.LeakyReLU(0.2)] if index else [conv, nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).mean(dim=(2, 3))).squeeze(1)


class Discriminators(nn.Module):
    """D_0..D_{K-1}; D_k judges network k's maps (and, for its own loss, the real ones) in one call.

    One call per step keeps DDP to one forward per backward; real and fake maps are separate
    batches, so D's batch norm never mixes them.
    """

    def __init__(self, count: int, channels: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.nets = nn.ModuleList(Discriminator(channels, hidden, layers) for _ in range(count))

    def forward(self, fakes: Tensor, reals: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Scores (networks, batch) of D_k on ``fakes[k]``; with ``reals``, also on ``reals[k]``."""
        fake = torch.stack([d(m) for d, m in zip(self.nets, fakes, strict=True)]).float()
        if reals is None:
            return fake
        return fake, torch.stack([d(m) for d, m in zip(self.nets, reals, strict=True)]).float()


def cyclic_reals(maps: Tensor) -> Tensor:
    """The "real" maps of each D_k: network (k+1) mod K's (for K = 2: each the other's)."""
    return torch.roll(maps, shifts=-1, dims=0)


def discriminator_loss(real: Tensor, fake: Tensor) -> Tensor:
    """LSGAN, summed over the discriminators: Σ_k mean (D_k(real) − 1)² + mean D_k(fake)²."""
    return ((real - 1) ** 2).mean(dim=1).sum() + (fake**2).mean(dim=1).sum()


def adversarial_losses(fake: Tensor) -> Tensor:
    """LSGAN for the networks, one per network: mean (D_k(F_k) − 1)²."""
    return ((fake - 1) ** 2).mean(dim=1)


# ------------------------------------------------------------------------------ the method


@dataclass
class AFDOptions:
    widths: list[int] | None = None  #: peers of the student's architecture at these widths (fresh weights)
    runs: list[str] | None = None  #: trained run folders whose models join as further peers
    checkpoint: str = "last"  #: checkpoint of those runs
    seed: int = 0  #: seed of the fresh peers' weights (peer k: seed + k)
    tap: str = AUTO  #: stage whose maps are judged ("auto": each network's last named stage)
    temperature: float = 3.0
    kd_weight: float = 1.0  #: weight of KL_T(others' mean → network)
    alpha: float = 1.0  #: weight of the adversarial term
    disc_layers: int = 2  #: stride-2 conv blocks of a discriminator
    disc_channels: int = 64  #: their width
    disc_optimizer: OptimizerName = "adamw"  #: the discriminators' optimizer kind (adamw at weight decay 0: Adam)
    disc_lr: float | None = 2e-4  #: discriminators' learning rate (None: the run's)
    disc_weight_decay: float = 0.0
    lr: float | None = None  #: learning rate of the peers and transfer layers (None: the run's)
    weight_decay: float | None = None  #: their weight decay (None: the run's)
    deploy: int = 0  #: network to ship: 0 the student, k the k-th peer (widths first, then runs)

    def __post_init__(self) -> None:
        if self.widths is not None and (not self.widths or any(w < 1 for w in self.widths)):
            raise ConfigError(f"afd.widths must list positive widths, got {self.widths!r}")
        if self.runs is not None and not self.runs:
            raise ConfigError("afd.runs must list at least one run folder (or leave it out)")
        for key in ("disc_layers", "disc_channels"):
            value = getattr(self, key)
            if isinstance(value, bool) or value < 1:
                raise ConfigError(f"afd.{key} must be a whole number >= 1, got {value!r}")
        for key in ("kd_weight", "alpha", "disc_weight_decay"):
            if getattr(self, key) < 0:
                raise ConfigError(f"afd.{key} must be >= 0, got {getattr(self, key)!r}")
        if self.disc_optimizer not in OPTIMIZERS:
            raise ConfigError(f"afd.disc_optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.disc_optimizer!r}")
        for key in ("disc_lr", "lr"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"afd.{key} must be > 0, got {value!r}")
        if isinstance(self.deploy, bool) or self.deploy < 0:
            raise ConfigError(f"afd.deploy must be a network index >= 0 (0: the student), got {self.deploy!r}")
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), self.temperature)  # validates the temperature


def last_tap(model: nn.Module, wanted: str, what: str) -> str:
    """``wanted`` if it is a stage of ``model``, its last named stage for "auto"; else a ConfigError."""
    stages = list(feature_taps(model))
    tap = stages[-1] if wanted == AUTO else wanted
    if tap not in stages:
        raise ConfigError(f"afd.tap: {tap!r} is not a stage of {what} ({type(model).__name__}); "
                          f"valid: {', '.join(stages)}, auto")
    return tap


def width_peer(spec: Mapping[str, Any], width: int, seed: int) -> nn.Module:
    """The run's architecture at ``width``, with weights drawn from ``seed`` (the global RNG is kept)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return build_model(spec["name"], spec["num_classes"], **{**spec["args"], "width": width})
        except (ConfigError, TypeError) as error:
            raise ConfigError(f"afd.widths: {spec['name']} at width {width}: {error}") from None


def default_width(model: nn.Module, spec: Mapping[str, Any]) -> int:
    """Twice the student's width (c = 80 beside c = 40)."""
    width = spec["args"].get("width")
    if width is None:
        parameter = inspect.signature(type(model).__init__).parameters.get("width")
        width = None if parameter is None else parameter.default
    if not isinstance(width, (int, float)) or isinstance(width, bool):
        raise ConfigError(f"afd: {spec['name']} has no width to double; name the peers with afd.widths=[...] or "
                          "afd.runs=[RUN]")
    return round(2 * width)


@register
class AFD(Method):
    """Student and peers learn each other's feature-map distribution through discriminators; ships one network."""

    name = "afd"
    jobs = frozenset({Job.DISTILLATION})

    def __init__(self, options: AFDOptions, peers: Sequence[nn.Module], taps: Sequence[str],
                 input_shape: tuple[int, int, int]) -> None:
        """``taps[0]`` is the student's stage, ``taps[k]`` peer k's."""
        self.options = options
        self.taps = list(taps)
        self.input_shape = input_shape
        self.peers = Auxiliary(TappedNetworks(peers, self.taps[1:]).train(), lr=options.lr,
                               weight_decay=options.weight_decay)
        self.transfer: Auxiliary | None = None
        self.discriminators: Auxiliary | None = None
        self.disc_optimizer: torch.optim.Optimizer | None = None

    @classmethod
    def build(cls, options: Mapping[str, Any], context: StageContext) -> AFD:
        from asc.train.evaluate import load_run_model

        parsed = parse_options(AFDOptions, options, cls.name)
        student, state = load_run_model(context.source, trainable=True)
        spec = state["model_spec"]
        widths = parsed.widths
        if widths is None and parsed.runs is None:
            widths = [default_width(student, spec)]
        peers = [width_peer(spec, width, parsed.seed + k) for k, width in enumerate(widths or [], start=1)]
        names = [spec["name"]] * len(peers)
        for run in parsed.runs or []:
            peer, peer_state = load_run_model(Path(run), parsed.checkpoint, trainable=True)
            peers.append(peer.requires_grad_(True))
            names.append(peer_state["model_spec"]["name"])
        if parsed.deploy > len(peers):
            raise ConfigError(f"afd.deploy must be 0 (the student) .. {len(peers)} (the peers), got {parsed.deploy}")
        if parsed.deploy and names[parsed.deploy - 1] != spec["name"]:
            raise ConfigError(f"afd.deploy={parsed.deploy} is a {names[parsed.deploy - 1]} peer; the compressed run "
                              f"ships the student's architecture ({spec['name']}): deploy a peer of that model")
        taps = [last_tap(student, parsed.tap, "the student")]
        taps += [last_tap(peer, parsed.tap, f"peer {k}") for k, peer in enumerate(peers, start=1)]
        return cls(parsed, peers, taps, context.input_shape)

    # -- declarations

    def feature_taps(self) -> tuple[str, ...]:
        return (self.taps[0],)

    def output_keys(self) -> frozenset[str]:
        return frozenset({"afd_peer_logits", "afd_maps", "afd_disc_loss"})

    def auxiliaries(self) -> dict[str, Auxiliary]:
        if self.transfer is None or self.discriminators is None:
            raise ConfigError("afd: auxiliaries asked before wrap_model; the trainer wraps the model first")
        modules = {"peers": self.peers, "discriminators": self.discriminators}
        if any(True for _ in self.transfer.module.parameters()):
            modules["transfer"] = self.transfer
        return modules

    # -- building the transfer layers and discriminators

    def wrap_model(self, model: nn.Module) -> nn.Module:
        if not hasattr(model, "feature_taps"):
            raise ConfigError(f"afd: the student is a {type(model).__name__} without named stages (an int8 QAT graph "
                              "cannot be tapped); run --method afd first, then compress that run with --method qat")
        maps = self._probe(model)
        width = max(m.shape[1] for m in maps)
        size = (min(m.shape[2] for m in maps), min(m.shape[3] for m in maps))
        device = maps[0].device
        transfer = Transfer([m.shape[1] for m in maps], width, size).to(device)
        discriminators = Discriminators(len(maps), width, self.options.disc_channels, self.options.disc_layers)
        self.transfer = Auxiliary(transfer, lr=self.options.lr, weight_decay=self.options.weight_decay)
        self.discriminators = Auxiliary(discriminators.to(device), lr=self.options.disc_lr,
                                        weight_decay=self.options.disc_weight_decay, step_order=DISC_ORDER,
                                        optimizer=self.options.disc_optimizer)
        return model

    @torch.no_grad()
    def _probe(self, model: nn.Module) -> list[Tensor]:
        """Every network's tap maps for a zero batch, from copies in eval mode (no statistics move)."""
        device = next(model.parameters()).device
        x = torch.zeros((2, *self.input_shape), device=device)
        student = copy.deepcopy(model).eval()
        peers = copy.deepcopy(self.peers.module).to(device).eval()
        return [tapped_forward(student, self.taps[0], x)[0], *peers(x)[0]]

    # -- hook points

    def setup(self, trainer: Trainer) -> None:
        assert self.discriminators is not None
        others = [hook.label for hook in trainer.hooks if hook is not self]
        if self.options.deploy and others:
            raise ConfigError(f"afd.deploy={self.options.deploy} ships a peer that {', '.join(others)} did not compress "
                              "(they change the student, network 0); keep afd.deploy=0 when composing")
        first = next(self.discriminators.module.parameters())
        self.disc_optimizer = next(opt for opt in trainer.optimizers
                                   if any(p is first for group in opt.param_groups for p in group["params"]))

    def forward(self, trainer: Trainer, model: nn.Module, x: Tensor) -> dict[str, Tensor]:
        """Peers' forward, every network's transferred maps, then the discriminators' update."""
        assert self.transfer is not None
        self.peers.module.train()
        self.transfer.module.train()
        peer_maps, peer_logits = self.peers(x)
        maps = self.transfer([trainer.feature(self.taps[0]), *peer_maps])
        return {"afd_peer_logits": peer_logits, "afd_maps": maps, "afd_disc_loss": self.update_discriminators(trainer, maps)}

    def update_discriminators(self, trainer: Trainer, maps: Tensor) -> Tensor:
        """One step of the discriminators on detached maps (before the networks' loss exists); returns L_D."""
        assert self.discriminators is not None and self.disc_optimizer is not None
        self.discriminators.module.train()
        detached = maps.detach()
        fake, real = self.discriminators(detached, cyclic_reals(detached))
        loss = discriminator_loss(real, fake)
        self.disc_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if trainer.config.optim.grad_clip:
            nn.utils.clip_grad_norm_(list(self.discriminators.module.parameters()), trainer.config.optim.grad_clip)
        self.disc_optimizer.step()
        return loss.detach()

    def judge(self, maps: Tensor) -> Tensor:
        """D_k(F_k) with the discriminators' current weights detached: gradients reach the maps only.

        The buffers are copies, so this second look does not move D's batch-norm statistics.
        """
        assert self.discriminators is not None
        module = self.discriminators.module
        state = {**{name: p.detach() for name, p in module.named_parameters()},
                 **{name: b.clone() for name, b in module.named_buffers()}}
        return torch.func.functional_call(module, state, (maps,))

    def extra_losses(self, trainer: Trainer, outputs: dict[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
        """Peers' CE (the student's is the loop's task term), KD and adversarial terms per network, and L_D.

        ``disc`` is L_D of this step's discriminator update, detached: logged, no gradient.
        """
        from asc.train.loop import task_loss

        logits = torch.stack([outputs["logits"], *outputs["afd_peer_logits"].unbind()])
        count, t = len(logits), self.options.temperature
        losses = {f"ce{k}": task_loss(z, trainer.batch) for k, z in enumerate(logits) if k}
        for k in range(count):
            others = torch.cat([logits[:k], logits[k + 1:]]).mean(0)
            losses[f"kd{k}"] = self.options.kd_weight * kd_loss(logits[k], others, t)
        adversarial = adversarial_losses(self.judge(outputs["afd_maps"]))
        losses.update({f"adv{k}": self.options.alpha * adversarial[k] for k in range(count)})
        losses["disc"] = outputs["afd_disc_loss"]
        return losses

    def _deployed(self) -> nn.Module:
        return self.peers.module.nets[self.options.deploy - 1]

    def eval_forward(self, trainer: Trainer, model: nn.Module, x: Tensor) -> Tensor | None:
        """The deploy path: the student as is, or the shipped peer."""
        if not self.options.deploy:
            return None
        return self._deployed().eval()(x)

    def finalize(self, model: nn.Module) -> nn.Module:
        """Network ``deploy`` alone: no discriminator, no transfer layer."""
        return model if not self.options.deploy else copy.deepcopy(self._deployed()).eval()

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.finalize(model)

    def settings(self) -> dict[str, Any]:
        return {**asdict(self.options), "taps": self.taps}
