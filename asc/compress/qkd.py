"""QKD: quantization-aware knowledge distillation (Kim et al. 2019; methods.md §5).

The student trains through fake-quant with LSQ learned step sizes (Esser et al., ICLR 2020): every
conv/linear layer quantizes its weight (signed, symmetric ``[−(2^(b−1) − 1), 2^(b−1) − 1]``, one
step per output channel or per tensor) and its input (one step per tensor; unsigned ``[0, 2^b − 1]``
when the first batch it sees is non-negative, else signed). The quantizer is

    q(x; s) = s · round(clip(x / s, Qn, Qp))   with round's gradient passed straight through,

and the step's gradient is scaled by ``g = 1 / sqrt(N · Qp)`` (N: elements per step, per example
for activations), so ``∂q/∂s = g · (round(x/s) − x/s)`` inside the range and ``g · Qn`` / ``g · Qp``
outside it. Weight steps start at ``max |w| / Qp`` (the min-max grid), activation steps at the LSQ
``2 · mean |x| / sqrt(Qp)`` of the first training batch. The steps are parameters of the student, so
the run's optimizer and schedule train them and its checkpoints hold them.

Three phases (``self_study`` and ``co_study`` are fractions of the epochs, ``tutor`` is the rest):

* ``self-study`` — the quantized student learns from the labels alone;
* ``co-study`` — a full-precision teacher (a trained run, an auxiliary module with its own lr)
  trains with it: student ``CE + kd_weight · T² KL(p_T ‖ p_S)``, teacher
  ``teacher_weight · (CE + T² KL(p_S ‖ p_T))``, each side detaching the other (:func:`kd_loss`);
* ``tutor`` — the teacher is frozen (eval mode, no gradient) and only distils.

The teacher is updated only in co-study: in the other phases it gets no gradient, so the
optimizer skips it. Under DDP the activation steps start from the first batch of *all* ranks
(:func:`across_ranks`), so the replicas start, and stay, identical.

Deploy path: :meth:`QKD.finalize` returns a float module whose weights are the fake-quantized
weights (folded in, on the learned grid) and whose inputs still pass the learned activation
quantizers, so it reproduces the simulated accuracy. It also writes the learned grid
(``quant_grid.json``, :mod:`asc.compress.grid`: every layer's weight steps per output channel and
input step), from which :mod:`asc.export.grid` builds the int8 QDQ graph of a W8A8 student with
exactly these integers and scales instead of calibrating afresh. Lower widths have no int8 graph:
``qkd.json`` beside the report records the bit width and the model size in bits, and the report's
accuracy is the simulated one.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from asc.compress.base import Job, Method, StageContext, parse_options, register
from asc.compress.grid import InputGrid, LayerGrid, QuantGrid, per_channel
from asc.compress.kd import kd_loss
from asc.errors import ConfigError
from asc.io import atomic_write_text
from asc.train.hooks import Auxiliary, Phase

if TYPE_CHECKING:
    from asc.train.loop import Trainer

SELF_STUDY, CO_STUDY, TUTOR = "self-study", "co-study", "tutor"
REPORT_NAME = "qkd.json"


# ------------------------------------------------------------------------------ LSQ


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """``x`` in the forward, ``scale · ∂`` in the backward."""
    return (x - x * scale).detach() + x * scale


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` with an identity gradient (straight-through estimator)."""
    return (x.round() - x).detach() + x


def lsq(x: Tensor, step: Tensor, qn: int, qp: int, gradient_scale: float) -> Tensor:
    """LSQ fake-quant: ``step · round(clip(x / step, qn, qp))`` with the LSQ gradients.

    Without autograd (evaluation, folding) the step is used as stored: the gradient-scaling
    identity may move it by one float rounding, and the deployed grid is the stored step.
    """
    if torch.is_grad_enabled() and step.requires_grad:
        step = grad_scale(step, gradient_scale)
    return round_ste(torch.clamp(x / step, qn, qp)) * step


