"""``bundle.json``: what an app needs to feed an exported model, readable without torch.

The exporter (:mod:`asc.export`) writes it and the runtime (:mod:`asc.runtime`) reads it; both go
through :class:`BundleManifest`, so the two sides cannot drift. Only plain JSON types are stored,
so a phone app parses the same file with any JSON library.

A bundle may also hold device-specific models (DCASE 2025): ``device_models`` maps a recording
device to its own graph under ``devices/<device>/``, beside the general ``model_file`` that answers
for every other device. :func:`combine_bundles` builds such a bundle from ordinary ones; it lives
here, not in :mod:`asc.export`, because combining is a file operation and must not import torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import asc
from asc.errors import AscError
from asc.feature_spec import FeatureConfig
from asc.io import default_mode, make_dir

BUNDLE_FORMAT = 1
MANIFEST_NAME = "bundle.json"
PARITY_NAME = "parity.json"
GENERAL_MODEL = "general"  #: the name of the model that answers for unknown or missing devices
DEVICES_DIR = "devices"  #: where a combined bundle keeps each device's files: ``devices/<device>/``
#: names a device may not have: the general model's, and the CLI's "read it from the file name"
RESERVED_DEVICES = frozenset({GENERAL_MODEL, "auto"})
_DEVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+]*")

Precision = Literal["fp32", "int8"]


@dataclass(frozen=True)
class BundleModel:
    """One graph of a bundle: its files (relative to the bundle folder) and what was measured on it.

    The general model's entry is built from the manifest's top-level fields; each device model's
    is stored in ``device_models``, so the rule "every graph ships with its own parity" holds per model.
    """

    model_file: str
    ort_file: str | None = None
    container_file: str | None = None
    parity_file: str | None = None
    precision: Precision = "fp32"
    metrics: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    def model_path(self, bundle_dir: str | Path) -> Path:
        """The ONNX model's file in ``bundle_dir``: ``model_file``, or the container when only it was shipped."""
        bundle_dir = Path(bundle_dir)
        if self.container_file and not (bundle_dir / self.model_file).is_file():
            return bundle_dir / self.container_file
        return bundle_dir / self.model_file


