"""Fit the device-translation model of a run from its paired training recordings.

Translation needs the same segment recorded by the source device and by the others (TAU and the
synthetic corpus both have such pairs). The fitted model is saved in the run folder as
``translation.pt`` and reused on resume, so a resumed run augments exactly like the original.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from asc.augment import AugmentConfig, DeviceResponse, DeviceTranslator, fit_translator, pair_by_segment
from asc.data.loader import ClipDataset
from asc.errors import ConfigError
from asc.train import distributed

if TYPE_CHECKING:
    from asc.train.loop import Trainer

TRANSLATION_FILE = "translation.pt"


def needs_waveform(config: AugmentConfig) -> bool:
    """Whether an augmentation works on raw audio, so log-mels cannot be precomputed."""
    return config.dir_p > 0 or config.roll_seconds > 0


@torch.no_grad()
def paired_spectrograms(dataset: ClipDataset, frontend: torch.nn.Module | None, source: str
                        ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Log-mels of every (source, other device) pair of ``dataset`` and the other devices' names."""
    pairs = pair_by_segment(dataset.clips, source=source)
    if not pairs:
        raise ConfigError(f"augment.translation needs recordings of the same segment by device '{source}' "
                          "and other devices, and the training split has none; set augment.translation=none")

    def spectrogram(index: int) -> torch.Tensor:
        """(1, F, T): the cached log-mel, or the front end applied to the cached waveform."""
        x = dataset[index][0]
        return frontend(x.unsqueeze(0))[0] if frontend is not None else x

    sources = torch.stack([spectrogram(i) for i, _ in pairs])
    targets = torch.stack([spectrogram(j) for _, j in pairs])
    return sources, targets, [dataset.clips[j].device for _, j in pairs]


def fit_translation(kind: str, dataset: ClipDataset, frontend: torch.nn.Module | None, source: str, *,
                    seed: int, progress: bool) -> DeviceResponse | DeviceTranslator:
    sources, targets, names = paired_spectrograms(dataset, frontend, source)
    if kind == "response":
        return DeviceResponse.fit(sources, targets, names)
    devices = sorted(set(names))
    ids = torch.tensor([devices.index(name) for name in names])
    return fit_translator(sources, targets, ids, devices, seed=seed, progress=progress)


def load_translation(kind: str, path: Path) -> DeviceResponse | DeviceTranslator:
    return DeviceResponse.load(path) if kind == "response" else DeviceTranslator.load(path)


def translation_for_run(trainer: Trainer) -> DeviceResponse | DeviceTranslator:
    """The run's translation model: fitted once by rank 0, then loaded by every rank."""
    config = trainer.config
    kind = config.augment.translation
    path = trainer.run_dir / TRANSLATION_FILE
    if trainer.ctx.is_main and not path.exists():
        frontend = None if trainer.data.features_cached else trainer.frontend.cpu()
        model = fit_translation(kind, trainer.data.train, frontend, config.augment.source_device,
                                seed=config.train.seed, progress=trainer.progress)
        trainer.frontend.to(trainer.ctx.device)
        model.save(path)
    distributed.barrier(trainer.ctx)
    model = load_translation(kind, path)
    return model.to(trainer.ctx.device) if isinstance(model, DeviceTranslator) else model
