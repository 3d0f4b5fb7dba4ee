"""Recreate channel-pruned models from plain data, so checkpoints stay ``weights_only``.

A channel-pruned model differs from its class's defaults only in layer shapes. :func:`channel_spec`
records those shapes; :func:`rebuild_pruned` builds the original class and resizes it. This lives
with the models (not with the pruning methods) because loading a run needs it and the training
layer must not depend on the compression layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from asc.errors import ConfigError

_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def channel_spec(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Shape of every conv, linear and batch-norm layer, by module name.

    Together with the original model class and its arguments this is enough to recreate a
    channel-pruned model (:func:`rebuild_pruned`); it is plain data, so it fits a
    ``weights_only`` checkpoint.
    """
    spec: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            spec[name] = {"type": type(module).__name__, "in_features": module.in_features,
                          "out_features": module.out_features}
        elif isinstance(module, _WEIGHT_LAYERS):
            spec[name] = {"type": type(module).__name__, "in_channels": module.in_channels,
                          "out_channels": module.out_channels, "groups": module.groups}
        elif isinstance(module, _BATCH_NORMS):
            spec[name] = {"type": type(module).__name__, "num_features": module.num_features}
    return spec


def _resize(module: nn.Module, entry: Mapping[str, Any]) -> None:
    """Give ``module`` the shape in ``entry`` with freshly initialised tensors."""
    if isinstance(module, nn.Linear):
        module.in_features, module.out_features = entry["in_features"], entry["out_features"]
        module.weight = nn.Parameter(module.weight.new_empty(module.out_features, module.in_features))
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias.new_empty(module.out_features))
    elif isinstance(module, _WEIGHT_LAYERS):
        module.in_channels, module.out_channels = entry["in_channels"], entry["out_channels"]
        module.groups = entry["groups"]
        shape = (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
        module.weight = nn.Parameter(module.weight.new_empty(shape))
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias.new_empty(module.out_channels))
    else:
        module.num_features = entry["num_features"]
        if module.affine:
            module.weight = nn.Parameter(module.weight.new_empty(module.num_features))
            module.bias = nn.Parameter(module.bias.new_empty(module.num_features))
        if module.track_running_stats:
            module.running_mean = module.running_mean.new_empty(module.num_features)
            module.running_var = module.running_var.new_empty(module.num_features)
    module.reset_parameters()


def rebuild_pruned(build: Callable[[], nn.Module], spec: Mapping[str, Mapping[str, Any]],
                   state_dict: Mapping[str, Tensor] | None = None) -> nn.Module:
    """Recreate a channel-pruned model: ``build()`` the original, resize it to ``spec``, load weights.

    ``build`` makes the unpruned model (e.g. ``lambda: build_model(name, classes, **args)``);
    ``spec`` comes from :func:`channel_spec` of the pruned model. Without ``state_dict`` the
    resized layers are freshly initialised.
    """
    model = build()
    modules = dict(model.named_modules())
    for name, entry in spec.items():
        module = modules.get(name)
        if module is None or type(module).__name__ != entry.get("type"):
            found = "nothing" if module is None else type(module).__name__
            raise ConfigError(f"channel spec: {name} is a {entry.get('type')} in the spec but {found} in "
                              f"{type(model).__name__}; rebuild with the model class the spec was made from")
        _resize(module, entry)
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as error:
            raise ConfigError(f"channel spec: the weights do not fit the rebuilt model "
                              f"({str(error).splitlines()[0]}); use the spec saved with these weights") from None
    return model
