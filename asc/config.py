"""Typed configuration: nested dataclasses, YAML files and ``key=value`` overrides.

Configs are plain dataclasses so that every setting has a type, a default and a docstring-able
home. YAML files and command-line overrides are validated against those types: an unknown key or a
value of the wrong type is a :class:`~asc.errors.ConfigError` naming the key, never a silent
default.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from asc.augment import AugmentConfig
from asc.errors import ConfigError
from asc.feature_spec import FeatureConfig

T = TypeVar("T")


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as nested plain dicts (YAML- and JSON-serialisable)."""
    return dataclasses.asdict(config)


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from nested dicts, checking keys and value types."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [key for key in data if key not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f"; did you mean '{where}{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
        raise ConfigError(f"unknown config key '{where}{key}'{hint}")
    values = {name: _coerce(hints[name], data[name], f"{where}{name}") for name in data}
    return cls(**values)


def check_value(hint: Any, value: Any, key: str) -> Any:
    """``value`` checked against the annotation ``hint`` as config keys are (converted where it is
    lossless); a mismatch is a :class:`ConfigError` naming ``key``."""
    return _coerce(hint, value, key)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``hint``, converting where it is lossless."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return from_dict(hint, value, where=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"config key '{key}' cannot be {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"config key '{key}' must be {hint.__name__}, got {value!r}")
    return value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["optim.lr=0.01", "model.args.width=80"]`` into a nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. optim.lr=0.01)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{part}'")
        node[parts[-1]] = value
    return nested


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning I/O and syntax problems into one-line errors."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file; give the path of a .yaml file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; check the path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8); give a YAML config file") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a mapping of config keys, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> T:
    """Defaults ← ``base`` ← YAML file ← overrides, validated into ``cls``."""
    data = dict(base or {})
    if path is not None:
        data = merge(data, read_yaml(path))
    if overrides:
        data = merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def override_data(data: DataConfig, overrides: typing.Sequence[str] = (), **values: Any) -> DataConfig:
    """``data`` with ``values`` and ``data.KEY=VALUE`` overrides applied, validated like a run config.

    Evaluating a run or a bundle on another collection changes only where and how clips are read;
    an override of any other section is refused rather than silently ignored.
    """
    nested = parse_overrides(list(overrides))
    if other := [key for key in nested if key != "data"]:
        raise ConfigError(f"override '{other[0]}…' does not apply here; only data.* settings do "
                          "(e.g. data.label_column=category)")
    merged = merge(merge(to_dict(data), values), nested.get("data", {}))
    return from_dict(DataConfig, merged, where="data.")


def save_yaml(data: dict[str, Any], path: str | Path) -> None:
    """Write a mapping as YAML atomically."""
    from asc.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(data, sort_keys=False))


# ------------------------------------------------------------------------------ run configuration


@dataclasses.dataclass
class DataConfig:
    """Where clips come from, how a collection's table or folders are read, and how they are cached.

    ``root`` is a TAU folder, a CSV/TSV table or a class-per-folder tree (``format=auto`` tells
    them apart); every other table and folder setting below is an option, so any labelled collection
    loads without code (docs/datasets.md).
    """

    root: str | None = None  #: TAU folder, table file or class-per-folder tree; None → the synthetic corpus
    format: typing.Literal["auto", "tau", "table", "folders"] = "auto"
    # --- tables (format=table)
    audio_dir: str | None = None  #: folder the table's paths are relative to (default: the table's folder)
    path_column: str = "filename"
    path_template: str | None = None  #: e.g. "fold{fold}/{slice_file_name}": {column} fields, replaces path_column
    label_column: str = "scene_label"
    device_column: str | None = None  #: None: no device column
    device_pattern: str | None = None  #: regex on the file name; group 1 (or group "device") is the device
    fold_column: str | None = None
    split_column: str | None = None  #: a column naming each row's split (train, evaluate, test, …)
    separator: str | None = None  #: None → sniffed from the header (tab, comma or semicolon)
    # --- splits of tables and folders: by fold (folds are the values of fold_column; a collection
    # without a fold column, split column or split folders gets num_folds seeded, stratified folds)
    train_folds: list[str] | None = None  #: None → every fold that is neither eval nor test
    eval_folds: list[str] | None = None  #: None → the last fold (only for assigned folds)
    test_folds: list[str] = dataclasses.field(default_factory=list)
    num_folds: int = 5
    split_seed: int = 0
    # --- the synthetic corpus (root=None)
    synth_preset: str = "quick"
    synth_seed: int = 0
    synth_dir: str | None = None  #: where the synthetic corpus lives (default: <cache_dir>/synthetic/…)
    ir_dir: str | None = None  #: impulse responses for the synthetic corpus' IR devices
    # --- every format
    train_split: str = "train"
    eval_split: str = "evaluate"
    missing_audio: typing.Literal["error", "skip"] = "error"  #: skip: use a partial download's files
    clip_seconds: float | None = None  #: None → the length of the dataset's first clip
    cache_dir: str | None = None  #: decode/feature caches (default: $ASC_CACHE or ~/.cache/asc)
    cache_features: bool = True  #: precompute log-mels when no augmentation needs raw audio
    balanced_devices: bool = False  #: draw training clips so every device is equally likely
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.num_folds < 2:
            raise ConfigError(f"data.num_folds={self.num_folds} must be at least 2")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be 0 (load in the main process) or more")
        if self.clip_seconds is not None and self.clip_seconds <= 0:
            raise ConfigError(f"data.clip_seconds={self.clip_seconds} must be positive, or null for the "
                              "dataset's own clip length")
        if self.device_column is not None and self.device_pattern is not None:
            raise ConfigError("data.device_column and data.device_pattern both name the device; set one of them")
        if self.fold_column is not None and self.split_column is not None:
            raise ConfigError("data.fold_column and data.split_column both split the table; set one of them")


@dataclasses.dataclass
class ModelConfig:
    name: str = "bcresnet_mod"
    args: dict[str, Any] = dataclasses.field(default_factory=lambda: {"width": 40})


OptimizerName = typing.Literal["sgd", "adamw"]
OPTIMIZERS: tuple[str, ...] = typing.get_args(OptimizerName)


@dataclasses.dataclass
class OptimConfig:
    name: OptimizerName = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-3
    warmup_epochs: float = 1.0  #: linear warm-up, then cosine decay to zero, per iteration
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        for key, value in (("lr", self.lr), ("grad_clip", self.grad_clip)):
            if value is not None and value <= 0:
                raise ConfigError(f"optim.{key}={value} must be positive")
        for key, value in (("weight_decay", self.weight_decay), ("warmup_epochs", self.warmup_epochs)):
            if value < 0:
                raise ConfigError(f"optim.{key}={value} must be 0 or more")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum={self.momentum} must be in [0, 1)")


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"  #: auto | cpu | cuda | cuda:N
    amp: bool = True  #: bfloat16 autocast on CUDA (ignored on CPU)
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        for key, value in (("epochs", self.epochs), ("batch_size", self.batch_size),
                           ("eval_batch_size", self.eval_batch_size)):
            if value < 1:
                raise ConfigError(f"train.{key}={value} must be at least 1")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"train.device={self.device!r} must be auto, cpu, cuda or cuda:N")


@dataclasses.dataclass
class RunConfig:
    """Everything that defines a training run; saved as ``config.yaml`` in the run folder."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    features: FeatureConfig = dataclasses.field(default_factory=FeatureConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
