"""Knowledge distillation: the KD loss, teacher providers, and the distillation hook.

One loss for every method: ``T² · KL(softmax(z_T/T) || softmax(z_S/T))`` with the teacher detached
(Hinton et al.; the T² keeps gradient magnitudes comparable across temperatures). Where the teacher
comes from is a provider, so the same hook serves an external trained checkpoint, an internal
self-teacher (PQK's dense path, DCIL) and online peers trained alongside the student.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asc.augment import mix_targets
from asc.errors import ConfigError
from asc.io import atomic_path
from asc.train.hooks import Auxiliary, TrainHook

if TYPE_CHECKING:
    from asc.data.loader import ClipDataset
    from asc.train.loop import Trainer


def kd_loss(student_logits: Tensor, teacher: Tensor, temperature: float = 2.0, *,
            teacher_is_probs: bool = False) -> Tensor:
    """``T² · KL(p_T || p_S)`` at temperature T, averaged over the batch; the teacher gets no gradient.

    ``teacher`` is logits, or probabilities at temperature T when ``teacher_is_probs`` (soft targets
    that were already mixed like their inputs).
    """
    if temperature <= 0:
        raise ConfigError(f"distillation temperature must be > 0, got {temperature}")
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher = teacher.detach().float()
    probs = teacher if teacher_is_probs else F.softmax(teacher / temperature, dim=1)
    return temperature**2 * F.kl_div(log_student, probs, reduction="batchmean")


class TeacherProvider(Protocol):
    """Teacher logits for a training batch, and the modules the trainer must own for it."""

    def logits(self, trainer: Trainer, x: Tensor) -> Tensor: ...

    def auxiliaries(self) -> Mapping[str, Auxiliary]: ...


class ModelTeacher:
    """A frozen teacher network run on the same (augmented) inputs as the student."""

    def __init__(self, model: nn.Module) -> None:
        model.eval()  # not chained: a finalized graph's eval() returns None
        self.model = model
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    @classmethod
    def from_run(cls, run_dir: Path, checkpoint: str = "last") -> ModelTeacher:
        """The run's model; a compressed run's float twin (its finalized program is inference-only)."""
        from asc.train.evaluate import load_run_model

        model, _ = load_run_model(run_dir, checkpoint, trainable=True)
        return cls(model)

    def auxiliaries(self) -> Mapping[str, Auxiliary]:
        return {"teacher": Auxiliary(self.model, trainable=False)}

    @torch.no_grad()
    def logits(self, trainer: Trainer, x: Tensor) -> Tensor:
        self.model.to(x.device).eval()
        return self.model(x)


class SelfTeacher:
    """An internal teacher: any callable of the student's inputs (e.g. PQK's dense path)."""

    def __init__(self, forward: Callable[[Tensor], Tensor]) -> None:
        self.forward = forward

    def logits(self, trainer: Trainer, x: Tensor) -> Tensor:
        return self.forward(x)

    def auxiliaries(self) -> Mapping[str, Auxiliary]:
        return {}  # the method that owns the path registers its modules


class PrecomputedTeacher:
    """Teacher logits stored per training clip and looked up by clip index.

    Running a large teacher once instead of every step is what makes ensemble teachers affordable;
    the price is that the teacher sees the clean clip, not the augmented one. Mixup is honoured: the
    soft targets are mixed with the batch's own pairing.
    """

    def __init__(self, table: np.ndarray) -> None:
        self.table = torch.from_numpy(np.asarray(table, dtype=np.float32))

    def logits(self, trainer: Trainer, x: Tensor) -> Tensor:
        return self.table[trainer.batch.indices.cpu()].to(x.device)

    def auxiliaries(self) -> Mapping[str, Auxiliary]:
        return {}


@torch.no_grad()
def precompute_teacher_logits(teacher: nn.Module, dataset: ClipDataset, path: Path, *,
                              frontend: nn.Module | None = None, batch_size: int = 64,
                              progress: bool = True) -> np.ndarray:
    """Teacher logits for every clip of ``dataset``, cached in ``path`` (``.npy``) and reused.

    The file name should identify teacher and dataset; a table of the wrong length is rebuilt.
    """
    from asc.train.evaluate import predict_logits

    path = Path(path)
    if path.is_file():
        table = np.load(path)
        if len(table) == len(dataset):
            return table
    teacher.eval()
    table = predict_logits(dataset, teacher, frontend=frontend, device=next(teacher.parameters()).device,
                           batch_size=batch_size, progress=progress)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, table)
    return table


def teacher_cache_name(teacher: nn.Module, dataset: ClipDataset) -> str:
    """A file name that changes with the teacher's weights and the dataset's clips."""
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for clip in dataset.clips:
        digest.update(str(clip.path).encode())
    return f"teacher-logits-{digest.hexdigest()[:16]}.npy"


class PeerGroup(nn.Module):
    """Several networks run on the same input; logits stacked as (peers, batch, classes)."""

    def __init__(self, peers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.peers = nn.ModuleList(peers)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([peer(x) for peer in self.peers])


class OnlinePeers:
    """Peer networks trained together with the student (deep mutual learning).

    The student distils from the peers' mean; each peer learns from the labels and from the
    student. The peers are an auxiliary module of the trainer: their own parameter group
    (``lr``, ``weight_decay``; None: the run's), the schedule, clipping and checkpoints.
    """

    def __init__(self, peers: Sequence[nn.Module], *, lr: float | None = None,
                 weight_decay: float | None = None) -> None:
        if not peers:
            raise ConfigError("online distillation needs at least one peer network")
        self.peers = Auxiliary(PeerGroup(peers), lr=lr, weight_decay=weight_decay)
        self._last = torch.empty(0)

    def auxiliaries(self) -> Mapping[str, Auxiliary]:
        return {"peers": self.peers}

    def logits(self, trainer: Trainer, x: Tensor) -> Tensor:
        self.peers.module.train()
        self._last = self.peers(x)
        return self._last.mean(0)

    def peer_loss(self, trainer: Trainer, student_logits: Tensor, temperature: float) -> Tensor:
        """Each peer's task loss (mixup-aware, like the student's) plus distillation from the student."""
        from asc.train.loop import task_loss

        return sum(task_loss(z, trainer.batch) + kd_loss(z, student_logits, temperature) for z in self._last.unbind())


class Distillation(TrainHook):
    """Adds ``weight · T² · KL(teacher || student)`` to the task loss.

    The loop runs the student; this hook adds the provider's ``teacher_logits`` for the same
    batch and registers the provider's modules (a frozen teacher, trainable peers) as auxiliaries.
    With mixup on, logit teachers see the mixed input; precomputed teachers' soft targets are mixed
    with the batch's pairing instead. At weight 0 the teacher is not run and no term is added: the
    same schedule as a distilled run, without its cost (a fine-tuning baseline).
    """

    name = "kd"

    def __init__(self, provider: TeacherProvider, *, temperature: float = 2.0, weight: float = 1.0) -> None:
        if weight < 0:
            raise ConfigError(f"distillation weight must be >= 0, got {weight}")
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), temperature)  # validates the temperature
        self.provider = provider
        self.temperature = temperature
        self.weight = weight

    def auxiliaries(self) -> Mapping[str, Auxiliary]:
        return self.provider.auxiliaries()

    def output_keys(self) -> frozenset[str]:
        return frozenset({"teacher_logits"})

    def forward(self, trainer: Trainer, model: nn.Module, x: Tensor) -> dict[str, Tensor]:
        return {"teacher_logits": self.provider.logits(trainer, x)} if self.weight > 0 else {}

    def extra_losses(self, trainer: Trainer, outputs: dict[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
        if self.weight == 0:
            return {}
        student, teacher = outputs["logits"], outputs["teacher_logits"]
        mix = trainer.batch.mix
        if isinstance(self.provider, PrecomputedTeacher) and mix is not None:
            soft = mix_targets(F.softmax(teacher.float() / self.temperature, dim=1), mix.perm, mix.lam)
            losses = {"kd": self.weight * kd_loss(student, soft, self.temperature, teacher_is_probs=True)}
        else:
            losses = {"kd": self.weight * kd_loss(student, teacher, self.temperature)}
        if isinstance(self.provider, OnlinePeers):
            losses["peers"] = self.provider.peer_loss(trainer, student.detach(), self.temperature)
        return losses