def across_ranks(value: Tensor, *, mean: bool) -> Tensor:
    """The mean (else the maximum) of ``value`` over the DDP ranks; ``value`` itself without DDP.

    Activation steps are initialized from the first training batch, which differs per rank; a
    parameter set in place after DDP's start-up broadcast would leave the replicas apart for good.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM if mean else dist.ReduceOp.MAX)  # gloo has no AVG
    return value / dist.get_world_size() if mean else value


MIN_STEP = 1e-8
"""Smallest step a quantizer holds: a step at or below zero (a large learning rate can push one
there) would divide by zero or flip the grid, and every later loss would be NaN."""


class LSQQuantizer(nn.Module):
    """A learned-step quantizer: per output channel (``channels``) or per tensor.

    ``signed`` None decides on the first training batch (non-negative inputs: unsigned). The
    step is initialized on the first training forward; ``initialized`` and ``signed`` are buffers,
    so a restored checkpoint does not initialize again.
    """

    def __init__(self, bits: int, *, signed: bool | None, channels: int | None = None, ndim: int = 1,
                 weight: bool = False) -> None:
        super().__init__()
        self.bits = bits
        self.weight = weight
        self.per_channel = channels is not None
        shape = (channels, *([1] * (ndim - 1))) if channels is not None else ()
        self.step = nn.Parameter(torch.ones(shape))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("signed", torch.tensor(bool(signed)))
        self.register_buffer("sign_known", torch.tensor(signed is not None))
        self._ready: tuple[int, int] | None = None  #: (Qn, Qp) once initialized

    def bounds(self) -> tuple[int, int]:
        if self.weight:  # restricted symmetric range, like the int8 export's weights
            return -(2 ** (self.bits - 1) - 1), 2 ** (self.bits - 1) - 1
        if bool(self.signed):
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    def elements_per_step(self, x: Tensor) -> int:
        """N of the LSQ gradient scale: elements sharing a step (per example for activations)."""
        if self.weight:
            return x[0].numel() if self.per_channel else x.numel()
        return x[0].numel() if x.dim() > 1 else x.numel()

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        if not bool(self.sign_known):
            self.signed.fill_(bool(across_ranks((x < 0).any().float(), mean=False)))
            self.sign_known.fill_(True)
        _, qp = self.bounds()
        if self.weight:  # the weights are the same on every rank
            flat = x.abs().flatten(1) if self.per_channel else x.abs().reshape(1, -1)
            step = (flat.amax(dim=1) / qp).reshape(self.step.shape)
        else:
            step = 2 * across_ranks(x.abs().mean(), mean=True) / math.sqrt(qp)
        self.step.copy_(step.clamp_min(MIN_STEP))
        self.initialized.fill_(True)

    @torch.no_grad()
    def keep_step_positive(self) -> None:
        """Project the step back to at least :data:`MIN_STEP` after an optimizer update."""
        self.step.clamp_(min=MIN_STEP)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = None  # read the restored buffers again

    def forward(self, x: Tensor) -> Tensor:
        if self._ready is None:  # the buffers are read once, not every step (a device sync on GPUs)
            self._ready = self.bounds() if bool(self.initialized) else None
        if self._ready is None:
            if not (self.training or self.weight):  # evaluated before any training step: no grid yet
                return x
            self.initialize(x.detach())
            self._ready = self.bounds()
        qn, qp = self._ready
        return lsq(x, self.step, qn, qp, 1.0 / math.sqrt(self.elements_per_step(x) * qp))


class FrozenQuantizer(nn.Module):
    """A trained :class:`LSQQuantizer` with its step fixed: plain fake-quant, exportable."""

    def __init__(self, quantizer: LSQQuantizer) -> None:
        super().__init__()
        self.qn, self.qp = quantizer.bounds()
        self.register_buffer("step", quantizer.step.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return torch.clamp(torch.round(x / self.step), self.qn, self.qp) * self.step


class _Quantized:
    """Mixin of a conv/linear layer whose weight and input pass LSQ quantizers."""

    weight_quant: nn.Module
    input_quant: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        x, weight = self.input_quant(x), self.weight_quant(self.weight)
        if isinstance(self, nn.Linear):
            return F.linear(x, weight, self.bias)
        return self._conv_forward(x, weight, self.bias)  # type: ignore[attr-defined]


class QuantConv1d(_Quantized, nn.Conv1d):
    pass


class QuantConv2d(_Quantized, nn.Conv2d):
    pass


class QuantLinear(_Quantized, nn.Linear):
    pass


_QUANTIZED = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
_FLOAT = {quantized: plain for plain, quantized in _QUANTIZED.items()}


def quantize_layers(model: nn.Module, bits: int, *, per_channel: bool = True, keep_ends: bool = True) -> dict[str, int]:
    """Turn every conv/linear layer of ``model`` into its LSQ-quantized twin in place; bits per layer.

    The weights stay the same parameters (same state-dict keys); the quantizers are added as
    ``<layer>.weight_quant`` and ``<layer>.input_quant``. ``keep_ends`` keeps the first and last
    layers at 8 bits.
    """
    layers = [(name, module) for name, module in model.named_modules() if type(module) in _QUANTIZED]
    if not layers:
        raise ConfigError(f"qkd: {type(model).__name__} has no conv or linear layers to quantize")
    widths = {}
    for index, (name, module) in enumerate(layers):
        width = 8 if keep_ends and index in (0, len(layers) - 1) else bits
        weight = module.weight
        module.__class__ = _QUANTIZED[type(module)]
        module.add_module("weight_quant", LSQQuantizer(width, signed=True, weight=True, ndim=weight.dim(),
                                                       channels=weight.shape[0] if per_channel else None))
        module.add_module("input_quant", LSQQuantizer(width, signed=None))
        module.weight_quant.to(weight.device).initialize(weight.detach())
        module.input_quant.to(weight.device)
        widths[name] = width
    return widths


@torch.no_grad()
def fold_weights(model: nn.Module, *, keep_input_quant: bool) -> nn.Module:
    """A copy whose weights are the fake-quantized weights; float classes unless ``keep_input_quant``."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        if type(module) not in _FLOAT:
            continue
        module.weight.copy_(module.weight_quant(module.weight))
        if keep_input_quant:
            module.weight_quant = nn.Identity()
            module.input_quant = FrozenQuantizer(module.input_quant)
        else:
            del module.weight_quant, module.input_quant
            module.__class__ = _FLOAT[type(module)]
    return model


