"""The ``Method`` protocol, the jobs a method does, and the registry that finds methods.

A method is a :class:`~asc.train.hooks.TrainHook` (training-time simulation: masks, fake-quant,
distillation losses; phases, auxiliary modules, feature taps) plus what the compression stage
needs to compose it with others, run it on a trained model and ship the result:

* ``jobs`` — the set of :class:`Job` it does. The stage refuses two methods that share a job
  (one owner per mask, one quantizer, one distillation) and orders a composition by job, so the
  pipeline, not the user's argument order, decides that channels are removed before masks are
  drawn, masks before fake-quant is inserted, and distillation wraps whatever the student became;
* ``build`` makes it from ``key=value`` options, so every method is reachable from the command
  line without code;
* ``prepare`` may change the architecture before training (structured pruning removes channels);
* ``finalize`` (from TrainHook) materializes the deployable module, and ``unwrap`` returns the
  float module under any wrapper, so the stage can also keep a float twin for size accounting.

A method joins the stage by decorating its class with :func:`register` in any module of the
``asc.compress`` package; :func:`method_classes` imports them all, so a new file is enough.
"""

from __future__ import annotations

import enum
import importlib
import pkgutil
from abc import ABCMeta, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from torch import nn

from asc.config import from_dict
from asc.train.hooks import TrainHook

T = TypeVar("T")


class Job(enum.IntEnum):
    """What a method does to the student; the values are the pipeline order."""

    STRUCTURE = 0  #: removes channels before training
    MASKS = 1  #: owns unstructured pruning masks
    QUANTIZATION = 2  #: simulates and ships low-bit weights
    DISTILLATION = 3  #: adds a teacher's loss

    @property
    def describe(self) -> str:
        return {Job.STRUCTURE: "channel removal", Job.MASKS: "pruning masks", Job.QUANTIZATION: "quantization",
                Job.DISTILLATION: "distillation"}[self]


@dataclass(frozen=True)
class StageContext:
    """What a method may need to know about the run being compressed."""

    source: Path  #: the trained run folder the weights come from
    input_shape: tuple[int, int, int]  #: one example's (channels, frequency, time)
    epochs: int  #: length of the compression run


class Method(TrainHook, metaclass=ABCMeta):
    """A compression method that the stage can build, compose, order and finalize."""

    name: ClassVar[str]
    jobs: ClassVar[frozenset[Job]]  #: what it does; PQK does masks, quantization and distillation
    quantizes: ClassVar[bool] = False  #: its finalized module stores int8 weights
    keeps_stages: ClassVar[bool] = True  #: after wrap_model the student still runs its named stage modules

    @classmethod
    @abstractmethod
    def build(cls, options: Mapping[str, Any], context: StageContext) -> Method:
        """The method configured by ``options`` (parsed ``key=value`` pairs of its prefix)."""

    @classmethod
    def pipeline_position(cls) -> int:
        """Where it sits in a composition: at its first job."""
        return min(cls.jobs)

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model to train, made from the trained one before any hook wraps it."""
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The float module under what :meth:`wrap_model` returned (it shares the weights)."""
        return model

    def settings(self) -> dict[str, Any]:
        """What configures this method, recorded in the compressed run's ``compress.yaml``."""
        return {}


_REGISTRY: dict[str, type[Method]] = {}

M = TypeVar("M", bound=type[Method])


def register(cls: M) -> M:
    """Class decorator: make ``cls`` available as ``--method <cls.name>``."""
    if not getattr(cls, "jobs", None):
        raise TypeError(f"{cls.__name__} declares no jobs; a method must do at least one")
    known = _REGISTRY.get(cls.name)
    if known is not None and known is not cls:
        raise TypeError(f"method name {cls.name!r} is taken by {known.__module__}.{known.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def method_classes() -> dict[str, type[Method]]:
    """Every registered method by name, after importing each module of ``asc.compress``.

    The building blocks (``asc.compress.methods``) come first, then the other method files in name
    order, so listings and error messages read the same however the modules were imported before.
    """
    import asc.compress

    importlib.import_module("asc.compress.methods")
    for module in pkgutil.iter_modules(asc.compress.__path__, "asc.compress."):
        importlib.import_module(module.name)
    blocks = [name for name, cls in _REGISTRY.items() if cls.__module__ == "asc.compress.methods"]
    return {name: _REGISTRY[name] for name in [*blocks, *sorted(set(_REGISTRY) - set(blocks))]}


def parse_options(cls: type[T], options: Mapping[str, Any], method: str) -> T:
    """Typed options of ``method`` with errors that name the ``method.key`` to fix."""
    return from_dict(cls, dict(options), where=f"{method}.")
