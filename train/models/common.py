"""What every ganspect scoring model shares: the edge contract and its calibration buffers.

A scoring model maps uint8 NHWC images to (score (N,), heatmap (N, H, W)) in `forward`,
with normalisation, Gaussian smoothing and heatmap scaling inside the graph. Subclasses
implement `score_parts(x)` on normalised float input; this base turns the parts into the
weighted score and the scaled heatmap, and holds the calibration buffers
(`heatmap_scale`, `threshold`) that travel in checkpoints and in the exported graph.

The export side relies on exactly these attributes: `cfg.image_size`, `cfg.channels`,
`cfg.lambda_`, `cfg.residual_reduction`, `cfg.heatmap_sigma`, `cfg.discrimination`,
and the two buffers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

import torch
from torch import nn


def weighted_score(l_r: Any, l_d: Any, lam: float) -> Any:
    """A(x) = (1 - lambda) * L_R + lambda * L_D, for tensors or arrays alike: the one place it is written."""
    return (1.0 - lam) * l_r + lam * l_d


def gaussian_kernel_1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian, radius ceil(3 sigma); sigma 0 gives the identity [1]."""
    if sigma <= 0:
        return torch.ones(1)
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def smoothing_matrix(size: int, sigma: float) -> torch.Tensor:
    """(size, size) S such that S @ v is v convolved with the Gaussian, borders replicated."""
    k = gaussian_kernel_1d(sigma)
    radius = len(k) // 2
    rows = torch.arange(size).view(-1, 1)
    taps = torch.arange(-radius, radius + 1).view(1, -1)
    columns = (rows + taps).clamp(0, size - 1)  # a tap beyond the border reads the border pixel
    matrix = torch.zeros(size, size)
    matrix.scatter_add_(1, columns, k.expand(size, -1).contiguous())
    return matrix


@dataclass
class ScoreParts:
    """What scoring computes before weighting; evaluation uses it for the lambda sweep."""

    l_r: torch.Tensor  # (N,)
    l_d: torch.Tensor  # (N,)
    residual: torch.Tensor  # (N, H, W) smoothed, not yet divided by heatmap_scale
    recon: torch.Tensor  # (N, C, H, W) the reconstruction in [-1, 1]
    # (N, H, W) the segmentation head's smoothed defect probability, when the model has one
    segmentation: torch.Tensor | None = None


