"""The ``Method`` protocol: what a compression method adds to the training loop's hooks.

A method is a :class:`~asc.train.hooks.TrainHook` (training-time simulation: masks, fake-quant,
distillation losses) plus three things the compression stage needs to run it on a trained model
and to ship the result:

* ``build`` makes it from ``key=value`` options, so every method is reachable from the command
  line without code;
* ``prepare`` may change the architecture before training (structured pruning removes channels);
* ``finalize`` (from TrainHook) materializes the deployable module, and ``unwrap`` returns the
  float module under any wrapper, so the stage can also keep a float twin for size accounting.

``order`` fixes where a method sits in a composition, so the pipeline, not the user's argument
order, decides that channels are removed before masks are drawn, masks before fake-quant is
inserted, and distillation wraps whatever the student has become.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from torch import nn

from asc.config import from_dict
from asc.train.hooks import TrainHook

T = TypeVar("T")


@dataclass(frozen=True)
class StageContext:
    """What a method may need to know about the run being compressed."""

    source: Path  #: the trained run folder the weights come from
    input_shape: tuple[int, int, int]  #: one example's (channels, frequency, time)
    epochs: int  #: length of the compression run


class Method(TrainHook, metaclass=ABCMeta):
    """A compression method that the stage can build, order and finalize."""

    name: ClassVar[str]
    order: ClassVar[int]  #: structure 0 < masks 1 < quantization 2 < distillation 3
    quantizes: ClassVar[bool] = False  #: its finalized module stores int8 weights

    @classmethod
    @abstractmethod
    def build(cls, options: Mapping[str, Any], context: StageContext) -> Method:
        """The method configured by ``options`` (parsed ``key=value`` pairs of its prefix)."""

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model to train, made from the trained one before any hook wraps it."""
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The float module under what :meth:`wrap_model` returned (it shares the weights)."""
        return model

    def settings(self) -> dict[str, Any]:
        """What configures this method, recorded in the compressed run's ``compress.yaml``."""
        return {}


def parse_options(cls: type[T], options: Mapping[str, Any], method: str) -> T:
    """Typed options of ``method`` with errors that name the ``method.key`` to fix."""
    return from_dict(cls, dict(options), where=f"{method}.")
