"""FT: Factor Transfer (Kim et al., NeurIPS 2018; methods.md §11).

A trained teacher's last-stage feature map ``F_t`` (C_t channels) is compressed into a *factor* by
a paraphraser, and the student learns to produce the same factor from its own last-stage map
through a translator. Two phases (``paraphrase_epochs`` epochs, then the rest of the run):

* ``paraphrase`` — the teacher is frozen and the student is not run at all (so neither its
  weights nor its BN statistics, observers or optimizer state can move); the paraphraser
  (encoder: 3x3 convs C_t → C_t → k·C_t → k·C_t; decoder: 3x3 transposed convs k·C_t → k·C_t →
  C_t → C_t; bias, LeakyReLU 0.1 after every conv, no BN) learns to reconstruct ``F_t``
  (L1 as in the released code, or L2 as in the paper). No task loss;
* ``transfer`` — the paraphraser is frozen (its encoder runs without gradient, so the optimizer
  skips it: no weight decay, no momentum); the student and its translator (3x3 convs C_s → C_s →
  k·C_t → k·C_t, LeakyReLU 0.1) train on ``CE + beta · L_FT`` with

      L_FT = mean | f_S / ||f_S||₂ − f_T / ||f_T||₂ |   (each sample's factor flattened),

  ``f_T = encoder(F_t)``, ``f_S = translator(F_s)``. Where the two maps differ in F × T, the
  student's factor is resized to the teacher's (bilinear).

The teacher is a trained run (:meth:`~asc.compress.kd.ModelTeacher.from_run`; by default the run
being compressed, like ``kd`` and ``qkd``). Paraphraser and translator are auxiliary modules with
their own lr and weight decay, checkpointed by the trainer; only the student is finalized, the
auxiliaries are dropped. To be the only forward of the paraphrase phase, FT replaces the student's
training forward (``"logits"``), so it does not compose with another method that does (``map``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asc.compress.base import Job, Method, StageContext, parse_options, register
from asc.compress.kd import ModelTeacher
from asc.errors import AscError, ConfigError
from asc.models.registry import feature_taps
from asc.train.hooks import Auxiliary, Phase

if TYPE_CHECKING:
    from asc.train.loop import Trainer

PARAPHRASE, TRANSFER = "paraphrase", "transfer"
_LEAK = 0.1


def _chain(layers: list[nn.Module]) -> nn.Sequential:
    """Each conv followed by LeakyReLU 0.1, as in the released code (no normalization)."""
    return nn.Sequential(*(m for layer in layers for m in (layer, nn.LeakyReLU(_LEAK))))


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, bias=True)


def factor_channels(channels: int, rate: float) -> int:
    """Channels of the factor, ``k · C_t`` (at least one)."""
    return max(1, round(rate * channels))


class Paraphraser(nn.Module):
    """Encoder C_t → C_t → k·C_t → k·C_t and its mirror decoder; stride 1, so F × T is kept."""

    def __init__(self, channels: int, rate: float = 0.5) -> None:
        super().__init__()
        factor = factor_channels(channels, rate)
        self.encoder = _chain([_conv(channels, channels), _conv(channels, factor), _conv(factor, factor)])
        self.decoder = _chain([nn.ConvTranspose2d(factor, factor, 3, padding=1, bias=True),
                               nn.ConvTranspose2d(factor, channels, 3, padding=1, bias=True),
                               nn.ConvTranspose2d(channels, channels, 3, padding=1, bias=True)])

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction of ``x`` through the factor (what the paraphrase phase trains)."""
        return self.decoder(self.encoder(x))


class Translator(nn.Sequential):
    """The student's map C_s → C_s → k·C_t → k·C_t: its factor, comparable to the teacher's."""

    def __init__(self, channels: int, factor: int) -> None:
        super().__init__(*_chain([_conv(channels, channels), _conv(channels, factor), _conv(factor, factor)]))


def factor_loss(student_factor: Tensor, teacher_factor: Tensor) -> Tensor:
    """``mean |f_S/||f_S|| − f_T/||f_T|||`` per flattened sample; the teacher gets no gradient.

    A student factor of another F × T is resized to the teacher's first (bilinear).
    """
    if student_factor.shape[2:] != teacher_factor.shape[2:]:
        student_factor = F.interpolate(student_factor, size=teacher_factor.shape[2:], mode="bilinear",
                                       align_corners=False)
    student = F.normalize(student_factor.float().flatten(1), dim=1)
    teacher = F.normalize(teacher_factor.detach().float().flatten(1), dim=1)
    return (student - teacher).abs().mean()


