"""Evaluate a trained run on any split of any dataset, the same way the training loop does."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from asc.config import RunConfig, load_config, override_data
from asc.data.clips import Clip
from asc.data.loader import ClipDataset, make_loader
from asc.errors import AscError
from asc.features import FeatureConfig
from asc.models import build_model
from asc.run_files import (
    COMPRESS_PLAN_NAME,
    FINALIZED_NAME,
    FLOAT_CHECKPOINT,
    checkpoint_file,
    deployed_file,
    trainable_checkpoint,
)
from asc.train.checkpoint import load_checkpoint, load_finalized
from asc.train.data import (
    clip_samples,
    clipset_devices,
    make_dataset,
    open_clipset,
    split_clips,
)
from asc.train.metrics import Metrics, compute_metrics


@torch.no_grad()
def predict_logits(dataset: ClipDataset, forward: Callable[[Tensor], Tensor], *, frontend: nn.Module | None,
                   device: torch.device, batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Logits for every clip; ``frontend`` turns waveforms into log-mels (None: already log-mels)."""
    loader = make_loader(dataset, batch_size=batch_size, train=False)
    outputs = []
    for x, _, _, _ in tqdm(loader, desc="evaluate", leave=False, disable=not progress, dynamic_ncols=True):
        x = x.to(device)
        if frontend is not None:
            x = frontend(x)
        outputs.append(forward(x).float().cpu())
    return torch.cat(outputs).numpy()


def load_run_model(run_dir: Path, checkpoint: str = "last", device: str | torch.device = "cpu", *,
                   trainable: bool = False) -> tuple[nn.Module, dict]:
    """The model of a run folder in eval mode, plus the checkpoint's metadata.

    A compressed run deploys its finalized module (``finalized.pt2``): that is what ``last``
    means there, with the metadata of its float twin (``checkpoints/float.pt``, also loadable
    by name). ``trainable`` asks for a module to train or distil from (a teacher): the finalized
    program is inference-only (it may be an int8 graph without parameters), so a compressed
    run's ``last`` then means its float twin. Channel-pruned models are rebuilt from the shapes
    recorded in their spec.
    """
    run_dir = Path(run_dir)
    if trainable:
        checkpoint = trainable_checkpoint(run_dir, checkpoint)
    elif (deployed := deployed_file(run_dir, checkpoint)).name == FINALIZED_NAME:
        state = load_checkpoint(checkpoint_file(run_dir, FLOAT_CHECKPOINT), device)
        return load_finalized(deployed, device), state  # inference-only already
    elif checkpoint == "last" and (run_dir / COMPRESS_PLAN_NAME).is_file():  # its last.pt holds a wrapped model
        raise AscError(f"{run_dir}: a compressed run without its {FINALIZED_NAME} (stopped before it finished, or the "
                       "file was lost); run the same `asc compress` command again to finish it")
    path = checkpoint_file(run_dir, checkpoint)
    state = load_checkpoint(path, device)
    spec = state["model_spec"]

    def build() -> nn.Module:
        return build_model(spec["name"], spec["num_classes"], **spec["args"])

    try:
        if "channels" in spec:
            from asc.models.resize import rebuild_pruned

            model = rebuild_pruned(build, spec["channels"], state["model"])
        else:
            model = build()
            model.load_state_dict(state["model"])
    except (RuntimeError, AscError) as error:
        raise AscError(f"{path}: weights do not fit model '{spec['name']}' ({str(error).splitlines()[0]}); the "
                       "checkpoint holds another architecture (e.g. FFL's fused network) or was written by an "
                       "incompatible asc version") from None
    return model.to(device).eval(), state


@dataclass
class Predictions:
    """A model's logits for the clips of one split, in the order of ``clips``."""

    clips: list[Clip]
    logits: np.ndarray
    targets: list[int]  #: label indices (-1: unlabelled)
    labels: list[str]

    def metrics(self) -> Metrics:
        return compute_metrics(self.logits, self.targets, [c.device for c in self.clips], self.labels)


def predict_run(run_dir: Path, *, data_root: Path | None = None, data_overrides: Sequence[str] = (),
                split: str | None = None, checkpoint: str = "last", skip_missing: bool = False,
                progress: bool = True) -> Predictions:
    """Logits of ``run_dir``'s model for ``split`` of ``data_root`` (default: the run's own data).

    The run's ``data.*`` settings apply to ``data_root`` too, changed by ``data_overrides``
    (``data.label_column=category`` …), so another table or tree is read with options only.
    """
    run_dir = Path(run_dir)
    config = load_config(RunConfig, run_dir / "config.yaml")
    values: dict[str, object] = {} if data_root is None else {"root": str(data_root)}
    if skip_missing:
        values["missing_audio"] = "skip"
    data = override_data(config.data, data_overrides, **values)
    model, state = load_run_model(run_dir, checkpoint)
    features = FeatureConfig.from_dict(state["features"])
    clipset = open_clipset(data, progress=progress, create=data_root is None)
    if clipset.labels != state["labels"]:
        missing = sorted(set(clipset.labels) - set(state["labels"]))
        if missing:
            raise AscError(f"{data_root or run_dir}: labels {missing} are unknown to the model "
                           f"(it knows {state['labels']}); evaluate on data with the same classes")
        clipset.labels = list(state["labels"])
    clips = split_clips(clipset, split or data.eval_split)
    dataset = make_dataset(clips, clipset, clipset_devices(clipset), config=data, features=features,
                           num_samples=state["num_samples"] if data_root is None
                           else clip_samples(data, features, clips),
                           as_features=True, progress=progress)
    logits = predict_logits(dataset, model, frontend=None, device=torch.device("cpu"),
                            batch_size=config.train.eval_batch_size, progress=progress)
    return Predictions(list(dataset.clips), logits, list(dataset.targets), list(clipset.labels))


def evaluate_run(run_dir: Path, *, data_root: Path | None = None, data_overrides: Sequence[str] = (),
                 split: str | None = None, checkpoint: str = "last", skip_missing: bool = False,
                 progress: bool = True) -> Metrics:
    """Metrics of ``run_dir``'s model on ``split`` of ``data_root`` (see :func:`predict_run`)."""
    return predict_run(run_dir, data_root=data_root, data_overrides=data_overrides, split=split,
                       checkpoint=checkpoint, skip_missing=skip_missing, progress=progress).metrics()
