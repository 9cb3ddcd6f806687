"""Efficient GAN (Zenati et al. 2018, arXiv:1802.06222): a BiGAN with an encoder.

    E: x -> z          encoder, DCGAN stride-2 convs from image_size down to 4x4, then 4x4 -> 1x1
    G: z -> x          generator, the mirror image, tanh output in [-1, 1]
    D: (x, z) -> real? joint discriminator: conv trunk on x, MLP on z, joined by an MLP
                       whose hidden layer f_D is used for feature matching

`EfficientGAN.forward(images_uint8_nhwc)` is the edge contract (see ganspect.edge.manifest):
uint8 NHWC in, (score (N,), heatmap (N, H, W)) out, with normalisation, the Gaussian
smoothing and the heatmap scale inside the graph. The score is

    A(x) = (1 - lambda) * L_R + lambda * L_D
    L_D  = mean |f_D(x, E(x)) - f_D(G(E(x)), E(x))|             ("feature_matching")
    L_D  = softplus(-D(x, E(x))) = BCE(D(x, E(x)), real)        ("cross_entropy")

(the two discrimination losses of the paper: feature matching on D's joint hidden
layer, or the cross-entropy of D's verdict on the pair (x, E(x)) against "real"),

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

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ganspect.train.models.common import (  # noqa: F401  (re-exported: older imports use this module)
    Encoder,
    Generator,
    ScoreParts,
    ScoringModel,
    SegmentationHead,
    StagedConfig,
    build_encoder,
    build_generator,
    check_common,
    dcgan_init,
    gaussian_kernel_1d,
    weighted_score,
)

DISCRIMINATIONS = ("feature_matching", "cross_entropy")


@dataclass
class EfficientGANConfig(StagedConfig):
    image_size: int = 64          # square side, power of two in [32, 256]
    channels: int = 1             # 1 gray, 3 BGR
    latent_dim: int = 64
    base_width: int = 32          # feature maps of the first conv stage; doubles per stage
    max_width: int = 512          # cap so that 256x256 models stay a sensible size
    lambda_: float = 0.1          # score weight of L_D; the seeds found small values better
    discrimination: str = "feature_matching"  # or "cross_entropy"; see module docstring
    residual_reduction: str = "peak"  # "mean" (the papers) or "peak" (local defects); see module docstring
    heatmap_sigma: float = 2.0    # Gaussian sigma in pixels at image_size
    spectral_norm: bool = True
    d_dropout: float = 0.2
    d_feature_dim: int = 512      # width of D's joint feature layer f_D
    d_z_dim: int = 256            # width of D's z branch
    norm: str = "batch"           # E and G normalisation: "batch", "group" or "none" (see norm_layer)
    latent: str = "vector"        # "vector" (N, latent_dim) or "spatial" (N, latent_dim, S/stride, S/stride)
    latent_stride: int = 8        # spatial latent only: image pixels per latent cell
    segmentation_head: bool = False  # a defect-segmentation head on (x, G(E(x))), trained on pseudo-defects
    head_width: int = 8           # feature maps of the head's full-resolution stage
    scoring: str = "residual"     # "residual" (A(x) from L_R and L_D) or "segmentation" (the head's map)

    def __post_init__(self) -> None:
        check_common(self.image_size, self.channels, self.lambda_, self.norm, self.residual_reduction,
                     self.latent, self.latent_stride, self.scoring, self.segmentation_head)
        if self.discrimination not in DISCRIMINATIONS:
            raise ValueError(f"discrimination must be one of {', '.join(DISCRIMINATIONS)}, "
                             f"got {self.discrimination!r}")


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


class PatchDiscriminator(nn.Module):
    """D(x, z) for a spatial latent: one verdict per latent cell (N, h, w), fully convolutional.

    The x trunk comes down to the latent's resolution, where it meets z; `features` is
    the joint map (N, d_feature_dim, h, w) used for feature matching.
    """

    def __init__(self, cfg: EfficientGANConfig) -> None:
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm if cfg.spectral_norm else (lambda m: m)
        x_layers: list[nn.Module] = []
        in_ch = cfg.channels
        for i in range(cfg.n_stages):
            x_layers += [sn(nn.Conv2d(in_ch, cfg.width(i), 4, 2, 1)), nn.LeakyReLU(0.2)]
            in_ch = cfg.width(i)
        self.x_net = nn.Sequential(*x_layers)
        width = min(cfg.d_feature_dim, 4 * in_ch)
        self.joint = nn.Sequential(sn(nn.Conv2d(in_ch + cfg.latent_dim, width, 1)), nn.LeakyReLU(0.2))
        self.dropout = nn.Dropout2d(cfg.d_dropout)
        self.head = sn(nn.Conv2d(width, 1, 1))

    def features(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.joint(torch.cat([self.x_net(x), z], dim=1))  # (N, F, h, w)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x, z)
        return self.head(self.dropout(f)).squeeze(1), f  # logits (N, h, w), features


class EfficientGAN(ScoringModel):
    def __init__(self, cfg: EfficientGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg)
        self.generator = build_generator(cfg)
        self.discriminator = PatchDiscriminator(cfg) if cfg.latent == "spatial" else Discriminator(cfg)
        if cfg.segmentation_head:
            self.segmentation_head = SegmentationHead(cfg.channels, cfg.head_width)
        self._init_scoring(cfg.heatmap_sigma)

    def prior(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """n codes z ~ N(0, I) shaped as the encoder's output for images like `like` (N, C, H, W)."""
        if self.cfg.latent == "spatial":
            s = self.cfg.latent_stride
            return torch.randn(n, self.cfg.latent_dim, like.shape[2] // s, like.shape[3] // s, device=like.device)
        return torch.randn(n, self.cfg.latent_dim, device=like.device)

    def score_parts(self, x: torch.Tensor) -> ScoreParts:
        """x: float (N, C, H, W) in [-1, 1]. Call in eval mode for deterministic scores."""
        z = self.encoder(x)                                   # (N, latent)
        recon = self.generator(z)                             # (N, C, H, W)
        l_r, residual = self.residual_terms(x, recon)         # (N,), (N, H, W)
        if self.cfg.discrimination == "cross_entropy":
            logit_real, _ = self.discriminator(x, z)          # (N,)
            # BCE against the label "real": large when D finds the pair (x, E(x)) fake.
            l_d = F.softplus(-logit_real)                     # (N,) or (N, h, w)
            l_d = l_d.flatten(1).mean(dim=1) if l_d.dim() > 1 else l_d
        else:
            f_real = self.discriminator.features(x, z)        # (N, F) or (N, F, h, w)
            f_fake = self.discriminator.features(recon, z)
            l_d = (f_real - f_fake).abs().flatten(1).mean(dim=1)  # (N,)
        return ScoreParts(l_r=l_r, l_d=l_d, residual=residual, recon=recon, segmentation=self.segment(x, recon))


def build_model(cfg: EfficientGANConfig) -> EfficientGAN:
    model = EfficientGAN(cfg)
    dcgan_init(model)
    return model


def load_model(checkpoint: dict[str, Any]) -> EfficientGAN:
    """Rebuild a model from a checkpoint dict alone (its `model_config` and `model` state)."""
    cfg = EfficientGANConfig.from_dict(checkpoint["model_config"])
    model = EfficientGAN(cfg)
    model.load_state_dict(checkpoint["model"])
    return model