class ScoringModel(nn.Module):
    """Base of EfficientGAN and AnoGAN: normalisation, smoothing, L_R, buffers, `forward`."""

    cfg: Any  # a dataclass with image_size, channels, lambda_, residual_reduction, residual_polarity, heatmap_sigma
    # The buffers _init_scoring registers, declared for type checkers (nn.Module's __getattr__
    # types them Tensor | Module); pixel_mean and pixel_spread exist only with cfg.pixel_calibration.
    smooth_matrix: torch.Tensor
    heatmap_scale: torch.Tensor
    threshold: torch.Tensor
    pixel_mean: torch.Tensor
    pixel_spread: torch.Tensor
    # Both models have an encoder E (image -> code) and a generator G (code -> image).
    encoder: nn.Module
    generator: nn.Module

    def _init_scoring(self, heatmap_sigma: float) -> None:
        # Separable smoothing as two products with one banded matrix (S r S^T): onnxruntime's
        # single-channel 1-D convolutions ran at ~1 GFLOP/s, a sixth of a 256 px INT8
        # model's time, while its matrix product runs near the machine's peak.
        self.register_buffer("smooth_matrix", smoothing_matrix(self.cfg.image_size, heatmap_sigma), persistent=False)
        # Calibration, set after training from held-out normals; persistent so the
        # checkpoint and the exported graph carry them.
        self.register_buffer("heatmap_scale", torch.tensor(1.0))
        self.register_buffer("threshold", torch.tensor(float("inf")))
        if getattr(self.cfg, "pixel_calibration", False):
            # Per-pixel mean and spread of the normal map (aligned parts): identity until calibrated.
            size = self.cfg.image_size
            self.register_buffer("pixel_mean", torch.zeros(size, size))
            self.register_buffer("pixel_spread", torch.ones(size, size))

    @staticmethod
    def normalise(images_uint8_nhwc: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1], exactly x / 127.5 - 1."""
        x = images_uint8_nhwc.to(torch.float32).permute(0, 3, 1, 2)
        return x / 127.5 - 1.0

    def smooth(self, residual: torch.Tensor) -> torch.Tensor:
        """(N, H, W) -> (N, H, W) Gaussian-smoothed, border pixels replicated."""
        h, w = residual.shape[-2:]
        if h == w == self.smooth_matrix.shape[0]:
            return self.smooth_matrix @ residual @ self.smooth_matrix.T
        # Training crops of another size (fully convolutional models): build the matrices for it.
        sigma = self.cfg.heatmap_sigma
        rows, cols = (smoothing_matrix(n, sigma).to(residual.device) for n in (h, w))
        return rows @ residual @ cols.T

    def residual_terms(self, x: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_R (N,), smoothed residual (N, H, W)) of images x against their reconstructions."""
        polarity = self.cfg.residual_polarity
        if polarity == "both":
            per_pixel = (x - recon).abs().mean(dim=1)  # (N, H, W)
        else:
            darker = (recon - x).mean(dim=1)
            per_pixel = (darker if polarity == "darker" else -darker).clamp(min=0.0)
        residual = self.smooth(per_pixel)  # (N, H, W)
        peak = self.cfg.residual_reduction == "peak"
        l_r = residual.amax(dim=(1, 2)) if peak else per_pixel.mean(dim=(1, 2))  # (N,)
        return l_r, residual

    def prior(self, n: int, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """n codes z ~ N(0, I) shaped as the encoder's output for images like `like` (N, C, H, W)."""
        if getattr(self.cfg, "latent", "vector") == "spatial":
            s = self.cfg.latent_stride
            shape: tuple[int, ...] = (n, self.cfg.latent_dim, like.shape[2] // s, like.shape[3] // s)
        else:
            shape = (n, self.cfg.latent_dim)
        if generator is None:
            return torch.randn(shape, device=like.device)
        return torch.randn(shape, generator=generator).to(like.device)  # a seeded draw is made on the CPU

    def score_parts(self, x: torch.Tensor) -> ScoreParts:
        raise NotImplementedError

    def recipe(self, config: Any, device: torch.device) -> Any:
        """How this model trains under a TrainConfig: optimisers, phases and one step's losses."""
        raise NotImplementedError

    def score_and_map(self, parts: ScoreParts) -> tuple[torch.Tensor, torch.Tensor]:
        """(score (N,), unscaled heatmap (N, H, W)) from the parts, as `cfg.scoring` says.

        residual: A(x) = (1 - lambda) L_R + lambda L_D, and the smoothed residual;
        segmentation: the peak of the head's smoothed defect probability, and that map.
        `cfg.heatmap_spread` widens the map before anything else reads it; a max filter
        keeps its peak, so without per-pixel calibration the score is what it was.
        """
        segmentation = getattr(self.cfg, "scoring", "residual") == "segmentation"
        per_pixel = getattr(self.cfg, "pixel_calibration", False)
        if segmentation:
            assert parts.segmentation is not None, "scoring: segmentation needs a model with a segmentation head"
            raw = self.widen(parts.segmentation)
        else:
            raw = self.widen(parts.residual)
            if not per_pixel:
                return weighted_score(parts.l_r, parts.l_d, self.cfg.lambda_), raw
        if per_pixel:
            # How unusual each pixel is for that pixel: rims and edges that are always there stop deciding.
            # Calibration measures mean and spread on maps made by this same function, so widened ones.
            raw = (raw - self.pixel_mean) / self.pixel_spread
            if not segmentation:
                return weighted_score(raw.amax(dim=(1, 2)), parts.l_d, self.cfg.lambda_), raw
        return raw.amax(dim=(1, 2)), raw

    def widen(self, heatmap: torch.Tensor) -> torch.Tensor:
        """(N, H, W) widened by `cfg.heatmap_spread` pixels on each side (a max filter), or as it is."""
        spread = self.cfg.heatmap_spread  # a checkpoint written before the setting gets its default, 0
        if spread == 0:
            return heatmap
        # Separable (a row pass, then a column pass): 2k comparisons a pixel, not k^2.
        k = 2 * spread + 1
        wide = nn.functional.max_pool2d(heatmap.unsqueeze(1), (1, k), stride=1, padding=(0, spread))
        return nn.functional.max_pool2d(wide, (k, 1), stride=1, padding=(spread, 0)).squeeze(1)

    def segment(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor | None:
        """Smoothed defect probability (N, H, W) of the segmentation head, or None without one."""
        head = getattr(self, "segmentation_head", None)
        if head is None:
            return None
        return self.smooth(torch.sigmoid(head(x, recon)))

    def forward(self, images_uint8_nhwc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The edge contract: uint8 (N, H, W, C) -> score (N,), heatmap (N, H, W)."""
        score, raw = self.score_and_map(self.score_parts(self.normalise(images_uint8_nhwc)))
        return score, raw / self.heatmap_scale


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean focal loss (Lin et al. 2017) of per-pixel logits: defects cover a few pixels in a thousand,
    and plain cross-entropy would be won by calling every pixel normal."""
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_true = torch.exp(-bce)
    return ((1.0 - p_true) ** gamma * bce).mean()


def painted(x: torch.Tensor, config: Any, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(what the encoder sees, the painted mask (N, 1, H, W)) under config.pseudo_defects; (x, None) when off."""
    pd = config.pseudo_defects
    if not pd.enabled:
        return x, None
    from ganspect.train.pseudo_defects import paint

    return paint(x, pd.probability, pd.kinds, rng)


def segmentation_loss(
    model: nn.Module, x_in: torch.Tensor, recon: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor | None:
    """Focal loss of the head's map of (painted image, its restoration) against the painted mask.

    The restoration is detached: the head learns to read it, E and G are not pulled towards
    restorations that are easy to read. None without a head or without painted defects.
    """
    head = getattr(model, "segmentation_head", None)
    if head is None or mask is None:
        return None
    return focal_loss(head(x_in, recon.detach()), mask[:, 0])


def norm_layer(kind: str, channels: int) -> nn.Module:
    """Feature normalisation for encoders and generators.

    BatchNorm (DCGAN's choice) reconstructed far better in our CPU-minute budget. In a
    BiGAN, G sees batches of prior samples z ~ N(0, I) and of encodings E(x), whose
    statistics differ, so the trainer re-estimates the running statistics on E(x) after
    training (ganspect.train.loop.refresh_batchnorm). GroupNorm avoids the issue by
    normalising each image on its own, but learned much more slowly here.
    """
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels // 4), channels)
    return nn.Identity()


def dcgan_init(model: nn.Module) -> None:
    """DCGAN initialisation: N(0, 0.02) convs, N(1, 0.02) normalisation scales."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            parametrizations = getattr(m, "parametrizations", None)  # spectral norm keeps the weight there
            w = parametrizations.weight.original if parametrizations is not None else m.weight
            nn.init.normal_(w, 0.0, 0.02)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


_Config = TypeVar("_Config", bound="StagedConfig")


def section_default(name: str) -> Any:
    """The default of a model setting, from the one place settings are defined (the config's model section)."""
    from ganspect.train.config import ModelSection

    return ModelSection.model_fields[name].default


class StagedConfig:
    """Mixin for model config dataclasses: DCGAN stride-2 stages down to 4x4, and the dict a checkpoint stores."""

    image_size: int
    base_width: int
    max_width: int
    latent_stride: int  # read only with latent: spatial

    @property
    def n_stages(self) -> int:
        """Stride-2 stages: from image_size down to 4x4 (64 -> 4 stages) for a vector latent,
        down to image_size / latent_stride for a spatial one."""
        if getattr(self, "latent", "vector") == "spatial":
            return int(math.log2(self.latent_stride))
        return int(math.log2(self.image_size)) - 2

    def width(self, stage: int) -> int:
        return min(self.base_width * 2**stage, self.max_width)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]  # every subclass is a dataclass

    @classmethod
    def from_dict(cls: type[_Config], d: dict[str, Any]) -> _Config:
        """Rebuild from a checkpoint's dict; keys a newer or older version wrote are ignored."""
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]  # every subclass is a dataclass
        return cls(**{k: v for k, v in d.items() if k in known})


def check_common(cfg: Any) -> None:
    """Validate the settings every model config shares (ValueError names the setting).

    `cfg` is an EfficientGANConfig or AnoGANConfig, from its __post_init__.
    """
    image_size, channels, lambda_, norm = cfg.image_size, cfg.channels, cfg.lambda_, cfg.norm
    latent, latent_stride, scoring = cfg.latent, cfg.latent_stride, cfg.scoring
    if latent not in ("vector", "spatial"):
        raise ValueError(f"latent must be vector or spatial, got {latent!r}")
    if latent == "spatial" and (latent_stride not in (2, 4, 8, 16, 32) or latent_stride > image_size // 4):
        raise ValueError(
            f"latent_stride must be a power of two from 2 to 32 and at most image_size / 4, got {latent_stride}"
        )
    if scoring not in ("residual", "segmentation"):
        raise ValueError(f"scoring must be residual or segmentation, got {scoring!r}")
    if scoring == "segmentation" and not cfg.segmentation_head:
        raise ValueError("scoring: segmentation needs segmentation_head: true")
    if image_size < 32 or image_size > 256 or image_size & (image_size - 1):
        raise ValueError(f"image_size must be a power of two from 32 to 256, got {image_size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lambda_}")
    if norm not in ("group", "batch", "none"):
        raise ValueError(f"norm must be group, batch or none, got {norm!r}")
    if cfg.residual_reduction not in ("mean", "peak"):
        raise ValueError(f"residual_reduction must be mean or peak, got {cfg.residual_reduction!r}")
    if cfg.residual_polarity not in ("both", "darker", "brighter"):
        raise ValueError(f"residual_polarity must be both, darker or brighter, got {cfg.residual_polarity!r}")


def spectral(cfg: Any) -> Any:
    """Spectral normalisation for D's layers when `cfg.spectral_norm`, else the identity."""
    return nn.utils.parametrizations.spectral_norm if cfg.spectral_norm else (lambda m: m)


def discriminator_trunk(cfg: Any) -> nn.Sequential:
    """D's image trunk: DCGAN stride-2 convs with LeakyReLU, channels cfg.width(i), n_stages of them.

    No dropout on conv maps: it cost a quarter of D's time on CPU for no gain we could measure.
    """
    sn = spectral(cfg)
    layers: list[nn.Module] = []
    in_ch = cfg.channels
    for i in range(cfg.n_stages):
        layers += [sn(nn.Conv2d(in_ch, cfg.width(i), 4, 2, 1)), nn.LeakyReLU(0.2)]  # halves H, W
        in_ch = cfg.width(i)
    return nn.Sequential(*layers)


def build_encoder(cfg: Any) -> nn.Module:
    return SpatialEncoder(cfg) if getattr(cfg, "latent", "vector") == "spatial" else Encoder(cfg)


def build_generator(cfg: Any) -> nn.Module:
    return SpatialGenerator(cfg) if getattr(cfg, "latent", "vector") == "spatial" else Generator(cfg)


def _down_layers(cfg: Any) -> list[nn.Module]:
    """The encoders' DCGAN stride-2 stages: image -> (w_last, S / 2^n_stages, S / 2^n_stages)."""
    layers: list[nn.Module] = [nn.Conv2d(cfg.channels, cfg.width(0), 4, 2, 1), nn.LeakyReLU(0.2)]
    for i in range(1, cfg.n_stages):
        layers += [
            nn.Conv2d(cfg.width(i - 1), cfg.width(i), 4, 2, 1, bias=False),
            norm_layer(cfg.norm, cfg.width(i)),
            nn.LeakyReLU(0.2),
        ]
    return layers


def _up_layers(cfg: Any) -> list[nn.Module]:
    """The generators' stride-2 transposed stages from w_last maps to the image, tanh output."""
    layers: list[nn.Module] = []
    for i in range(cfg.n_stages - 1, 0, -1):
        layers += [
            nn.ConvTranspose2d(cfg.width(i), cfg.width(i - 1), 4, 2, 1, bias=False),  # doubles H, W
            norm_layer(cfg.norm, cfg.width(i - 1)),
            nn.ReLU(),
        ]
    return [*layers, nn.ConvTranspose2d(cfg.width(0), cfg.channels, 4, 2, 1), nn.Tanh()]


class SpatialEncoder(nn.Module):
    """x (N, C, H, W) -> z (N, latent, H / stride, W / stride): fully convolutional, any H and W.

    A 64-d vector cannot hold the detail of a circuit board or a textured tile; a map of
    codes keeps where things are and lets one network score tiles or whole frames.
    """

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.net = nn.Sequential(*_down_layers(cfg), nn.Conv2d(cfg.width(cfg.n_stages - 1), cfg.latent_dim, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SpatialGenerator(nn.Module):
    """z (N, latent, h, w) -> x (N, C, h * stride, w * stride): the spatial encoder's mirror image."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        top = cfg.n_stages - 1
        self.net = nn.Sequential(
            nn.Conv2d(cfg.latent_dim, cfg.width(top), 3, 1, 1, bias=False),
            norm_layer(cfg.norm, cfg.width(top)),
            nn.ReLU(),
            *_up_layers(cfg),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class SegmentationHead(nn.Module):
    """Defect logits (N, H, W) from the image, its reconstruction and their difference (DRAEM's idea).

    A small U-Net: three stride-2 stages, a dilated context layer, and 1x1 merges of the
    skip connections (3x3 convolutions at full resolution would cost more than the rest
    of the model together). Nearest upsampling and plain convolutions only, so that all
    of it quantizes to INT8 in onnxruntime.
    """

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        w = width

        def conv(cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, k, stride, dilation * (k // 2), dilation=dilation), nn.LeakyReLU(0.2)
            )

        self.at_1 = conv(3 * channels, w)  # H
        self.at_2 = conv(w, 2 * w, stride=2)  # H / 2
        self.at_4 = conv(2 * w, 4 * w, stride=2)  # H / 4
        self.at_8 = nn.Sequential(conv(4 * w, 8 * w, stride=2), conv(8 * w, 8 * w, dilation=2))  # H / 8
        self.up_4 = nn.Sequential(conv(12 * w, 4 * w, k=1), conv(4 * w, 4 * w))
        self.up_2 = nn.Sequential(conv(6 * w, 2 * w, k=1), conv(2 * w, 2 * w))
        self.out = nn.Conv2d(3 * w, 1, 1)

    def forward(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        def up(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.interpolate(t, scale_factor=2.0, mode="nearest")

        f1 = self.at_1(torch.cat([x, recon, (x - recon).abs()], dim=1))
        f2 = self.at_2(f1)
        f4 = self.at_4(f2)
        f8 = self.at_8(f4)
        u4 = self.up_4(torch.cat([up(f8), f4], dim=1))
        u2 = self.up_2(torch.cat([up(u4), f2], dim=1))
        return self.out(torch.cat([up(u2), f1], dim=1)).squeeze(1)  # (N, H, W) logits


class Encoder(nn.Module):
    """x (N, C, S, S) -> z (N, latent): DCGAN stride-2 convs down to 4x4, then 4x4 -> 1x1."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        # (w_last) x 4 x 4 -> latent x 1 x 1
        self.net = nn.Sequential(*_down_layers(cfg), nn.Conv2d(cfg.width(cfg.n_stages - 1), cfg.latent_dim, 4, 1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)  # (N, latent)


class Generator(nn.Module):
    """z (N, latent) -> x (N, C, S, S): the encoder's mirror image, tanh output in [-1, 1]."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        top = cfg.n_stages - 1
        self.net = nn.Sequential(
            nn.ConvTranspose2d(cfg.latent_dim, cfg.width(top), 4, 1, 0, bias=False),  # w_last x 4 x 4
            norm_layer(cfg.norm, cfg.width(top)),
            nn.ReLU(),
            *_up_layers(cfg),
        )
        self.latent_dim = cfg.latent_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(-1, self.latent_dim, 1, 1))  # (N, C, S, S)