def reconstruction_loss(reconstruction: Tensor, target: Tensor, norm: str) -> Tensor:
    """Mean L1 (released code) or squared L2 (paper) distance to the teacher's map."""
    diff = reconstruction.float() - target.detach().float()
    return diff.abs().mean() if norm == "l1" else diff.pow(2).mean()


@dataclass
class FTOptions:
    teacher: str | None = None  #: run folder of the trained teacher (default: the run being compressed)
    checkpoint: str = "last"  #: the teacher's checkpoint (``float`` for a compressed run)
    tap: str | None = None  #: the student's stage to translate (default: the teacher's stage name)
    teacher_tap: str | None = None  #: the teacher's stage to paraphrase (default: its last named stage)
    rate: float = 0.5  #: paraphrase rate k: the factor has k · C_t channels
    paraphrase_epochs: int = 5  #: length of the paraphrase phase; the student trains in the rest
    reconstruction: str = "l1"  #: the paraphraser's loss: l1 (released code) or l2 (paper)
    beta: float = 500.0  #: weight of the factor loss
    paraphraser_lr: float | None = None  #: None: the run's (the paper: SGD 0.1)
    paraphraser_weight_decay: float | None = None  #: None: the run's (the paper: 5e-4)
    translator_lr: float | None = None  #: None: the run's
    translator_weight_decay: float | None = None  #: None: the run's

    def __post_init__(self) -> None:
        if not 0.0 < self.rate <= 1.0:
            raise ConfigError(f"ft.rate must be in (0, 1], got {self.rate!r}")
        if isinstance(self.paraphrase_epochs, bool) or self.paraphrase_epochs < 1:
            raise ConfigError(f"ft.paraphrase_epochs must be a whole number >= 1, got {self.paraphrase_epochs!r}")
        if self.reconstruction not in ("l1", "l2"):
            raise ConfigError(f"ft.reconstruction must be l1 or l2, got {self.reconstruction!r}")
        if self.beta < 0:
            raise ConfigError(f"ft.beta must be >= 0, got {self.beta!r}")
        for key in ("paraphraser_lr", "translator_lr"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"ft.{key} must be > 0, got {getattr(self, key)!r}")
        for key in ("paraphraser_weight_decay", "translator_weight_decay"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ConfigError(f"ft.{key} must be >= 0, got {getattr(self, key)!r}")


def _stage(model: nn.Module, name: str | None, key: str, fix: str) -> tuple[str, nn.Module]:
    """The named stage ``name`` of ``model`` (None: its last), or a ConfigError naming ``ft.<key>``."""
    try:
        stages = feature_taps(model)
    except ConfigError:
        raise ConfigError(f"ft.{key}: {type(model).__name__} has no named stages whose feature maps FT can read; "
                          f"{fix}") from None
    if name is None:
        name = list(stages)[-1]
    if name not in stages:
        raise ConfigError(f"ft.{key}={name} is not a stage of {type(model).__name__}; valid: {', '.join(stages)}")
    return name, stages[name]


@torch.no_grad()
def _probe(model: nn.Module, stage: nn.Module, input_shape: tuple[int, ...]) -> torch.Size:
    """The (C, F, T) of ``stage``'s output for one example, measured in eval mode (nothing updates)."""
    seen: list[Tensor] = []
    handle = stage.register_forward_hook(lambda module, inputs, output: seen.append(output))
    was_training = model.training
    try:
        model.eval()
        model(torch.zeros((2, *input_shape), device=next(model.parameters()).device))
    finally:
        handle.remove()
        model.train(was_training)
    return seen[0].shape[1:]


@register
class FT(Method):
    """Factor transfer from a trained teacher: paraphrase (teacher frozen) → transfer (student + translator)."""

    name = "ft"
    jobs = frozenset({Job.DISTILLATION})

    def __init__(self, options: FTOptions, teacher: ModelTeacher, input_shape: tuple[int, int, int]) -> None:
        self.options = options
        self.teacher = teacher
        self.input_shape = input_shape
        self.teacher_tap, stage = _stage(teacher.model, options.teacher_tap, "teacher_tap",
                                         "give a float teacher (ft.checkpoint=float for a compressed run)")
        self.tap = options.tap or self.teacher_tap
        self.teacher_shape = _probe(teacher.model, stage, input_shape)
        self._teacher_map: Tensor | None = None
        stage.register_forward_hook(self._record_teacher)
        self.phase = PARAPHRASE
        self.paraphraser: Auxiliary | None = None
        self.translator: Auxiliary | None = None

    @classmethod
    def build(cls, options: Mapping[str, Any], context: StageContext) -> FT:
        parsed = parse_options(FTOptions, options, cls.name)
        source = context.source if parsed.teacher is None else Path(parsed.teacher)
        try:
            teacher = ModelTeacher.from_run(source, parsed.checkpoint)
        except AscError as error:
            raise ConfigError(f"ft.teacher={source}: not a trained run ({error}); give the run folder of a "
                              "trained teacher") from None
        if parsed.paraphrase_epochs >= context.epochs:
            raise ConfigError(f"ft.paraphrase_epochs={parsed.paraphrase_epochs} leaves no epoch of the "
                              f"{context.epochs}-epoch run for the student; lower it or raise train.epochs")
        return cls(parsed, teacher, context.input_shape)

    # -- declarations

    def phases(self) -> tuple[Phase, Phase]:
        return Phase(PARAPHRASE, epochs=self.options.paraphrase_epochs, task_loss=False), Phase(TRANSFER)

    def auxiliaries(self) -> dict[str, Auxiliary]:
        if self.paraphraser is None or self.translator is None:
            raise AscError("ft: auxiliaries asked before wrap_model; the trainer wraps the model first")
        return {**self.teacher.auxiliaries(), "paraphraser": self.paraphraser, "translator": self.translator}

    def feature_taps(self) -> tuple[str]:
        return (self.tap,)

    def output_keys(self) -> frozenset[str]:
        return frozenset({"logits", "ft_reconstruction", "ft_teacher_map", "ft_student_factor", "ft_teacher_factor"})

    # -- hook points

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Build paraphraser and translator for the student as it will train (e.g. after channel removal).

        Built here, after the trainer seeded the run, so two runs of one config start alike.
        """
        _, stage = _stage(model, self.tap, "tap", "compose ft with methods that keep the float student "
                          "(structured, prune), not with an exported graph (qat)")
        student_channels = _probe(model, stage, self.input_shape)[0]
        options = self.options
        paraphraser = Paraphraser(self.teacher_shape[0], options.rate)
        translator = Translator(student_channels, factor_channels(self.teacher_shape[0], options.rate))
        self.paraphraser = Auxiliary(paraphraser, lr=options.paraphraser_lr,
                                     weight_decay=options.paraphraser_weight_decay)
        self.translator = Auxiliary(translator, lr=options.translator_lr,
                                    weight_decay=options.translator_weight_decay)
        return model

    def on_phase_start(self, trainer: Trainer, phase: Phase) -> None:
        self.phase = phase.name

    def _record_teacher(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        self._teacher_map = output

    def _teacher_features(self, trainer: Trainer, x: Tensor) -> Tensor:
        self._teacher_map = None
        self.teacher.logits(trainer, x)  # frozen, eval mode, no gradient; the stage hook keeps its map
        assert self._teacher_map is not None  # its stage ran in the probe at build time
        return self._teacher_map

    def forward(self, trainer: Trainer, model: nn.Module, x: Tensor) -> dict[str, Tensor]:
        assert self.paraphraser is not None and self.translator is not None  # built in wrap_model
        teacher_map = self._teacher_features(trainer, x)
        if self.phase == PARAPHRASE:  # the student is not run: nothing of it can change
            return {"ft_reconstruction": self.paraphraser(teacher_map), "ft_teacher_map": teacher_map}
        logits = model(x)
        with torch.no_grad():  # frozen: no gradient, so its optimizer skips it (no decay, no momentum)
            teacher_factor = self.paraphraser.module.encoder(teacher_map)
        return {"logits": logits, "ft_student_factor": self.translator(trainer.feature(self.tap)),
                "ft_teacher_factor": teacher_factor}

    def extra_losses(self, trainer: Trainer, outputs: dict[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
        if self.phase == PARAPHRASE:
            return {"reconstruction": reconstruction_loss(outputs["ft_reconstruction"], outputs["ft_teacher_map"],
                                                          self.options.reconstruction)}
        return {"factor": self.options.beta * factor_loss(outputs["ft_student_factor"], outputs["ft_teacher_factor"])}

    def settings(self) -> dict[str, Any]:
        return {**asdict(self.options), "tap": self.tap, "teacher_tap": self.teacher_tap}
