"""The building blocks as stage methods: ``structured``, ``prune``, ``qat`` and ``kd``.

Each adapter only adds option parsing and run-length-dependent setup to a building block of
:mod:`asc.compress.prune`, :mod:`asc.compress.quant` or :mod:`asc.compress.kd`; the behaviour is
the block's own. Composing them (``--method structured --method qat --method kd``) gives the
structured variant; ``prune`` + ``qat`` gives prune-and-quantize without distillation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from asc.compress.base import Job, Method, StageContext, parse_options, register
from asc.compress.kd import Distillation, ModelTeacher
from asc.compress.prune import (
    LayerSelection,
    MagnitudePruning,
    PruningSchedule,
    Scope,
    prune_channels,
)
from asc.compress.quant import Int8QAT, QATConfig
from asc.errors import ConfigError

if TYPE_CHECKING:
    from asc.train.loop import Trainer


@dataclass
class StructuredOptions:
    ratio: float = 0.5  #: fraction of the channels of every prunable group to remove
    round_to: int = 8  #: keep channel counts multiples of this (SIMD-friendly kernels)
    global_pruning: bool = False  #: rank groups against each other instead of pruning each by ``ratio``


@register
class StructuredPruning(Method):
    """Removes whole channels before fine-tuning, so the deployed model is physically smaller."""

    name = "structured"
    jobs = frozenset({Job.STRUCTURE})

    def __init__(self, options: StructuredOptions, context: StageContext) -> None:
        self.options = options
        self.context = context

    @classmethod
    def build(cls, options: Mapping[str, Any], context: StageContext) -> StructuredPruning:
        return cls(parse_options(StructuredOptions, options, cls.name), context)

    def prepare(self, model: nn.Module) -> nn.Module:
        example = torch.zeros((2, *self.context.input_shape), device=next(model.parameters()).device)
        return prune_channels(model, example, self.options.ratio, round_to=self.options.round_to,
                              global_pruning=self.options.global_pruning)

    def settings(self) -> dict[str, Any]:
        return asdict(self.options)


@dataclass
class PruneOptions:
    sparsity: float = 0.8  #: final fraction of zero weights in the pruned layers
    scope: str = "global"  #: "global": one threshold over all layers; "layer": the same sparsity in each
    start: float = 0.0  #: fraction of the training steps at which the ramp starts
    end: float = 0.75  #: fraction at which the final sparsity is reached; masks are frozen after it
    every: int = 16  #: refresh the masks every this many steps during the ramp
    include: str | None = None  #: regex of layer names to prune (default: all)
    exclude: str | None = None  #: regex of layer names to leave dense
    depthwise: bool = True  #: prune depthwise convs too
    keep_ends: bool = True  #: leave the stem and the classifier dense

    def __post_init__(self) -> None:
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ConfigError(f"prune: need 0 <= start ({self.start}) <= end ({self.end}) <= 1 (fractions of "
                              "the training steps); fix prune.start/prune.end")
        if self.scope not in ("global", "layer"):
            raise ConfigError(f"prune.scope must be global or layer, got {self.scope!r}")

    @property
    def selection(self) -> LayerSelection:
        return LayerSelection(self.include, self.exclude, self.depthwise, self.keep_ends)

    def schedule(self, total_steps: int) -> PruningSchedule:
        return PruningSchedule(self.sparsity, end_step=round(self.end * total_steps),
                               start_step=round(self.start * total_steps), every=self.every)


def total_steps(trainer: Trainer) -> int:
    return trainer.steps_per_epoch * trainer.config.train.epochs


@register
class PruneMethod(MagnitudePruning, Method):
    """Gradual unstructured magnitude pruning whose ramp is set in fractions of the run."""

    name = "prune"
    jobs = frozenset({Job.MASKS})

    def __init__(self, options: PruneOptions, *, keep_pruned_values: bool = False,
                 last_step: Callable[[Trainer], int] | None = None) -> None:
        """``last_step``: the latest step the ramp may end at, for a method that needs final masks by then."""
        scope: Scope = "global" if options.scope == "global" else "layer"
        super().__init__(selection=options.selection, scope=scope, keep_pruned_values=keep_pruned_values)
        self.options = options
        self.last_step = last_step

    @classmethod
    def build(cls, options: Mapping[str, Any], context: StageContext) -> PruneMethod:
        return cls(parse_options(PruneOptions, options, cls.name))

    def setup(self, trainer: Trainer) -> None:
        schedule = self.options.schedule(total_steps(trainer))
        if self.last_step is not None:
            schedule = replace(schedule, end_step=min(schedule.end_step, self.last_step(trainer)))
        self.schedule = schedule
        super().setup(trainer)

    def settings(self) -> dict[str, Any]:
        return asdict(self.options)


@register
class QATMethod(Int8QAT, Method):
    """Int8 quantization-aware training; its finalized module is the int8 QDQ graph."""

    name = "qat"
    jobs = frozenset({Job.QUANTIZATION})
    quantizes = True
    keeps_stages = False  #: the student becomes a traced int8 graph: no stage to tap

    @classmethod
    def build(cls, options: Mapping[str, Any], context: StageContext) -> QATMethod:
        return cls(context.input_shape, parse_options(QATConfig, options, cls.name))

    def unwrap(self, model: nn.Module) -> nn.Module:
        if self.float_model is None:
            raise ConfigError("qat: unwrap before wrap_model; the stage wraps the model first")
        return self.float_model

    def settings(self) -> dict[str, Any]:
        return asdict(self.config)


@dataclass
class KDOptions:
    teacher: str | None = None  #: run folder of the teacher (default: the run being compressed)
    checkpoint: str = "last"
    temperature: float = 2.0
    weight: float = 1.0


@register
class KDMethod(Distillation, Method):
    """Distillation from a trained run (by default the uncompressed model itself)."""

    name = "kd"
    jobs = frozenset({Job.DISTILLATION})

    def __init__(self, options: KDOptions, context: StageContext) -> None:
        teacher = ModelTeacher.from_run(context.source if options.teacher is None else options.teacher,
                                        options.checkpoint)
        super().__init__(teacher, temperature=options.temperature, weight=options.weight)
        self.options = options

    @classmethod
    def build(cls, options: Mapping[str, Any], context: StageContext) -> KDMethod:
        return cls(parse_options(KDOptions, options, cls.name), context)

    def settings(self) -> dict[str, Any]:
        return asdict(self.options)
