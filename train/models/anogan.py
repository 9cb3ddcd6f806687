"""AnoGAN (Schlegl et al. 2017) with a one-pass encoder (f-AnoGAN's izi_f, Schlegl et al. 2019).

    G: z -> x        DCGAN generator (the same network as Efficient GAN's G)
    D: x -> real?    DCGAN discriminator; f(x) = its last conv maps, flattened, for feature matching
    E: x -> z        encoder, trained after the GAN with G and D frozen

Two ways to score an image x (in [-1, 1]), both with

    A(x) = (1 - lambda) * L_R + lambda * L_D,   L_D = mean |f(x) - f(G(z))|   (feature matching)

and L_R reduced from the per-pixel residual r = mean_C |x - G(z)| as in Efficient GAN
("mean" or "peak", see ganspect.train.models.efficient_gan):

- **latent search** (the paper, seeds 002 and 003): z starts from N(0, I) and follows
  Adam on `(1 - lambda) * mean |x - G(z)| + lambda * L_D` for a set number of steps,
  independently per image (G in eval mode, so images in a batch do not interact).
  Slow by design: it stays on the workstation (`AnoGAN.search_parts`).
- **one pass**: z = E(x). `AnoGAN.forward(images_uint8_nhwc)` is the edge contract
  (uint8 NHWC in, score (N,) and heatmap (N, H, W) out), the same as Efficient GAN's,
  with the same calibration buffers, so the export path does not care which model it has.

The encoder is trained izi_f style: minimise mean |x - G(E(x))| + kappa * mean |f(x) - f(G(E(x)))|
over the training normals, G and D frozen (f-AnoGAN uses squared errors; we use the same
L1 distances the score uses).

At the station's scale (`latent: spatial`, `segmentation_head`, see docs/detection.md) the
same two phases carry the pseudo-defect recipe: G learns from maps of codes (one per
latent cell) against a patch D, and in the encoder phase E sees the painted image and
learns to find the code of the clean one, while the segmentation head learns to mark
what was painted from (x, G(E(x)), |x - G(E(x))|). G stays a pure GAN generator, so the
restoration is as good as what G can draw: Efficient GAN, whose G learns to restore
directly, is the default.
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


@dataclass
class AnoGANConfig(StagedConfig):
    image_size: int = section_default("image_size")  # square side, power of two in [32, 256]
    channels: int = section_default("channels")  # 1 gray, 3 BGR
    latent_dim: int = section_default("latent_dim")  # seeds 002/003 used 20 and 30
    base_width: int = section_default("base_width")  # feature maps of the first conv stage; doubles per stage
    max_width: int = 512
    lambda_: float = section_default("lambda_")  # score weight of L_D
    discrimination: str = section_default("discrimination")  # AnoGAN's L_D is always feature matching
    residual_reduction: str = section_default("residual_reduction")
    residual_polarity: str = section_default("residual_polarity")
    heatmap_sigma: float = 2.0
    heatmap_spread: int = section_default("heatmap_spread")
    spectral_norm: bool = section_default("spectral_norm")
    pixel_calibration: bool = False  # per-pixel mean/spread of the normal map (calibration.per_pixel)
    norm: str = section_default("norm")  # E and G normalisation
    latent: str = section_default("latent")  # "vector" (N, latent_dim) or "spatial" (N, latent_dim, S/s, S/s)
    latent_stride: int = section_default("latent_stride")  # spatial latent only: image pixels per latent cell
    segmentation_head: bool = section_default("segmentation_head")  # trained in the encoder phase
    head_width: int = section_default("head_width")
    scoring: str = section_default("scoring")  # "residual" or "segmentation" (the head's map)

    def __post_init__(self) -> None:
        check_common(self)
        if self.discrimination != "feature_matching":
            raise ValueError(f"AnoGAN scores with feature matching only, got discrimination {self.discrimination!r}")


class ImageDiscriminator(nn.Module):
    """D(x): DCGAN conv trunk; `features(x)` = the last conv maps flattened, (N, w_last * h * w).

    Vector latent: the trunk ends at 4x4 and one linear verdict judges the image. Spatial
    latent: the trunk ends at the latent's resolution and a 1x1 convolution gives one
    verdict per cell (a patch discriminator), so any image size works.
    """

    def __init__(self, cfg: AnoGANConfig) -> None:
        super().__init__()
        self.trunk = discriminator_trunk(cfg)  # (N, w_last, 4, 4) or (N, w_last, S/s, S/s)
        w_last = cfg.width(cfg.n_stages - 1)
        self.patches = cfg.latent == "spatial"
        if self.patches:
            self.head: nn.Module = spectral(cfg)(nn.Conv2d(w_last, 1, 1))  # (N, 1, h, w) logits
        else:
            self.head = spectral(cfg)(nn.Linear(w_last * 16, 1))  # (N, 1) logit

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x).flatten(1)  # (N, F)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.trunk(x)
        logits = self.head(maps).flatten(1) if self.patches else self.head(maps.flatten(1)).squeeze(1)
        return logits, maps.flatten(1)  # logits (N,) or (N, h * w), features (N, F)


@dataclass
class SearchResult:
    parts: ScoreParts
    z: torch.Tensor  # (N, latent) the latent codes found
    loss_history: torch.Tensor  # (steps + 1, N) per-image search loss before each step and at the end
    # z: (N, latent) or, for a spatial latent, (N, latent, H / stride, W / stride)


class AnoGAN(ScoringModel):
    def __init__(self, cfg: AnoGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.generator = build_generator(cfg)
        self.discriminator = ImageDiscriminator(cfg)
        self.encoder = build_encoder(cfg)
        if cfg.segmentation_head:
            self.segmentation_head = SegmentationHead(cfg.channels, cfg.head_width)
        self._init_scoring(cfg.heatmap_sigma)

    def recipe(self, config: Any, device: torch.device) -> AnoGANRecipe:
        """The training recipe for this model under a TrainConfig."""
        return AnoGANRecipe(self, config, device)

    def parts_from_latent(self, x: torch.Tensor, z: torch.Tensor) -> ScoreParts:
        """Score parts of images x (N, C, H, W) in [-1, 1] reconstructed from latent codes z."""
        recon = self.generator(z)  # (N, C, H, W)
        l_r, residual = self.residual_terms(x, recon)  # (N,), (N, H, W)
        l_d = (self.discriminator.features(x) - self.discriminator.features(recon)).abs().mean(dim=1)  # (N,)
        return ScoreParts(l_r=l_r, l_d=l_d, residual=residual, recon=recon, segmentation=self.segment(x, recon))

    def score_parts(self, x: torch.Tensor) -> ScoreParts:
        """One pass: z = E(x). Call in eval mode for deterministic scores."""
        return self.parts_from_latent(x, self.encoder(x))

    def search_loss(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Per-image latent-search objective (N,): (1 - lambda) * mean |x - G(z)| + lambda * L_D."""
        recon = self.generator(z)
        l_r = (x - recon).abs().mean(dim=(1, 2, 3))
        l_d = (self.discriminator.features(x) - self.discriminator.features(recon)).abs().mean(dim=1)
        return (1.0 - self.cfg.lambda_) * l_r + self.cfg.lambda_ * l_d

    def search(
        self,
        x: torch.Tensor,
        steps: int = 500,
        lr: float = 0.05,
        generator: torch.Generator | None = None,
        z_init: torch.Tensor | None = None,
    ) -> SearchResult:
        """Latent search: Adam on z for `steps` steps, each image on its own; G and D untouched.

        The batch's losses are summed, so each z gets exactly its own image's gradient.
        z starts at `z_init` or at a draw from N(0, I) (seeded by `generator`).
        """
        was_training = self.training
        self.eval()
        params = [p for p in self.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            if z_init is None:
                z_init = self.prior(x.shape[0], x, generator)
            z = z_init.detach().clone().requires_grad_(True)
            opt = torch.optim.Adam([z], lr=lr)
            history = []
            with torch.enable_grad():
                for _ in range(steps):
                    loss = self.search_loss(x, z)  # (N,)
                    history.append(loss.detach())
                    opt.zero_grad(set_to_none=True)
                    loss.sum().backward()
                    opt.step()
            with torch.no_grad():
                history.append(self.search_loss(x, z))
                parts = self.parts_from_latent(x, z)
        finally:
            for p in params:
                p.requires_grad_(True)
            self.train(was_training)
        return SearchResult(parts=parts, z=z.detach(), loss_history=torch.stack(history))


class AnoGANRecipe:
    """How AnoGAN learns, in two phases on one step counter: `train.steps` DCGAN steps, then
    `anogan.encoder_steps` of the encoder with G and D frozen at their EMA weights (izi_f)."""

    def __init__(self, model: AnoGAN, config: Any, device: torch.device) -> None:
        self.model, self.config, self.device = model, config, device
        t = config.train
        betas = (t.beta1, 0.999)
        self.opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=t.lr_d, betas=betas)
        self.opt_g = torch.optim.Adam(model.generator.parameters(), lr=t.lr, betas=betas)
        # The segmentation head learns in the encoder phase, beside E, from detached reconstructions.
        head = list(model.segmentation_head.parameters()) if hasattr(model, "segmentation_head") else []
        self.opt_e = torch.optim.Adam(
            list(model.encoder.parameters()) + head, lr=config.anogan.encoder_lr, betas=(0.9, 0.999)
        )
        self.optimisers = {"opt_d": self.opt_d, "opt_g": self.opt_g, "opt_e": self.opt_e}
        self.defect_rng = torch.Generator().manual_seed(t.seed + 1)
        self.gan_steps = t.steps
        self.total_steps = t.steps + config.anogan.encoder_steps

    def phase(self, step: int) -> str:
        return "encoder" if step >= self.gan_steps else "gan"

    def validates(self, step: int) -> bool:
        """The held-out residual measures the encoder: meaningful once it has taken a step."""
        return step > self.gan_steps

    def before_step(self, step: int, ema: Any) -> None:
        """Freeze G and D at the weights that will score (their EMA) before the encoder learns."""
        if step == self.gan_steps and ema is not None:
            ema.copy_to(self.model, "generator")
            ema.copy_to(self.model, "discriminator")

    def step(self, x: torch.Tensor, step: int) -> dict[str, float]:
        return self._encoder_step(x) if self.phase(step) == "encoder" else self._dcgan_step(x)

    def _dcgan_step(self, x: torch.Tensor) -> dict[str, float]:
        """One D update and one G update (AnoGAN's DCGAN, non-saturating G loss)."""
        m = self.model
        z = m.prior(x.shape[0], x)
        with torch.no_grad():
            x_gen = m.generator(z)
        logit_real, _ = m.discriminator(x)
        logit_fake, _ = m.discriminator(x_gen)
        loss_d = F.binary_cross_entropy_with_logits(
            logit_real, torch.ones_like(logit_real)
        ) + F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake))
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()

        logit_fake, _ = m.discriminator(m.generator(z))
        loss_g = F.binary_cross_entropy_with_logits(logit_fake, torch.ones_like(logit_fake))
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item()}

    def _encoder_step(self, x: torch.Tensor) -> dict[str, float]:
        """izi_f: E learns x -> z with G and D frozen (eval mode: no BatchNorm updates in G).

        With pseudo-defects, E sees the painted image and is held to the clean one, and the
        segmentation head learns to mark what was painted.
        """
        m = self.model
        m.generator.eval().requires_grad_(False)
        m.discriminator.eval().requires_grad_(False)
        m.encoder.train()
        x_in, mask = painted(x, self.config, self.defect_rng)
        recon = m.generator(m.encoder(x_in))
        loss_recon = (x - recon).abs().mean()
        loss_feature = (m.discriminator.features(x) - m.discriminator.features(recon)).abs().mean()
        loss = loss_recon + self.config.anogan.encoder_kappa * loss_feature
        losses = {"loss_recon": loss_recon.item(), "loss_feature": loss_feature.item()}
        loss_seg = segmentation_loss(m, x_in, recon, mask)
        if loss_seg is not None:
            loss = loss + self.config.train.segmentation_weight * loss_seg
            losses["loss_seg"] = loss_seg.item()
        self.opt_e.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_e.step()
        return losses


def build_anogan(cfg: AnoGANConfig) -> AnoGAN:
    model = AnoGAN(cfg)
    dcgan_init(model)
    return model


def load_anogan(checkpoint: dict[str, Any]) -> AnoGAN:
    cfg = AnoGANConfig.from_dict(checkpoint["model_config"])
    model = AnoGAN(cfg)
    model.load_state_dict(checkpoint["model"])
    return model
