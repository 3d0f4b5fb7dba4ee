"""Models by name, so configs and the CLI can choose one without importing classes."""

from __future__ import annotations

import inspect
import typing
from typing import Any

from torch import nn

from asc.config import check_value
from asc.errors import ConfigError
from asc.models.baseline import DCASE2021Baseline
from asc.models.bcresnet import BCResNet, BCResNetMod
from asc.models.cpmobile import CPMobile

_MODELS: dict[str, type[nn.Module]] = {
    "bcresnet": BCResNet,
    "bcresnet_mod": BCResNetMod,
    "dcase2021_baseline": DCASE2021Baseline,
    "dcase2024_baseline": CPMobile,  # simplified CP-Mobile, published defaults (also the 2025 baseline)
}


def model_names() -> tuple[str, ...]:
    """Names accepted by :func:`build_model`."""
    return tuple(_MODELS)


def model_options(name: str) -> tuple[str, ...]:
    """Keyword options of a model (besides ``num_classes``), for help texts and validation."""
    cls = _model_class(name)
    params = inspect.signature(cls.__init__).parameters
    return tuple(p for p in params if p not in ("self", "num_classes"))


def build_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a model by name; a misspelt option is an error, not silently ignored."""
    cls = _model_class(name)
    valid = model_options(name)
    for key in kwargs:
        if key not in valid:
            raise ConfigError(f"model {name!r} has no option {key!r}; valid: {', '.join(valid)}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
    hints = typing.get_type_hints(cls.__init__)
    checked = {key: check_value(hints[key], value, f"model.args.{key}") if key in hints else value
               for key, value in kwargs.items()}
    return cls(num_classes=num_classes, **checked)


def feature_taps(model: nn.Module) -> dict[str, nn.Module]:
    """The model's named stages (``model.feature_taps()``), for methods that read feature maps."""
    taps = getattr(model, "feature_taps", None)
    if taps is None:
        raise ConfigError(f"{type(model).__name__} exposes no named stages (feature_taps); "
                          "use a BC-ResNet model or add feature_taps() to it")
    return dict(taps())


def _model_class(name: str) -> type[nn.Module]:
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; valid: {', '.join(_MODELS)}")
    return _MODELS[name]
