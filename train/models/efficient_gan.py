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

from ganspect.train.models.common import (
    ScoreParts,
    ScoringModel,
    SegmentationHead,
    StagedConfig,
    build_encoder,
    build_generator,
    check_common,
    dcgan_init,
    discriminator_trunk,
    painted,
    section_default,
    segmentation_loss,
    spectral,
)

DISCRIMINATIONS = ("feature_matching", "cross_entropy")


@dataclass
class EfficientGANConfig(StagedConfig):
    image_size: int = section_default("image_size")  # square side, power of two in [32, 256]
    channels: int = section_default("channels")  # 1 gray, 3 BGR
    latent_dim: int = section_default("latent_dim")
    base_width: int = section_default("base_width")  # feature maps of the first conv stage; doubles per stage
    max_width: int = 512  # cap so that 256x256 models stay a sensible size
    lambda_: float = section_default("lambda_")  # score weight of L_D; the seeds found small values better
    discrimination: str = section_default("discrimination")  # or "cross_entropy"; see module docstring
    residual_reduction: str = section_default("residual_reduction")  # "mean" (the papers) or "peak" (local defects)
    residual_polarity: str = section_default("residual_polarity")  # both, darker or brighter
    heatmap_sigma: float = 2.0  # Gaussian sigma in pixels at image_size
    heatmap_spread: int = section_default("heatmap_spread")  # pixels a max filter widens the map by, each side
    spectral_norm: bool = section_default("spectral_norm")
    d_dropout: float = section_default("d_dropout")
    d_feature_dim: int = 512  # width of D's joint feature layer f_D
    d_z_dim: int = 256  # width of D's z branch
    pixel_calibration: bool = False  # per-pixel mean/spread of the normal map (calibration.per_pixel)
    norm: str = section_default("norm")  # E and G normalisation: "batch", "group" or "none" (see norm_layer)
    latent: str = section_default("latent")  # "vector" (N, latent_dim) or "spatial" (N, latent_dim, S/s, S/s)
    latent_stride: int = section_default("latent_stride")  # spatial latent only: image pixels per latent cell
    segmentation_head: bool = section_default("segmentation_head")  # marks pseudo-defects from (x, G(E(x)))
    head_width: int = section_default("head_width")  # feature maps of the head's full-resolution stage
    scoring: str = section_default("scoring")  # "residual" (A(x) from L_R and L_D) or "segmentation" (the head's map)

    def __post_init__(self) -> None:
        check_common(self)
        if self.discrimination not in DISCRIMINATIONS:
            raise ValueError(f"discrimination must be one of {', '.join(DISCRIMINATIONS)}, got {self.discrimination!r}")


