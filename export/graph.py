"""The one graph the edge runs: a scoring module plus the heatmap's peak position.

`EdgeGraph` wraps any scoring module whose `forward(images_uint8_nhwc)` returns
`(score (N,), heatmap (N, H, W))` (the edge contract kept by Efficient GAN and by AnoGAN
with its encoder) and adds the third output of the bundle contract, `peak` (N, 2) int64
= (row, column) of the heatmap's first maximum in row-major order, which is numpy's
`argmax` + `unravel_index` rule. The training models' forward stays untouched.

`inference_copy` gives an eval-mode copy fit for export: weight parametrizations
(spectral norm on D) are baked into plain weights. In eval mode spectral norm divides by
a sigma computed from its stored vectors, so baking changes no number; left in, the
exporter would ship the power-iteration arithmetic and recompute D's weights on every
frame, and the quantizer would not see those weights as constants.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize


class EdgeGraph(nn.Module):
    def __init__(self, scoring: nn.Module) -> None:
        super().__init__()
        self.scoring = scoring

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 (N, H, W, C) -> score (N,), heatmap (N, H, W), peak (N, 2) int64 (row, column)."""
        score, heatmap = self.scoring(image)
        # Two argmaxes instead of index // W (which the exporter would route through float
        # division): the first row holding the global maximum, then the first column in it,
        # which is exactly the first maximum in row-major order.
        row = heatmap.amax(dim=2).argmax(dim=1)  # (N,)
        width = heatmap.shape[-1]
        in_row = heatmap.gather(1, row.view(-1, 1, 1).expand(-1, 1, width)).squeeze(1)  # (N, W)
        peak = torch.stack([row, in_row.argmax(dim=1)], dim=1)  # (N, 2) int64
        return score, heatmap, peak


def inference_copy(model: nn.Module) -> nn.Module:
    """An eval-mode CPU copy of `model` with every parametrization baked into a plain parameter.

    Not `parametrize.remove_parametrizations`: a deep copy shares the dynamically created
    `Parametrized...` class with the source model, and removal deletes the property from
    that class, which would break the source model too.
    """
    clone = copy.deepcopy(model).eval().cpu()
    with torch.no_grad():
        for module in list(clone.modules()):
            if not parametrize.is_parametrized(module):
                continue
            baked = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
            module.__class__ = module.__class__.__bases__[0]  # the class before parametrization
            del module._modules["parametrizations"]
            for name, value in baked.items():
                module.register_parameter(name, nn.Parameter(value, requires_grad=False))
    return clone