@dataclass(frozen=True)
class BundleManifest:
    """The contents of ``bundle.json``.

    With ``frontend_in_graph`` the model input is raw mono PCM ``(batch, clip_samples)`` in
    [-1, 1] at ``sample_rate``; otherwise it is the log-mel ``(batch, 1, n_mels, frames)`` that
    ``frontend`` (an :class:`~asc.feature_spec.FeatureConfig` as a dict) defines.
    """

    labels: list[str]
    sample_rate: int
    clip_samples: int
    frontend: dict[str, Any]
    frontend_in_graph: bool
    precision: Precision
    input_name: str
    input_shape: list[int | str]  #: "batch" marks the dynamic dimension
    output_name: str = "logits"
    model_file: str = "model.onnx"
    ort_file: str | None = None  #: ORT-format copy for reduced runtime builds and faster loading
    frontend_file: str | None = None  #: the front end's window and mel filterbank (npz), for an external front end
    #: ``model_file`` compressed with xz (byte-exact): what an app ships when size matters; it may
    #: ship it alone and unpack it once (asc.runtime reads it when ``model_file`` is absent)
    container_file: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  #: accuracy and parity measured at export
    source: dict[str, Any] = field(default_factory=dict)  #: run folder, checkpoint, method that made it
    asc_version: str = ""
    format: int = BUNDLE_FORMAT
    #: device -> its own model (DCASE 2025); clips of any other device, or none, go to the general model
    device_models: dict[str, BundleModel] = field(default_factory=dict)

    @property
    def clip_seconds(self) -> float:
        return self.clip_samples / self.sample_rate

    @property
    def features(self) -> FeatureConfig:
        return FeatureConfig.from_dict(self.frontend)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def read(cls, bundle_dir: str | Path) -> BundleManifest:
        """Load and validate ``bundle_dir/bundle.json``; every problem is one clear AscError."""
        path = Path(bundle_dir) / MANIFEST_NAME
        if not path.is_file():
            raise AscError(f"{path}: no bundle manifest here; point at a folder written by `asc export`")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise AscError(f"{path}: not readable JSON ({error}); re-export the bundle") from None
        if not isinstance(data, dict):
            raise AscError(f"{path}: expected a JSON object; re-export the bundle")
        if data.get("format") != BUNDLE_FORMAT:
            raise AscError(f"{path}: bundle format {data.get('format')!r}, this asc reads {BUNDLE_FORMAT}; "
                           "re-export the bundle with this asc version")
        names = {f.name for f in fields(cls)}
        missing = sorted(f.name for f in fields(cls)
                         if f.name not in data and f.default is MISSING and f.default_factory is MISSING)
        if missing:
            raise AscError(f"{path}: missing keys {missing}; re-export the bundle")
        try:
            values = {key: value for key, value in data.items() if key in names}
            devices = values.get("device_models") or {}
            if not isinstance(devices, dict) or not all(isinstance(entry, dict) for entry in devices.values()):
                raise TypeError("device_models must map each device to an object with its model_file")
            known = {f.name for f in fields(BundleModel)}  # like the top level: newer keys are ignored
            values["device_models"] = {str(device): BundleModel(**{k: v for k, v in entry.items() if k in known})
                                       for device, entry in devices.items()}
            manifest = cls(**values)
            manifest.features  # noqa: B018 -- validates the front-end spec
            for device in manifest.device_models:
                check_device_name(device)
        except (TypeError, AscError) as error:
            raise AscError(f"{path}: invalid manifest ({error}); re-export the bundle") from None
        for name, model in manifest.models.items():
            if not model.model_path(path.parent).is_file():
                what = "model file" if name == GENERAL_MODEL else f"model file of device {name!r}"
                raise AscError(f"{path.parent / model.model_file}: the bundle's {what} is missing; "
                               "copy the whole bundle folder or re-export it")
        return manifest

    @property
    def general(self) -> BundleModel:
        """The general model, as an entry like the device models' ones."""
        return BundleModel(self.model_file, self.ort_file, self.container_file, PARITY_NAME, self.precision,
                           self.metrics, self.source)

    @property
    def models(self) -> dict[str, BundleModel]:
        """Every graph by name: ``general`` first, then the devices in manifest order."""
        return {GENERAL_MODEL: self.general, **self.device_models}

    def model_for(self, device: str | None) -> str:
        """The name of the model that answers for ``device``: its own, else ``general``."""
        return device if device is not None and device in self.device_models else GENERAL_MODEL

    def model_path(self, bundle_dir: str | Path) -> Path:
        """The general ONNX model's file in ``bundle_dir`` (see :meth:`BundleModel.model_path`)."""
        return self.general.model_path(bundle_dir)


def check_device_name(device: str) -> str:
    """``device`` if it can name a model and its folder, else one AscError saying what is allowed."""
    if not isinstance(device, str) or not _DEVICE_NAME.fullmatch(device) or device in RESERVED_DEVICES:
        raise AscError(f"device name {device!r}: use letters, digits, '_', '.', '+' (starting with a letter or "
                       f"digit), other than {sorted(RESERVED_DEVICES)}")
    return device


# ---------------------------------------------------------------------------------------------
# Bundle folders: written whole or not at all, and combined from per-device bundles


def check_destination(out_dir: Path) -> None:
    """Refuse an ``--out`` that is a file, or a non-empty folder that is not a bundle (never overwritten)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise AscError(f"{out_dir}: is a file; give --out a folder path for the bundle")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise AscError(f"{out_dir}: exists and is not an asc bundle; choose a new or empty folder for --out")


@contextmanager
def atomic_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a hidden sibling folder; on success it replaces ``out_dir`` (kept as is on failure)."""
    make_dir(out_dir.parent)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    stage.chmod(default_mode(directory=True))  # mkdtemp makes it private; a bundle is meant to be shared
    try:
        yield stage
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, old)
            try:
                os.replace(stage, out_dir)
            except OSError:
                os.replace(old, out_dir)
                raise
            shutil.rmtree(old)
        else:
            os.replace(stage, out_dir)
    finally:
        if stage.exists():
            shutil.rmtree(stage)


#: what must be equal for a device model to stand in for the general one on the same input
_SHARED_FIELDS = ("labels", "sample_rate", "clip_samples", "frontend_in_graph", "input_name", "input_shape",
                  "output_name")
