"""Score an exported bundle on a labelled dataset through the torch-free runtime, as an app would.

Each clip is classified the way ``asc classify`` does it (resampling, windowing, mean
log-probability), so the numbers are what a phone computes, not what torch computes. The
collection is read with the same ``data.*`` settings as training (TAU folder, table or folder
tree). A bundle with device-specific models classifies each clip with its dataset device's model
(the general one for other devices), as the DCASE 2025 system does. Like :mod:`asc.runtime`, this
module never imports torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from asc.config import DataConfig
from asc.data.source import read_dataset
from asc.errors import AscError, DatasetError
from asc.runtime import Classifier
from asc.train.metrics import Metrics, compute_metrics


def evaluate_bundle(bundle_dir: Path, data: DataConfig, *, split: str = "evaluate", threads: int = 1,
                    progress: bool = True) -> Metrics:
    """Metrics of an exported bundle on ``split`` of the collection ``data.root``, each clip routed
    to its device's model when the bundle has device models."""
    if data.root is None:
        raise AscError(f"{bundle_dir}: a bundle carries no dataset; give --data ROOT")
    classifier = Classifier(bundle_dir, threads=threads)
    clipset = read_dataset(Path(data.root), data)
    unknown = sorted(set(clipset.labels) - set(classifier.labels))
    if unknown:
        raise AscError(f"{data.root}: labels {unknown} are unknown to the bundle (it knows {classifier.labels}); "
                       "evaluate on data with the same classes")
    clips = clipset.split(split)
    if unlabelled := [clip for clip in clips if clip.label is None]:
        raise DatasetError(unlabelled[0].path, f"{len(unlabelled)} clip(s) of split '{split}' have no label",
                           "evaluate a labelled split, or use asc classify for unlabelled audio")
    log_probs = np.stack([np.log(np.maximum(classifier.classify_file(clip.path, device=clip.device).probabilities,
                                            1e-12))
                          for clip in tqdm(clips, desc="evaluate", leave=False, disable=not progress,
                                           dynamic_ncols=True)])
    targets = np.array([classifier.labels.index(clip.label) for clip in clips])
    return compute_metrics(log_probs, targets, [clip.device for clip in clips], classifier.labels)
