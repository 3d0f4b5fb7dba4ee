"""How much gradient one loss term sends to each group of parameters.

Shared by the gradient-routing tests of the multi-network methods (test_afd, test_ffl).
"""

from __future__ import annotations

import torch


def gradient_sizes(term: torch.Tensor, groups: dict[str, list[torch.nn.Parameter]]) -> dict[str, float]:
    """Sum of |gradient| of ``term`` over each group of parameters (exact zeros where it does not reach)."""
    flat = [p for params in groups.values() for p in params]
    grads = torch.autograd.grad(term, flat, retain_graph=True, allow_unused=True)
    sizes, start = {}, 0
    for name, params in groups.items():
        chunk = grads[start:start + len(params)]
        sizes[name] = float(sum(0.0 if g is None else g.abs().sum() for g in chunk))
        start += len(params)
    return sizes