_SAME_SETTINGS = "export every device model with the general model's labels, clip length and front end"


def _check_compatible(general: BundleManifest, general_dir: Path, other: BundleManifest, other_dir: Path) -> None:
    """One AscError naming ``other_dir`` when its model cannot take the general model's input or labels."""
    for name in _SHARED_FIELDS:
        ours, theirs = getattr(general, name), getattr(other, name)
        if ours != theirs:
            raise AscError(f"{other_dir}: {name} {theirs!r} differs from the general bundle {general_dir}'s "
                           f"{ours!r}; {_SAME_SETTINGS}")
    if other.features != general.features:
        changed = sorted(key for key, value in other.features.to_dict().items()
                         if general.features.to_dict().get(key) != value)
        raise AscError(f"{other_dir}: front-end spec differs from the general bundle {general_dir}'s "
                       f"(in {', '.join(changed)}); {_SAME_SETTINGS}")


def combine_bundles(general_dir: str | Path, device_dirs: Mapping[str, str | Path],
                    out_dir: str | Path) -> BundleManifest:
    """Write ``out_dir``: the bundle ``general_dir`` plus each device's bundle under ``devices/<device>/``.

    Every device bundle must take the same input and give the same labels as the general one
    (labels, sample rate, clip length, front-end spec, input/output names and shape); each keeps its
    own precision, files (ONNX, xz, ORT), ``parity.json`` and export metrics under its device key.
    Each source graph is opened with onnxruntime first, so a broken file is refused by its source
    path; the folder then appears whole (:func:`atomic_dir`) or not at all.
    """
    # imported here: the runtime imports this module. Opening a Classifier checks the graph's I/O.
    from asc.runtime import Classifier, open_session, session_options

    general_dir, out_dir = Path(general_dir), Path(out_dir)
    if not device_dirs:
        raise AscError(f"{general_dir}: no device bundles to combine; give at least one DEVICE=BUNDLE")
    devices = {check_device_name(device): Path(path) for device, path in device_dirs.items()}
    sources = {GENERAL_MODEL: general_dir, **devices}
    check_destination(out_dir)
    for name, source in sources.items():
        if source.resolve() == out_dir.resolve():
            raise AscError(f"{out_dir}: is the {name} input bundle and would be replaced; choose another --out")
    manifests = {name: Classifier(source).manifest for name, source in sources.items()}  # each graph loads
    for name, manifest in manifests.items():  # the ONNX file too: a loadable model.ort is preferred over it
        open_session(manifest.model_path(sources[name]), session_options(1))
    general = manifests[GENERAL_MODEL]
    for name, manifest in manifests.items():
        if manifest.device_models:
            raise AscError(f"{sources[name]}: already holds device models {sorted(manifest.device_models)}; "
                           "combine the plain per-device bundles instead")
        _check_compatible(general, general_dir, manifest, sources[name])
    with atomic_dir(out_dir) as stage:
        shutil.copytree(general_dir, stage, dirs_exist_ok=True,  # a stray devices/ folder is not carried over
                        ignore=lambda folder, names: [DEVICES_DIR] if Path(folder) == general_dir else [])
        entries = {}
        for device, source in devices.items():
            manifest, folder = manifests[device], f"{DEVICES_DIR}/{device}"
            skip = {MANIFEST_NAME, manifest.frontend_file}  # the front end is the general one's
            (stage / folder).mkdir(parents=True)
            for file in sorted(source.iterdir()):
                if file.is_file() and file.name not in skip:
                    shutil.copy2(file, stage / folder / file.name)

            def shipped(name: str | None, folder: str = folder) -> str | None:
                return f"{folder}/{name}" if name and (stage / folder / name).is_file() else None

            entries[device] = BundleModel(
                model_file=f"{folder}/{manifest.model_file}", ort_file=shipped(manifest.ort_file),
                container_file=shipped(manifest.container_file), parity_file=shipped(PARITY_NAME),
                precision=manifest.precision, metrics=manifest.metrics,
                source={**manifest.source, "bundle": str(source.resolve())})
        combined = replace(general, asc_version=asc.__version__, device_models=entries)
        (stage / MANIFEST_NAME).write_text(combined.to_json())
        BundleManifest.read(stage)  # what the runtime will read must read back
    return combined
