"""Scoring in batches, and calibration from held-out normal images.

With normal-only validation data the decision threshold is the (1 - nu) quantile of the
held-out normal scores (nu = tolerated false-alarm rate), and the heatmap scale is the
`heatmap_quantile` quantile of all held-out normal smoothed residual pixels (1.0 = the
largest one), so that heatmap 1.0 means "as large as the largest normal residual".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ganspect.train.models.efficient_gan import EfficientGAN, weighted_score


@dataclass
class Scored:
    """Per-image score parts of a batch of images (numpy, float32)."""

    score: np.ndarray      # (N,) (1 - lambda) * l_r + lambda * l_d, as the model's forward
    l_r: np.ndarray        # (N,)
    l_d: np.ndarray        # (N,)
    residual: np.ndarray   # (N, H, W) smoothed residual before dividing by heatmap_scale
    heatmap: np.ndarray    # (N, H, W) residual / heatmap_scale, as the model's forward


def score_images(model: EfficientGAN, images: np.ndarray, batch_size: int = 64,
                 device: str | torch.device = "cpu") -> Scored:
    """Score uint8 (N, H, W, C) images with the model in eval mode, under no_grad."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 (N, H, W, C) images, got {images.dtype} {images.shape}")
    was_training = model.training
    model.eval()
    lam = model.cfg.lambda_
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("score", "l_r", "l_d", "residual", "heatmap")}
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start:start + batch_size]).to(device)
            parts = model.score_parts(model.normalise(batch))
            out["score"].append(weighted_score(parts.l_r, parts.l_d, lam).cpu().numpy())
            out["l_r"].append(parts.l_r.cpu().numpy())
            out["l_d"].append(parts.l_d.cpu().numpy())
            out["residual"].append(parts.residual.cpu().numpy())
            out["heatmap"].append((parts.residual / model.heatmap_scale).cpu().numpy())
    model.train(was_training)
    h, w = images.shape[1:3]
    cat = {k: np.concatenate(v) if v else np.zeros((0, h, w) if k in ("residual", "heatmap") else (0,), np.float32)
           for k, v in out.items()}
    return Scored(**cat)


def normal_quantile_threshold(scores: np.ndarray, nu: float) -> float:
    """The (1 - nu) quantile of normal scores (numpy's default linear interpolation)."""
    if len(scores) == 0:
        raise ValueError("no held-out normal scores to calibrate on")
    return float(np.quantile(np.asarray(scores, dtype=np.float64), 1.0 - nu))


def heatmap_scale(residuals: np.ndarray, quantile: float) -> float:
    """The `quantile` quantile of all residual pixels (1.0 = max); never below a tiny positive floor."""
    value = float(np.quantile(np.asarray(residuals, dtype=np.float64).ravel(), quantile))
    return max(value, 1e-6)


@dataclass
class Calibration:
    threshold: float
    nu: float
    n_images: int
    heatmap_scale: float
    heatmap_quantile: float

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "threshold": self.threshold,
            "method": "normal_quantile",
            "nu": self.nu,
            "n_images": self.n_images,
            "heatmap_scale": self.heatmap_scale,
            "heatmap_quantile": self.heatmap_quantile,
        }


def calibrate(model: EfficientGAN, normal_images: np.ndarray, nu: float, quantile: float,
              batch_size: int = 64, device: str | torch.device = "cpu") -> Calibration:
    """Compute threshold and heatmap scale on held-out normals and store them in the model's buffers."""
    scored = score_images(model, normal_images, batch_size=batch_size, device=device)
    cal = Calibration(
        threshold=normal_quantile_threshold(scored.score, nu),
        nu=nu,
        n_images=len(normal_images),
        heatmap_scale=heatmap_scale(scored.residual, quantile),
        heatmap_quantile=quantile,
    )
    model.threshold.fill_(cal.threshold)
    model.heatmap_scale.fill_(cal.heatmap_scale)
    return cal