# ------------------------------------------------------------------------------ the method


@dataclass
class QKDOptions:
    teacher: str | None = None  #: run folder of the full-precision teacher (default: the run being compressed)
    checkpoint: str = "last"
    bits: int = 8  #: weight and activation bit width (first and last layers stay at 8 with keep_ends)
    self_study: float = 0.3  #: fraction of the epochs the student trains alone
    co_study: float = 0.4  #: fraction of the epochs teacher and student train together; tutoring is the rest
    temperature: float = 2.0
    kd_weight: float = 1.0  #: weight of the student's distillation term (co-study and tutoring)
    teacher_weight: float = 1.0  #: weight of the teacher's loss (CE + KD from the student) in co-study
    teacher_lr: float | None = None  #: the teacher's learning rate (None: the run's)
    per_channel: bool = True  #: one weight step per output channel (else per tensor)
    keep_ends: bool = True  #: first and last layers at 8 bits

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"qkd.bits must be a whole number in [2, 8], got {self.bits!r}")
        if not (0.0 <= self.self_study <= 1.0 and 0.0 <= self.co_study <= 1.0 and self.self_study + self.co_study <= 1.0):
            raise ConfigError(f"qkd.self_study ({self.self_study}) and qkd.co_study ({self.co_study}) must be "
                              "fractions of the epochs that add up to at most 1")
        if self.kd_weight < 0 or self.teacher_weight < 0:
            raise ConfigError("qkd.kd_weight and qkd.teacher_weight must be >= 0")
        if self.teacher_lr is not None and self.teacher_lr <= 0:
            raise ConfigError(f"qkd.teacher_lr must be > 0, got {self.teacher_lr!r}")
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), self.temperature)  # validates the temperature


def load_teacher(run: Path, checkpoint: str) -> nn.Module:
    """A trainable float teacher from a run (a compressed run's float twin, not its finalized program)."""
    from asc.train.evaluate import load_run_model

    model, _ = load_run_model(Path(run), checkpoint, trainable=True)
    return model.requires_grad_(True)


