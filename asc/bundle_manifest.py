"""``bundle.json``: what an app needs to feed an exported model, readable without torch.

The exporter (:mod:`asc.export`) writes it and the runtime (:mod:`asc.runtime`) reads it; both go
through :class:`BundleManifest`, so the two sides cannot drift. Only plain JSON types are stored,
so a phone app parses the same file with any JSON library.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from asc.errors import AscError
from asc.feature_spec import FeatureConfig

BUNDLE_FORMAT = 1
MANIFEST_NAME = "bundle.json"
PARITY_NAME = "parity.json"

Precision = Literal["fp32", "int8"]


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
            manifest = cls(**{key: value for key, value in data.items() if key in names})
            manifest.features  # noqa: B018 -- validates the front-end spec
        except (TypeError, AscError) as error:
            raise AscError(f"{path}: invalid manifest ({error}); re-export the bundle") from None
        if not manifest.model_path(path.parent).is_file():
            raise AscError(f"{path.parent / manifest.model_file}: the bundle's model file is missing; "
                           "copy the whole bundle folder or re-export it")
        return manifest

    def model_path(self, bundle_dir: str | Path) -> Path:
        """The ONNX model's file in ``bundle_dir``: ``model_file``, or the container when only it was shipped."""
        bundle_dir = Path(bundle_dir)
        if self.container_file and not (bundle_dir / self.model_file).is_file():
            return bundle_dir / self.container_file
        return bundle_dir / self.model_file
