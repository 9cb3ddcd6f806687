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

And it rewrites the segmentation head's skip merges (`_HeadMergingBeforeUpsampling`):
nearest upsampling commutes with a 1x1 convolution, so each merge's convolution is split
over the concatenated inputs and the upsampled part runs before the upsampling, at a
quarter of the pixels and with no concatenation.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ganspect.train.models.common import SegmentationHead


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
            head = getattr(module, "segmentation_head", None)
            if isinstance(head, SegmentationHead):
                module.segmentation_head = _HeadMergingBeforeUpsampling(head)
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


class _SplitMerge(nn.Module):
    """`conv(cat([up(deep), skip]))` of a 1x1 convolution, computed as `up(A deep) + B skip + bias`.

    A and B are the convolution's weight columns for the two inputs. A nearest 2x upsampling
    copies each pixel into a 2x2 block and a 1x1 convolution acts on each pixel alone, so
    the two commute: the same numbers up to the order of the float additions.
    """

    def __init__(self, conv: nn.Conv2d, skip_channels: int) -> None:
        super().__init__()
        if conv.kernel_size != (1, 1) or conv.groups != 1:
            raise ValueError("only a 1x1 convolution over a concatenation splits into two")
        deep_channels = conv.in_channels - skip_channels
        weight = conv.weight.detach()
        self.deep = nn.Conv2d(deep_channels, conv.out_channels, 1, bias=False)
        self.skip = nn.Conv2d(skip_channels, conv.out_channels, 1, bias=conv.bias is not None)
        with torch.no_grad():
            self.deep.weight.copy_(weight[:, :deep_channels])
            self.skip.weight.copy_(weight[:, deep_channels:])
            if conv.bias is not None and self.skip.bias is not None:
                self.skip.bias.copy_(conv.bias.detach())
        self.requires_grad_(False)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.deep(deep), scale_factor=2.0, mode="nearest") + self.skip(skip)


def _convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


class _HeadMergingBeforeUpsampling(nn.Module):
    """A `SegmentationHead` computing the same logits with its merges split (`_SplitMerge`).

    At 256x256 the merges' concatenations, upsamplings and the requantization of the
    concatenated maps were about a quarter of the INT8 model's time (3.4 of 12.9 ms).
    """

    def __init__(self, head: SegmentationHead) -> None:
        super().__init__()
        self.at_1, self.at_2, self.at_4, self.at_8 = head.at_1, head.at_2, head.at_4, head.at_8
        # up_4 and up_2 are (1x1 merge + activation, 3x3 conv); the skip input is the encoder stage beside them.
        merges = []
        for up, skip in ((head.up_4, head.at_4), (head.up_2, head.at_2)):
            merge_block, conv_after = up.children()
            merge_conv, *activation = merge_block.children()
            assert isinstance(merge_conv, nn.Conv2d)
            merges.append(
                (_SplitMerge(merge_conv, _convs(skip)[-1].out_channels), nn.Sequential(*activation, conv_after))
            )
        (self.merge_4, self.after_4), (self.merge_2, self.after_2) = merges
        self.merge_1 = _SplitMerge(head.out, _convs(head.at_1)[-1].out_channels)

    def forward(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        f1 = self.at_1(torch.cat([x, recon, (x - recon).abs()], dim=1))
        f2 = self.at_2(f1)
        f4 = self.at_4(f2)
        f8 = self.at_8(f4)
        u4 = self.after_4(self.merge_4(f8, f4))
        u2 = self.after_2(self.merge_2(u4, f2))
        return self.merge_1(u2, f1).squeeze(1)  # (N, H, W) logits
