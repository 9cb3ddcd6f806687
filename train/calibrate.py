"""Scoring in batches, and calibration from held-out normal images.

With normal-only validation data the decision threshold is the (1 - nu) quantile of the
held-out normal scores (nu = tolerated false-alarm rate). With labelled anomalies (a
folder of known-bad parts, never the test set) the F1-optimal cut between them and the
held-out normals is the alternative (`method="f1_optimal"`). The heatmap scale is the
`heatmap_quantile` quantile of all held-out normal smoothed residual pixels (1.0 = the
largest one), so that heatmap 1.0 means "as large as the largest normal residual".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ganspect.train.models.common import ScoringModel, weighted_score

SCORINGS = ("model", "search")


@dataclass
class Scored:
    """Per-image score parts of a batch of images (numpy, float32)."""

    score: np.ndarray      # (N,) (1 - lambda) * l_r + lambda * l_d, as the model's forward
    l_r: np.ndarray        # (N,)
    l_d: np.ndarray        # (N,)
    residual: np.ndarray   # (N, H, W) smoothed residual before dividing by heatmap_scale
    heatmap: np.ndarray    # (N, H, W) residual / heatmap_scale, as the model's forward
    recon: np.ndarray | None = None  # (N, H, W, C) uint8 reconstructions, when asked for (keep_recon)


def score_images(model: ScoringModel, images: np.ndarray, batch_size: int = 64,
                 device: str | torch.device = "cpu", scoring: str = "model", search_steps: int = 500,
                 search_lr: float = 0.05, seed: int = 0, progress: bool = False, keep_recon: bool = False) -> Scored:
    """Score uint8 (N, H, W, C) images with the model in eval mode.

    scoring "model" is the model's own one-pass `score_parts` (what `forward` and the
    export compute); "search" is AnoGAN's latent search (`search_steps` Adam steps on z
    per image, z drawn from N(0, I) with `seed`), slow, for the workstation only.
    """
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 (N, H, W, C) images, got {images.dtype} {images.shape}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if scoring == "search" and not hasattr(model, "search"):
        raise ValueError("latent-search scoring needs an AnoGAN model")
    was_training = model.training
    model.eval()
    model.to(device)
    lam = model.cfg.lambda_
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("score", "l_r", "l_d", "residual", "heatmap")}
    recons: list[np.ndarray] = []
    gen = torch.Generator().manual_seed(seed)
    bar = None
    if progress and scoring == "search":
        from ganspect.train.loop import progress_bar

        bar = progress_bar(len(images), desc=f"latent search ({search_steps} steps)", unit="image")
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start:start + batch_size]).to(device)
            x = model.normalise(batch)
            if scoring == "search":
                parts = model.search(x, steps=search_steps, lr=search_lr, generator=gen).parts  # type: ignore[operator]
                if bar is not None:
                    bar.update(len(batch))
            else:
                parts = model.score_parts(x)
            out["score"].append(weighted_score(parts.l_r, parts.l_d, lam).cpu().numpy())
            out["l_r"].append(parts.l_r.cpu().numpy())
            out["l_d"].append(parts.l_d.cpu().numpy())
            out["residual"].append(parts.residual.cpu().numpy())
            out["heatmap"].append((parts.residual / model.heatmap_scale).cpu().numpy())
            if keep_recon:
                recons.append(((parts.recon + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
                              .permute(0, 2, 3, 1).cpu().numpy())
    if bar is not None:
        bar.close()
    model.train(was_training)
    h, w = images.shape[1:3]
    cat = {k: np.concatenate(v) if v else np.zeros((0, h, w) if k in ("residual", "heatmap") else (0,), np.float32)
           for k, v in out.items()}
    return Scored(**cat, recon=np.concatenate(recons) if keep_recon and recons else None)


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
    method: str = "normal_quantile"
    n_anomalies: int = 0
    normal_quantile_threshold: float | None = None  # always computed, for comparison with f1_optimal

    def to_dict(self) -> dict[str, float | int | str | None]:
        return {
            "threshold": self.threshold,
            "method": self.method,
            "nu": self.nu,
            "n_images": self.n_images,
            "n_anomalies": self.n_anomalies,
            "normal_quantile_threshold": self.normal_quantile_threshold,
            "heatmap_scale": self.heatmap_scale,
            "heatmap_quantile": self.heatmap_quantile,
        }


def choose_threshold(normal_scores: np.ndarray, nu: float, method: str = "normal_quantile",
                     anomaly_scores: np.ndarray | None = None) -> float:
    """The decision threshold (score > threshold = NG) by `method`: normal_quantile or f1_optimal."""
    if method == "normal_quantile":
        return normal_quantile_threshold(normal_scores, nu)
    if method == "f1_optimal":
        from ganspect.train.evaluate import f1_optimal_threshold

        if anomaly_scores is None or len(anomaly_scores) == 0:
            raise ValueError("the f1_optimal threshold needs scores of labelled anomalous images")
        scores = np.concatenate([normal_scores, anomaly_scores])
        labels = np.concatenate([np.zeros(len(normal_scores), int), np.ones(len(anomaly_scores), int)])
        return f1_optimal_threshold(scores, labels)[0]
    raise ValueError(f"unknown threshold method {method!r}")


def calibrate(model: ScoringModel, normal_images: np.ndarray, nu: float, quantile: float,
              batch_size: int = 64, device: str | torch.device = "cpu", anomaly_images: np.ndarray | None = None,
              method: str = "normal_quantile") -> Calibration:
    """Compute threshold and heatmap scale on held-out normals and store them in the model's buffers."""
    scored = score_images(model, normal_images, batch_size=batch_size, device=device)
    anomaly_scores = None
    if method == "f1_optimal":
        if anomaly_images is None:
            raise ValueError("the f1_optimal threshold needs labelled anomalous images")
        anomaly_scores = score_images(model, anomaly_images, batch_size=batch_size, device=device).score
    cal = Calibration(
        threshold=choose_threshold(scored.score, nu, method, anomaly_scores),
        nu=nu,
        n_images=len(normal_images),
        heatmap_scale=heatmap_scale(scored.residual, quantile),
        heatmap_quantile=quantile,
        method=method,
        n_anomalies=0 if anomaly_scores is None else len(anomaly_scores),
        normal_quantile_threshold=normal_quantile_threshold(scored.score, nu),
    )
    model.threshold.fill_(cal.threshold)
    model.heatmap_scale.fill_(cal.heatmap_scale)
    return cal
