"""The compression stage: pruning, quantization and distillation methods as training-loop plugins."""

from asc.compress.prune import (
    LayerSelection,
    MagnitudePruning,
    PruningSchedule,
    channel_spec,
    cubic_sparsity,
    magnitude_masks,
    masked_weights,
    materialize_masks,
    prune_channels,
    rebuild_pruned,
    sparsity_report,
)

__all__ = [
    "LayerSelection",
    "MagnitudePruning",
    "PruningSchedule",
    "channel_spec",
    "cubic_sparsity",
    "magnitude_masks",
    "masked_weights",
    "materialize_masks",
    "prune_channels",
    "rebuild_pruned",
    "sparsity_report",
]
