"""Evaluate a trained run on any split of any dataset, the same way the training loop does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from asc.config import RunConfig, load_config
from asc.data.tau import read_tau
from asc.data.loader import ClipDataset, make_loader
from asc.errors import AscError
from asc.features import FeatureConfig
from asc.models import build_model
from asc.train.checkpoint import FINALIZED_NAME, load_checkpoint, load_finalized
from asc.train.data import clip_samples, clipset_devices, make_dataset, open_clipset, split_clips
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


def load_run_model(run_dir: Path, checkpoint: str = "last", device: str | torch.device = "cpu"
                   ) -> tuple[nn.Module, dict]:
    """The model of a run folder in eval mode, plus the checkpoint's metadata.

    A compressed run deploys its finalized module (``finalized.pt2``): that is what ``last``
    means there, with the metadata of its float twin (``checkpoints/float.pt``, also loadable
    by name). Channel-pruned models are rebuilt from the shapes recorded in their spec.
    """
    run_dir = Path(run_dir)
    if checkpoint == "last" and (run_dir / FINALIZED_NAME).is_file():
        state = load_checkpoint(run_dir / "checkpoints" / "float.pt", device)
        return load_finalized(run_dir / FINALIZED_NAME, device), state  # inference-only already
    path = run_dir / "checkpoints" / f"{checkpoint}.pt"
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
        raise AscError(f"{path}: weights do not fit model '{spec['name']}' ({str(error).splitlines()[0]}); "
                       "the checkpoint was written by an incompatible asc version") from None
    return model.to(device).eval(), state


def evaluate_run(run_dir: Path, *, data_root: Path | None = None, split: str | None = None,
                 checkpoint: str = "last", skip_missing: bool = False, progress: bool = True) -> Metrics:
    """Metrics of ``run_dir``'s model on ``split`` of ``data_root`` (default: the run's own data)."""
    run_dir = Path(run_dir)
    config = load_config(RunConfig, run_dir / "config.yaml")
    data = config.data if data_root is None else replace(config.data, root=str(data_root))
    if skip_missing:
        data = replace(data, missing_audio="skip")
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
    return compute_metrics(logits, dataset.targets, [c.device for c in dataset.clips], clipset.labels)


def evaluate_bundle(bundle_dir: Path, data_root: Path, *, split: str = "evaluate", skip_missing: bool = False,
                    threads: int = 1, progress: bool = True) -> Metrics:
    """Metrics of an exported bundle on ``split`` of a TAU-layout dataset, through the torch-free runtime.

    Each clip is classified the way ``asc classify`` does it (resampling, windowing, mean
    log-probability), so this measures what an app would get, not what torch computes.
    """
    from asc.runtime import Classifier

    classifier = Classifier(bundle_dir, threads=threads)
    clipset = read_tau(Path(data_root), missing_audio="skip" if skip_missing else "error")
    unknown = sorted(set(clipset.labels) - set(classifier.labels))
    if unknown:
        raise AscError(f"{data_root}: labels {unknown} are unknown to the bundle (it knows {classifier.labels}); "
                       "evaluate on data with the same classes")
    clips = split_clips(clipset, split)
    log_probs = np.stack([np.log(np.maximum(classifier.classify_file(clip.path).probabilities, 1e-12))
                          for clip in tqdm(clips, desc="evaluate", leave=False, disable=not progress,
                                           dynamic_ncols=True)])
    targets = np.array([classifier.labels.index(clip.label) for clip in clips])
    return compute_metrics(log_probs, targets, [clip.device for clip in clips], classifier.labels)
