"""The compression stage: pruning, quantization and distillation methods as training-loop plugins."""

from asc.compress.kd import (
    Distillation,
    ModelTeacher,
    OnlinePeers,
    PrecomputedTeacher,
    SelfTeacher,
    kd_loss,
    precompute_teacher_logits,
)
from asc.compress.prune import (
    LayerSelection,
    MagnitudePruning,
    PruningSchedule,
    cubic_sparsity,
    magnitude_masks,
    materialize_masks,
    prune_channels,
    sparsity_report,
)

__all__ = [
    "Distillation",
    "ModelTeacher",
    "OnlinePeers",
    "PrecomputedTeacher",
    "SelfTeacher",
    "kd_loss",
    "precompute_teacher_logits",
    "LayerSelection",
    "MagnitudePruning",
    "PruningSchedule",
    "cubic_sparsity",
    "magnitude_masks",
    "materialize_masks",
    "prune_channels",
    "sparsity_report",
]