class Discriminator(nn.Module):
    """D(x, z). `features(x, z)` is the joint hidden layer f_D used for feature matching."""

    def __init__(self, cfg: EfficientGANConfig) -> None:
        super().__init__()
        sn = spectral(cfg)
        self.x_net = discriminator_trunk(cfg)  # (N, w_last, 4, 4)
        self.z_net = nn.Sequential(
            sn(nn.Linear(cfg.latent_dim, cfg.d_z_dim)),
            nn.LeakyReLU(0.2),
            nn.Dropout(cfg.d_dropout),
        )  # (N, d_z_dim)
        joint_in = cfg.width(cfg.n_stages - 1) * 16 + cfg.d_z_dim
        self.x_dropout = nn.Dropout(cfg.d_dropout)
        self.joint = nn.Sequential(
            sn(nn.Linear(joint_in, cfg.d_feature_dim)),
            nn.LeakyReLU(0.2),
        )  # (N, d_feature_dim): f_D
        self.dropout = nn.Dropout(cfg.d_dropout)
        self.head = sn(nn.Linear(cfg.d_feature_dim, 1))  # (N, 1) logit

    def features(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        hx = self.x_dropout(self.x_net(x).flatten(1))  # (N, w_last * 16)
        hz = self.z_net(z)  # (N, d_z_dim)
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
        sn = spectral(cfg)
        self.x_net = discriminator_trunk(cfg)  # (N, w_last, h, w)
        in_ch = cfg.width(cfg.n_stages - 1)
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

    def recipe(self, config: Any, device: torch.device) -> EfficientGANRecipe:
        """The training recipe for this model under a TrainConfig."""
        return EfficientGANRecipe(self, config, device)

    def score_parts(self, x: torch.Tensor) -> ScoreParts:
        """x: float (N, C, H, W) in [-1, 1]. Call in eval mode for deterministic scores."""
        z = self.encoder(x)  # (N, latent)
        recon = self.generator(z)  # (N, C, H, W)
        l_r, residual = self.residual_terms(x, recon)  # (N,), (N, H, W)
        if self.cfg.discrimination == "cross_entropy":
            logit_real, _ = self.discriminator(x, z)  # (N,)
            # BCE against the label "real": large when D finds the pair (x, E(x)) fake.
            l_d = F.softplus(-logit_real)  # (N,) or (N, h, w)
            l_d = l_d.flatten(1).mean(dim=1) if l_d.dim() > 1 else l_d
        else:
            f_real = self.discriminator.features(x, z)  # (N, F) or (N, F, h, w)
            f_fake = self.discriminator.features(recon, z)
            l_d = (f_real - f_fake).abs().flatten(1).mean(dim=1)  # (N,)
        return ScoreParts(l_r=l_r, l_d=l_d, residual=residual, recon=recon, segmentation=self.segment(x, recon))


class EfficientGANRecipe:
    """How an Efficient GAN learns: one phase of BiGAN steps (plus reconstruction and, with
    pseudo-defects, restoration and segmentation), `train.steps` of them."""

    def __init__(self, model: EfficientGAN, config: Any, device: torch.device) -> None:
        self.model, self.config, self.device = model, config, device
        t = config.train
        betas = (t.beta1, 0.999)
        self.opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=t.lr_d, betas=betas)
        # The segmentation head learns from detached reconstructions: one optimiser serves all three.
        head = list(model.segmentation_head.parameters()) if hasattr(model, "segmentation_head") else []
        self.opt_eg = torch.optim.Adam(
            list(model.encoder.parameters()) + list(model.generator.parameters()) + head, lr=t.lr, betas=betas
        )
        self.optimisers = {"opt_d": self.opt_d, "opt_eg": self.opt_eg}
        self.defect_rng = torch.Generator().manual_seed(t.seed + 1)
        self.total_steps = t.steps

    def phase(self, step: int) -> str:
        return "gan"

    def validates(self, step: int) -> bool:
        """Whether a validation after `step` steps means anything (always: E and G learn from the start)."""
        return True

    def before_step(self, step: int, ema: Any) -> None:
        """Nothing changes between steps."""

    def step(self, x: torch.Tensor, step: int) -> dict[str, float]:
        return self._bigan_step(x)

    def _bigan_step(self, x: torch.Tensor) -> dict[str, float]:
        """One D update and one E+G (+ segmentation head) update (Efficient GAN).

        With pseudo-defects, E and G see the painted image and learn to restore the clean
        one, and the head learns to mark what was painted from (painted, restoration).
        """
        m = self.model
        t = self.config.train
        losses: dict[str, float] = {}
        x_in, mask = painted(x, self.config, self.defect_rng)
        z_prior = m.prior(x.shape[0], x)
        adversarial = t.adversarial_weight > 0

        if adversarial:
            # D: real pairs (x, E(x)) vs fake pairs (G(z), z); E and G are held fixed.
            with torch.no_grad():
                z_enc = m.encoder(x)
                x_gen = m.generator(z_prior)
            logit_real, _ = m.discriminator(x, z_enc)
            logit_fake, _ = m.discriminator(x_gen, z_prior)
            loss_d = F.binary_cross_entropy_with_logits(
                logit_real, torch.ones_like(logit_real)
            ) + F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake))
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            self.opt_d.step()
            losses["loss_d"] = loss_d.item()

        # E and G together: swap the labels so that both try to fool D.
        z_enc = m.encoder(x_in)
        recon = m.generator(z_enc)
        loss_eg = torch.zeros((), device=self.device)
        if adversarial:
            logit_real, _ = m.discriminator(x_in, z_enc)
            logit_fake, _ = m.discriminator(m.generator(z_prior), z_prior)
            loss_adv = F.binary_cross_entropy_with_logits(
                logit_real, torch.zeros_like(logit_real)
            ) + F.binary_cross_entropy_with_logits(logit_fake, torch.ones_like(logit_fake))
            loss_eg = loss_eg + t.adversarial_weight * loss_adv
            losses["loss_g"] = loss_adv.item()
        loss_recon = (x - recon).abs().mean()
        if t.recon_weight > 0:
            loss_eg = loss_eg + t.recon_weight * loss_recon
        losses["loss_recon"] = loss_recon.item()
        loss_seg = segmentation_loss(m, x_in, recon, mask)
        if loss_seg is not None:
            loss_eg = loss_eg + t.segmentation_weight * loss_seg
            losses["loss_seg"] = loss_seg.item()
        self.opt_eg.zero_grad(set_to_none=True)
        loss_eg.backward()
        if t.grad_clip is not None:
            params = [p for group in self.opt_eg.param_groups for p in group["params"]]
            losses["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, t.grad_clip))
        self.opt_eg.step()
        return losses


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
