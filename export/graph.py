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

It also rewrites the generator's transposed convolutions into plain ones that compute
the same numbers (`_SubPixelUpsample`, `_LatentToMap`), with a following BatchNorm folded
in: onnxruntime's CPU provider has no INT8 ConvTranspose kernel, so a quantized
ConvTranspose ran in float between a dequantize and a quantize, and those layers were
a third of a 256 px model's time.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
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
            parametrizations = module.parametrizations
            assert isinstance(parametrizations, nn.ModuleDict)  # one entry per parametrized tensor
            baked = {name: getattr(module, name).detach().clone() for name in parametrizations}
            module.__class__ = module.__class__.__bases__[0]  # the class before parametrization
            del module._modules["parametrizations"]
            for name, value in baked.items():
                module.register_parameter(name, nn.Parameter(value, requires_grad=False))
        for module in list(clone.modules()):
            if isinstance(module, nn.Sequential):
                _rewrite_transposed_convs(module)
    return clone


def _rewrite_transposed_convs(seq: nn.Sequential) -> None:
    """In place: each ConvTranspose2d of a shape handled below, with a BatchNorm right after it folded in."""
    names = list(seq._modules)
    for i, name in enumerate(names):
        layer = seq._modules[name]
        if not isinstance(layer, nn.ConvTranspose2d):
            continue
        rewrite = next((r for r in (_SubPixelUpsample, _LatentToMap) if r.handles(layer)), None)
        if rewrite is None:
            continue
        following = seq._modules[names[i + 1]] if i + 1 < len(names) else None
        weight, bias = _with_batchnorm_folded(layer, following)
        seq._modules[name] = rewrite(weight, bias)
        if weight is not layer.weight:
            seq._modules[names[i + 1]] = nn.Identity()


def _with_batchnorm_folded(layer: nn.ConvTranspose2d, following: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of `layer`, with `following` folded in when it is an eval-mode BatchNorm2d.

    Then weight is a new tensor, not `layer.weight`: the caller replaces the BatchNorm.
    """
    out_channels = layer.out_channels
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros(out_channels)
    # The running statistics are both there or both None (track_running_stats=False).
    if not (
        isinstance(following, nn.BatchNorm2d)
        and following.running_mean is not None
        and following.running_var is not None
    ):
        return layer.weight, bias
    scale = 1.0 / torch.sqrt(following.running_var + following.eps)
    shift = -following.running_mean * scale
    if following.affine:
        scale, shift = scale * following.weight.detach(), shift * following.weight.detach() + following.bias.detach()
    # ConvTranspose2d weight is (in, out, kh, kw): the output channel is dimension 1.
    return layer.weight.detach() * scale.view(1, -1, 1, 1), bias * scale + shift


class _SubPixelUpsample(nn.Module):
    """ConvTranspose2d(kernel 4, stride 2, padding 1) as four 2x2 convolutions, one per output phase.

    Output pixel (2i + a, 2j + b) of the transposed convolution only ever sees input rows
    {i - 1, i} (a = 0, kernel rows 3 and 1) or {i, i + 1} (a = 1, kernel rows 2 and 0), and
    the same for columns. Each phase is therefore an ordinary 2x2 convolution over the
    input padded by one pixel; interleaving the four phases gives the transposed
    convolution's output exactly, with the same multiply-accumulates.
    """

    _TAPS = ([3, 1], [2, 0])  # kernel rows (or columns) used by phase 0 and phase 1
    FEW_CHANNELS = 4  # up to this many outputs, one joint convolution (below) beats four small ones

    @staticmethod
    def handles(layer: nn.ConvTranspose2d) -> bool:
        return (
            layer.kernel_size == (4, 4)
            and layer.stride == (2, 2)
            and layer.padding == (1, 1)
            and layer.output_padding == (0, 0)
            and layer.dilation == (1, 1)
            and layer.groups == 1
        )

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        # ConvTranspose2d weight is (in, out, kh, kw); Conv2d wants (out, in, kh, kw).
        phases = {
            (a, b): weight.detach()[:, :, rows][:, :, :, cols].transpose(0, 1).contiguous()
            for a, rows in enumerate(self._TAPS)
            for b, cols in enumerate(self._TAPS)
        }
        out_channels, in_channels = weight.shape[1], weight.shape[0]
        self.shuffled = out_channels <= self.FEW_CHANNELS
        if not self.shuffled:
            for (a, b), kernel in phases.items():
                self.register_parameter(f"phase{a}{b}", nn.Parameter(kernel, requires_grad=False))
            self.bias = nn.Parameter(bias, requires_grad=False)
            return
        # All four phases as one 3x3 convolution with 4 * C outputs, then a pixel shuffle: phase
        # (a, b) reads rows a..a+1 and columns b..b+1 of the 3x3 window, the other taps are zero.
        # For the image layer (C = 1 or 3) four convolutions of one to three outputs each ran
        # at a fraction of onnxruntime's speed and were a tenth of a 256 px model's time.
        joint = torch.zeros(out_channels, 4, in_channels, 3, 3)
        for (a, b), kernel in phases.items():
            joint[:, 2 * a + b, :, a : a + 2, b : b + 2] = kernel
        self.joint = nn.Parameter(joint.reshape(4 * out_channels, in_channels, 3, 3), requires_grad=False)
        self.joint_bias = nn.Parameter(bias.repeat_interleave(4), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shuffled:
            return F.pixel_shuffle(F.conv2d(x, self.joint, self.joint_bias, padding=1), 2)  # (N, C, 2H, 2W)
        n, _, h, w = x.shape
        # Phase 0 reads the row above (pad the top), phase 1 the row below (pad the bottom).
        phases = [
            [F.conv2d(F.pad(x, (1 - b, b, 1 - a, a)), getattr(self, f"phase{a}{b}"), self.bias) for b in (0, 1)]
            for a in (0, 1)
        ]
        # Two stacks, not one 6-D permute: onnxruntime's Transpose of it took 3 ms of a 256 px model.
        rows = [torch.stack(row, dim=-1) for row in phases]  # each (N, C, H, W, 2): b innermost
        return torch.stack(rows, dim=3).reshape(n, -1, 2 * h, 2 * w)  # (N, C, H, 2, W, 2) -> (N, C, 2H, 2W)


class _LatentToMap(nn.Module):
    """ConvTranspose2d(kernel k, stride 1, padding 0) on a 1x1 input: a matrix product (a Gemm)."""

    @staticmethod
    def handles(layer: nn.ConvTranspose2d) -> bool:
        return (
            layer.stride == (1, 1)
            and layer.padding == (0, 0)
            and layer.output_padding == (0, 0)
            and layer.dilation == (1, 1)
            and layer.groups == 1
        )

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        channels_in, self.channels, self.height, self.width = weight.shape
        self.linear = nn.Linear(channels_in, self.channels * self.height * self.width)
        with torch.no_grad():
            self.linear.weight.copy_(weight.detach().reshape(channels_in, -1).t())
            self.linear.bias.copy_(bias.repeat_interleave(self.height * self.width))
        self.linear.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (1, 1):
            raise ValueError(f"_LatentToMap takes a 1x1 input, got {tuple(x.shape[-2:])}")
        return self.linear(x.flatten(1)).view(-1, self.channels, self.height, self.width)