@register
class QKD(Method):
    """LSQ-quantized student; self-study → co-study (mutual KD, teacher trains) → tutoring."""

    name = "qkd"
    jobs = frozenset({Job.QUANTIZATION, Job.DISTILLATION})

    def __init__(self, options: QKDOptions, teacher: nn.Module) -> None:
        self.options = options
        self.teacher = Auxiliary(teacher, lr=options.teacher_lr)
        self.phase = SELF_STUDY
        self.widths: dict[str, int] = {}
        self.quantizers: list[LSQQuantizer] = []
        self.run_dir: Path | None = None

    @classmethod
    def build(cls, options: Mapping[str, Any], context: StageContext) -> QKD:
        parsed = parse_options(QKDOptions, options, cls.name)
        return cls(parsed, load_teacher(context.source if parsed.teacher is None else Path(parsed.teacher),
                                        parsed.checkpoint))

    # -- declarations

    def phases(self) -> tuple[Phase, Phase, Phase]:
        return (Phase(SELF_STUDY, fraction=self.options.self_study), Phase(CO_STUDY, fraction=self.options.co_study),
                Phase(TUTOR))

    def auxiliaries(self) -> dict[str, Auxiliary]:
        return {"teacher": self.teacher}

    def output_keys(self) -> frozenset[str]:
        return frozenset({"teacher_logits"})

    # -- hook points

    def wrap_model(self, model: nn.Module) -> nn.Module:
        self.widths = quantize_layers(model, self.options.bits, per_channel=self.options.per_channel,
                                      keep_ends=self.options.keep_ends)
        self.quantizers = [module for module in model.modules() if isinstance(module, LSQQuantizer)]
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        return fold_weights(model, keep_input_quant=False)

    def setup(self, trainer: Trainer) -> None:
        self.run_dir = trainer.run_dir

    def on_phase_start(self, trainer: Trainer, phase: Phase) -> None:
        self.phase = phase.name

    def after_step(self, trainer: Trainer) -> None:
        for quantizer in self.quantizers:
            quantizer.keep_step_positive()

    def forward(self, trainer: Trainer, model: nn.Module, x: Tensor) -> dict[str, Tensor]:
        if self.phase == CO_STUDY:
            self.teacher.module.train()
            return {"teacher_logits": self.teacher(x)}
        if self.phase == TUTOR:
            self.teacher.module.eval()
            with torch.no_grad():
                return {"teacher_logits": self.teacher(x)}
        return {}

    def extra_losses(self, trainer: Trainer, outputs: dict[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
        from asc.train.loop import task_loss

        if self.phase == SELF_STUDY:
            return {}
        student, teacher, t = outputs["logits"], outputs["teacher_logits"], self.options.temperature
        losses = {"kd": self.options.kd_weight * kd_loss(student, teacher, t)}
        if self.phase == CO_STUDY:
            losses["teacher_ce"] = self.options.teacher_weight * task_loss(teacher, trainer.batch)
            losses["teacher_kd"] = self.options.teacher_weight * kd_loss(teacher, student, t)
        return losses

    def finalize(self, model: nn.Module) -> nn.Module:
        finalized = fold_weights(model, keep_input_quant=True).eval()
        if self.run_dir is not None:
            atomic_write_text(self.run_dir / REPORT_NAME, json.dumps(self.size_report(model), indent=2) + "\n")
            self.grid(model).save(self.run_dir)
        return finalized

    def grid(self, model: nn.Module) -> QuantGrid:
        """The learned grid of every quantized layer: weight steps per output channel, the input's step."""
        modules = dict(model.named_modules())
        layers = {}
        for name, width in self.widths.items():
            module = modules[name]
            steps, inputs = module.weight_quant.step, module.input_quant
            layers[name] = LayerGrid(width, per_channel(steps, module.weight.shape[0]),
                                     InputGrid(float(inputs.step.detach()), bool(inputs.signed), inputs.bits)
                                     if bool(inputs.initialized) else None)
        return QuantGrid(self.name, layers)

    def size_report(self, model: nn.Module) -> dict[str, Any]:
        """Bits of the deployable student: quantized weights at their width, everything else at 32."""
        modules = dict(model.named_modules())
        weight_bits = sum(modules[name].weight.numel() * width for name, width in self.widths.items())
        quantized = {id(modules[name].weight) for name in self.widths}
        steps = {id(p) for name in self.widths for p in modules[name].weight_quant.parameters()}
        other = sum(p.numel() for p in model.parameters() if id(p) not in quantized and id(p) not in steps)
        steps_count = sum(p.numel() for name in self.widths for p in modules[name].weight_quant.parameters())
        total = weight_bits + 32 * (other + steps_count)
        return {"bits": self.options.bits, "layer_bits": self.widths,
                "quantized_weights": sum(modules[name].weight.numel() for name in self.widths),
                "other_params": other, "weight_scales": steps_count, "size_bits": total,
                "size_bytes": math.ceil(total / 8),
                "deploy": "float module with the fake-quantized weights folded in and the learned activation "
                          "quantizers kept; its grid (quant_grid.json) gives the int8 export at bits=8"}

    def settings(self) -> dict[str, Any]:
        return asdict(self.options)
