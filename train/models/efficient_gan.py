"""Efficient GAN (Zenati et al. 2018, arXiv:1802.06222): a BiGAN with an encoder.

    E: x -> z          encoder, DCGAN stride-2 convs from image_size down to 4x4, then 4x4 -> 1x1
    G: z -> x          generator, the mirror image, tanh output in [-1, 1]
    D: (x, z) -> real? joint discriminator: conv trunk on x, MLP on z, joined by an MLP
                       whose hidden layer f_D is used for feature matching

`EfficientGAN.forward(images_uint8_nhwc)` is the edge contract (see ganspect.edge.manifest):
uint8 NHWC in, (score (N,), heatmap (N, H, W)) out, with normalisation, the Gaussian
smoothing and the heatmap scale inside the graph. The score is

    A(x) = (1 - lambda) * L_R + lambda * L_D
    L_D  = mean |f_D(x, E(x)) - f_D(G(E(x)), E(x))|             (feature matching)

and the residual term L_R reduces the per-pixel residual r = mean_C |x - G(E(x))|
(x in [-1, 1]) to one number in one of two ways (`residual_reduction`):

    "mean": L_R = mean over H, W of r          the papers' ‖x - G(E(x))‖₁ (per pixel)
    "peak": L_R = max over H, W of smooth(r)   the heatmap's peak, before scaling

The papers score whole-image anomalies (another MNIST digit), where the mean is right.
A defect on a machined part covers 1-4 % of the image: its residual drowns in the mean
of the normal residual of the other 96 %, while the smoothed peak stands out. On the
synthetic parts the same trained models score image AUROC 0.72-0.80 with "mean" and
0.97-1.00 with "peak" (see the closing note of the foundation issue).

Calibration values (`heatmap_scale`, `threshold`) are registered buffers: they travel in
the checkpoint and in the exported graph, so the deployed model cannot disagree with the
trained one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class EfficientGANConfig:
    image_size: int = 64          # square side, power of two in [32, 256]
    channels: int = 1             # 1 gray, 3 BGR
    latent_dim: int = 64
    base_width: int = 32          # feature maps of the first conv stage; doubles per stage
    max_width: int = 512          # cap so that 256x256 models stay a sensible size
    lambda_: float = 0.1          # score weight of L_D; the seeds found small values better
    discrimination: str = "feature_matching"
    residual_reduction: str = "peak"  # "mean" (the papers) or "peak" (local defects); see module docstring
    heatmap_sigma: float = 2.0    # Gaussian sigma in pixels at image_size
    spectral_norm: bool = True
    d_dropout: float = 0.2
    d_feature_dim: int = 512      # width of D's joint feature layer f_D
    d_z_dim: int = 256            # width of D's z branch
    norm: str = "batch"           # E and G normalisation: "batch", "group" or "none" (see _norm)

    def __post_init__(self) -> None:
        s = self.image_size
        if s < 32 or s > 256 or s & (s - 1):
            raise ValueError(f"image_size must be a power of two from 32 to 256, got {s}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if not 0.0 <= self.lambda_ <= 1.0:
            raise ValueError(f"lambda must be in [0, 1], got {self.lambda_}")
        if self.norm not in ("group", "batch", "none"):
            raise ValueError(f"norm must be group, batch or none, got {self.norm!r}")
        if self.residual_reduction not in ("mean", "peak"):
            raise ValueError(f"residual_reduction must be mean or peak, got {self.residual_reduction!r}")
        if self.discrimination != "feature_matching":
            raise ValueError(f"discrimination {self.discrimination!r} is not supported (feature_matching only)")

    @property
    def n_stages(self) -> int:
        """Stride-2 stages from image_size down to 4x4 (64 -> 4 stages)."""
        return int(math.log2(self.image_size)) - 2

    def width(self, stage: int) -> int:
        return min(self.base_width * 2**stage, self.max_width)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EfficientGANConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _norm(kind: str, channels: int) -> nn.Module:
    """Feature normalisation for E and G.

    BatchNorm (DCGAN's choice) reconstructed far better in our CPU-minute budget. In a
    BiGAN, G sees batches of prior samples z ~ N(0, I) and of encodings E(x), whose
    statistics differ, so the trainer re-estimates G's running statistics on E(x) after
    training (ganspect.train.loop.refresh_generator_batchnorm). GroupNorm avoids the
    issue by normalising each image on its own, but learned much more slowly here.
    """
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels // 4), channels)
    return nn.Identity()


class Encoder(nn.Module):
    def __init__(self, cfg: EfficientGANConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(cfg.channels, cfg.width(0), 4, 2, 1),  # w x S/2 x S/2
            nn.LeakyReLU(0.2),
        ]
        for i in range(1, cfg.n_stages):
            layers += [
                nn.Conv2d(cfg.width(i - 1), cfg.width(i), 4, 2, 1, bias=False),  # w*2^i x S/2^(i+1)
                _norm(cfg.norm, cfg.width(i)),
                nn.LeakyReLU(0.2),
            ]
        # (w_last) x 4 x 4 -> latent x 1 x 1
        layers.append(nn.Conv2d(cfg.width(cfg.n_stages - 1), cfg.latent_dim, 4, 1, 0))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)  # (N, latent)


class Generator(nn.Module):
    def __init__(self, cfg: EfficientGANConfig) -> None:
        super().__init__()
        top = cfg.n_stages - 1
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(cfg.latent_dim, cfg.width(top), 4, 1, 0, bias=False),  # w_last x 4 x 4
            _norm(cfg.norm, cfg.width(top)),
            nn.ReLU(),
        ]
        for i in range(top, 0, -1):
            layers += [
                nn.ConvTranspose2d(cfg.width(i), cfg.width(i - 1), 4, 2, 1, bias=False),  # doubles H, W
                _norm(cfg.norm, cfg.width(i - 1)),
                nn.ReLU(),
            ]
        layers += [nn.ConvTranspose2d(cfg.width(0), cfg.channels, 4, 2, 1), nn.Tanh()]  # C x S x S
        self.net = nn.Sequential(*layers)
        self.latent_dim = cfg.latent_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(-1, self.latent_dim, 1, 1))  # (N, C, S, S)


class Discriminator(nn.Module):
    """D(x, z). `features(x, z)` is the joint hidden layer f_D used for feature matching."""

    def __init__(self, cfg: EfficientGANConfig) -> None:
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm if cfg.spectral_norm else (lambda m: m)
        x_layers: list[nn.Module] = []
        in_ch = cfg.channels
        for i in range(cfg.n_stages):
            # No dropout on conv maps: it cost a quarter of D's time on CPU for no gain we could measure.
            x_layers += [sn(nn.Conv2d(in_ch, cfg.width(i), 4, 2, 1)), nn.LeakyReLU(0.2)]
            in_ch = cfg.width(i)
        self.x_net = nn.Sequential(*x_layers)  # (N, w_last, 4, 4)
        self.z_net = nn.Sequential(
            sn(nn.Linear(cfg.latent_dim, cfg.d_z_dim)), nn.LeakyReLU(0.2), nn.Dropout(cfg.d_dropout),
        )  # (N, d_z_dim)
        joint_in = cfg.width(cfg.n_stages - 1) * 16 + cfg.d_z_dim
        self.x_dropout = nn.Dropout(cfg.d_dropout)
        self.joint = nn.Sequential(
            sn(nn.Linear(joint_in, cfg.d_feature_dim)), nn.LeakyReLU(0.2),
        )  # (N, d_feature_dim): f_D
        self.dropout = nn.Dropout(cfg.d_dropout)
        self.head = sn(nn.Linear(cfg.d_feature_dim, 1))  # (N, 1) logit

    def features(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        hx = self.x_dropout(self.x_net(x).flatten(1))  # (N, w_last * 16)
        hz = self.z_net(z)                     # (N, d_z_dim)
        return self.joint(torch.cat([hx, hz], dim=1))  # (N, d_feature_dim)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x, z)
        return self.head(self.dropout(f)).squeeze(1), f  # logit (N,), features (N, F)


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


@dataclass
class ScoreParts:
    """What scoring computes before weighting; evaluation uses it for the lambda sweep."""

    l_r: torch.Tensor        # (N,)
    l_d: torch.Tensor        # (N,)
    residual: torch.Tensor   # (N, H, W) smoothed, not yet divided by heatmap_scale
    recon: torch.Tensor      # (N, C, H, W) G(E(x)) in [-1, 1]


class EfficientGAN(nn.Module):
    def __init__(self, cfg: EfficientGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.generator = Generator(cfg)
        self.discriminator = Discriminator(cfg)
        k = gaussian_kernel_1d(cfg.heatmap_sigma)
        # Separable smoothing as two fixed convs: (1, 1, 1, K) and (1, 1, K, 1).
        self.register_buffer("smooth_h", k.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("smooth_v", k.view(1, 1, -1, 1), persistent=False)
        # Calibration, set after training from held-out normals; persistent so the
        # checkpoint and the exported graph carry them.
        self.register_buffer("heatmap_scale", torch.tensor(1.0))
        self.register_buffer("threshold", torch.tensor(float("inf")))

    @staticmethod
    def normalise(images_uint8_nhwc: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1], exactly x / 127.5 - 1."""
        x = images_uint8_nhwc.to(torch.float32).permute(0, 3, 1, 2)
        return x / 127.5 - 1.0

    def smooth(self, residual: torch.Tensor) -> torch.Tensor:
        """(N, H, W) -> (N, H, W) Gaussian-smoothed, border pixels replicated."""
        r = residual.unsqueeze(1)  # (N, 1, H, W)
        pad = self.smooth_h.shape[-1] // 2
        if pad:
            r = F.pad(r, (pad, pad, pad, pad), mode="replicate")
            r = F.conv2d(F.conv2d(r, self.smooth_h), self.smooth_v)
        return r.squeeze(1)

    def score_parts(self, x: torch.Tensor) -> ScoreParts:
        """x: float (N, C, H, W) in [-1, 1]. Call in eval mode for deterministic scores."""
        z = self.encoder(x)                                   # (N, latent)
        recon = self.generator(z)                             # (N, C, H, W)
        per_pixel = (x - recon).abs().mean(dim=1)             # (N, H, W)
        residual = self.smooth(per_pixel)                     # (N, H, W)
        if self.cfg.residual_reduction == "peak":
            l_r = residual.amax(dim=(1, 2))                   # (N,)
        else:
            l_r = per_pixel.mean(dim=(1, 2))                  # (N,)
        f_real = self.discriminator.features(x, z)            # (N, F)
        f_fake = self.discriminator.features(recon, z)        # (N, F)
        l_d = (f_real - f_fake).abs().mean(dim=1)             # (N,)
        return ScoreParts(l_r=l_r, l_d=l_d, residual=residual, recon=recon)

    def forward(self, images_uint8_nhwc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The edge contract: uint8 (N, H, W, C) -> score (N,), heatmap (N, H, W)."""
        parts = self.score_parts(self.normalise(images_uint8_nhwc))
        score = weighted_score(parts.l_r, parts.l_d, self.cfg.lambda_)
        heatmap = parts.residual / self.heatmap_scale
        return score, heatmap


def build_model(cfg: EfficientGANConfig) -> EfficientGAN:
    model = EfficientGAN(cfg)
    for m in model.modules():
        # DCGAN initialisation: N(0, 0.02) convs, N(1, 0.02) batch-norm scales.
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            w = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            nn.init.normal_(w, 0.0, 0.02)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return model


def load_model(checkpoint: dict[str, Any]) -> EfficientGAN:
    """Rebuild a model from a checkpoint dict alone (its `model_config` and `model` state)."""
    cfg = EfficientGANConfig.from_dict(checkpoint["model_config"])
    model = EfficientGAN(cfg)
    model.load_state_dict(checkpoint["model"])
    return model
