"""Scoring in batches, and calibration from held-out normal images.

With normal-only validation data the decision threshold is the (1 - nu) quantile of the
held-out normal scores (nu = tolerated false-alarm rate). With few normals that quantile
is in effect their maximum, and one odd normal puts it above most defects; the
`pseudo_defects` method instead takes the F1-optimal cut between the held-out normals
and the same normals with one pseudo-defect painted on each (never trained on), which
places the threshold between the two populations rather than at the normals' tail.
With labelled anomalies (a folder of known-bad parts, never the test set) the F1-optimal
cut between them and the held-out normals is the alternative (`method="f1_optimal"`). The heatmap scale is the
`heatmap_quantile` quantile of all held-out normal smoothed residual pixels (1.0 = the
largest one), so that heatmap 1.0 means "as large as the largest normal residual".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ganspect.train.models.common import ScoringModel, weighted_score

if TYPE_CHECKING:
    from ganspect.train.config import CalibrationSection

SCORINGS = ("model", "search")
# Threshold methods that cut between the held-out normals and scored anomalies, and what those are.
THRESHOLD_CUTS = {
    "pseudo_defects": "held-out normals with painted pseudo-defects",
    "f1_optimal": "labelled anomalous images",
}
# The seed of the pseudo_defects method's painted copies, apart from training's: other defects than it learned on.
PSEUDO_SEED = 7919


@dataclass
class Scored:
    """Per-image score parts of a batch of images (numpy, float32).

    From tiles (`score_tiled`), the maps are stitched at the image's own size (a list
    when the images differ in size) and the per-image values are those of the worst tile.
    """

    score: np.ndarray  # (N,) the model's score, as its forward
    l_r: np.ndarray  # (N,)
    l_d: np.ndarray  # (N,)
    residual: np.ndarray  # (N, H, W) smoothed residual before dividing by heatmap_scale
    heatmap: np.ndarray  # (N, H, W) residual / heatmap_scale, as the model's forward
    recon: np.ndarray | None = None  # (N, H, W, C) uint8 reconstructions, when asked for (keep_recon)


def score_images(  # noqa: PLR0913 — scoring options with defaults; a caller names the one or two it changes
    model: ScoringModel,
    images: np.ndarray,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    scoring: str = "model",
    search_steps: int = 500,
    search_lr: float = 0.05,
    seed: int = 0,
    progress: bool = False,
    keep_recon: bool = False,
) -> Scored:
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
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("score", "l_r", "l_d", "residual", "heatmap")}
    recons: list[np.ndarray] = []
    gen = torch.Generator().manual_seed(seed)
    bar = None
    if progress and scoring == "search":
        from ganspect.train.loop import progress_bar

        bar = progress_bar(len(images), desc=f"latent search ({search_steps} steps)", unit="image")
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size]).to(device)
            x = model.normalise(batch)
            if scoring == "search":
                parts = model.search(x, steps=search_steps, lr=search_lr, generator=gen).parts  # type: ignore[operator]  # AnoGAN only: hasattr checked above
                if bar is not None:
                    bar.update(len(batch))
            else:
                parts = model.score_parts(x)
            score, raw_map = model.score_and_map(parts)
            out["score"].append(score.cpu().numpy())
            out["l_r"].append(parts.l_r.cpu().numpy())
            out["l_d"].append(parts.l_d.cpu().numpy())
            out["residual"].append(raw_map.cpu().numpy())
            out["heatmap"].append((raw_map / model.heatmap_scale).cpu().numpy())
            if keep_recon:
                recons.append(
                    ((parts.recon + 1.0) * 127.5)
                    .round()
                    .clamp(0, 255)
                    .to(torch.uint8)
                    .permute(0, 2, 3, 1)
                    .cpu()
                    .numpy()
                )
    if bar is not None:
        bar.close()
    model.train(was_training)
    h, w = images.shape[1:3]
    cat = {
        k: np.concatenate(v) if v else np.zeros((0, h, w) if k in ("residual", "heatmap") else (0,), np.float32)
        for k, v in out.items()
    }
    return Scored(**cat, recon=np.concatenate(recons) if keep_recon and recons else None)


def tile_origins(height: int, width: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """(row, column) of every tile, exactly as the edge cuts a region (ganspect.edge.inspector)."""
    from ganspect.edge.inspector import tile_starts

    return [(y, x) for y in tile_starts(height, size, overlap) for x in tile_starts(width, size, overlap)]


def cut_tiles(image: np.ndarray, size: int, overlap: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The model-sized tiles (T, S, S, C) of a native-size image and their origins, as the edge cuts them."""
    origins = tile_origins(image.shape[0], image.shape[1], size, overlap)
    return np.stack([image[y : y + size, x : x + size] for y, x in origins]), origins


def score_tiled(
    model: ScoringModel,
    images: Any,
    overlap: int,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    keep_recon: bool = False,
    progress: str | None = None,
) -> Scored:
    """Score native-size uint8 images (N, H, W, C) or a list of (H_i, W_i, C) tile by tile, as the edge does.

    Each image is cut into model-sized tiles sharing `overlap` pixels; the image's score
    and score parts are its worst tile's, its maps are the tiles' maps stitched.
    """
    size = model.cfg.image_size
    keys = ("score", "l_r", "l_d")
    values: dict[str, list[float]] = {k: [] for k in keys}
    # Frames of one size fill arrays made once: stacking per-frame lists at the end held every map
    # twice (1,000 DeepPCB boards: about 6 GB more at the peak, enough for the OOM killer).
    uniform = isinstance(images, np.ndarray)
    residuals: Any = np.empty(images.shape[:3], np.float32) if uniform else []
    heatmaps: Any = np.empty(images.shape[:3], np.float32) if uniform else []
    recons: Any = (np.zeros_like(images) if uniform else []) if keep_recon else None
    from ganspect.train.loop import progress_bar

    bar = progress_bar(len(images), desc=progress, unit="image") if progress else None
    from ganspect.edge.inspector import stitch

    for i, image in enumerate(images):
        h, w = image.shape[:2]
        tiles, origins = cut_tiles(image, size, overlap)
        part = score_images(model, tiles, batch_size=batch_size, device=device, keep_recon=keep_recon)
        worst = int(np.argmax(part.score))
        for k in keys:
            values[k].append(float(getattr(part, k)[worst]))
        residual, heatmap = stitch(part.residual, origins, h, w), stitch(part.heatmap, origins, h, w)
        recon = None
        if recons is not None and part.recon is not None:
            recon = recons[i] if uniform else np.zeros_like(image)
            for (y, x), tile in zip(origins, part.recon):
                recon[y : y + size, x : x + size] = tile
        if uniform:
            residuals[i], heatmaps[i] = residual, heatmap
        else:
            residuals.append(residual)
            heatmaps.append(heatmap)
            if recon is not None:
                recons.append(recon)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    from ganspect.train.data import stack_if_uniform

    return Scored(
        **{k: np.asarray(v, np.float32) for k, v in values.items()},
        residual=residuals if uniform else stack_if_uniform(residuals),
        heatmap=heatmaps if uniform else stack_if_uniform(heatmaps),
        recon=recons if uniform or recons is None else stack_if_uniform(recons),
    )


def score_framed(model: ScoringModel, images: Any, tiles: bool, overlap: int, **kwargs: Any) -> Scored:
    """`score_tiled` for native images (tiling mode tiles), `score_images` for model-sized ones."""
    if tiles:
        return score_tiled(
            model,
            images,
            overlap,
            progress=f"scoring {len(images)} images in tiles",
            **{k: v for k, v in kwargs.items() if k in ("batch_size", "device", "keep_recon")},
        )
    return score_images(model, images, **kwargs)


def normal_quantile_threshold(scores: np.ndarray, nu: float) -> float:
    """The (1 - nu) quantile of normal scores (numpy's default linear interpolation)."""
    if len(scores) == 0:
        raise ValueError("no held-out normal scores to calibrate on")
    return float(np.quantile(np.asarray(scores, dtype=np.float64), 1.0 - nu))


def heatmap_scale(residuals: np.ndarray, quantile: float) -> float:
    """The `quantile` quantile of all residual pixels (1.0 = max); never below a tiny positive floor."""
    pixels = (
        np.concatenate([np.ravel(r) for r in residuals])
        if isinstance(residuals, list)
        else np.asarray(residuals).ravel()
    )
    value = float(np.max(pixels)) if quantile >= 1.0 else float(np.quantile(pixels.astype(np.float64), quantile))
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
    confidence: dict[str, float] | None = None  # how sure the threshold is (threshold_confidence)
    per_pixel: dict[str, Any] | None = None  # what per-pixel calibration found (calibrate_pixels)

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "method": self.method,
            "nu": self.nu,
            "n_images": self.n_images,
            "n_anomalies": self.n_anomalies,
            "normal_quantile_threshold": self.normal_quantile_threshold,
            "heatmap_scale": self.heatmap_scale,
            "heatmap_quantile": self.heatmap_quantile,
            "confidence": self.confidence,
            "per_pixel": self.per_pixel,
        }


def threshold_confidence(
    normal_scores: np.ndarray, threshold: float, nu: float, seed: int = 0, resamples: int = 2000
) -> dict[str, float]:
    """How far a threshold from n held-out normals can be trusted, in the two ways a line needs it.

    - false alarms: k of the n normals score above it; the one-sided 95 % Clopper-Pearson
      bound on the real false-alarm rate is what the data can promise (with 31 normals and
      none above, it is 9 %, whatever nu was asked for);
    - its spread: the 5th and 95th percentiles of the (1 - nu) quantile over bootstrap
      resamples of the normals: how much the threshold would move with other normals.
    """
    from scipy.stats import beta

    scores = np.asarray(normal_scores, dtype=np.float64)
    n = len(scores)
    above = int((scores > threshold).sum())
    upper = float(beta.ppf(0.95, above + 1, n - above)) if above < n else 1.0
    rng = np.random.default_rng(seed)
    boot = np.quantile(scores[rng.integers(0, n, (resamples, n))], 1.0 - nu, axis=1)
    return {
        "held_out_above": above,
        "false_alarm_rate_held_out": above / n,
        "false_alarm_rate_upper_95": upper,
        "threshold_p05": float(np.quantile(boot, 0.05)),
        "threshold_p95": float(np.quantile(boot, 0.95)),
    }


def pseudo_defect_copies(images: Any, config: Any) -> Any:
    """The held-out normals with one pseudo-defect each, as training and export paint them for the
    pseudo_defects threshold: at the training crop's scale, with the run's kinds, under PSEUDO_SEED."""
    from ganspect.train.pseudo_defects import paint_frames

    window = config.crop_side
    return paint_frames(images, window, list(config.pseudo_defects.kinds), PSEUDO_SEED)


def threshold_anomalies(normals: Any, config: Any, method: str) -> Any:
    """What threshold `method` cuts the held-out normals against: painted copies of them
    (pseudo_defects), the run's labelled anomalies (f1_optimal), or nothing (None)."""
    if method == "pseudo_defects":
        return pseudo_defect_copies(normals, config)
    from ganspect.train.data import labelled_anomalies

    return labelled_anomalies(config)


def choose_threshold(
    normal_scores: np.ndarray, nu: float, method: str = "normal_quantile", anomaly_scores: np.ndarray | None = None
) -> float:
    """The decision threshold (score > threshold = NG) by `method`: normal_quantile, or the F1-optimal cut
    between the normals and `anomaly_scores` (pseudo_defects: painted normals; f1_optimal: labelled anomalies)."""
    if method == "normal_quantile":
        return normal_quantile_threshold(normal_scores, nu)
    if method in THRESHOLD_CUTS:
        from ganspect.train.evaluate import f1_optimal_threshold

        if anomaly_scores is None or len(anomaly_scores) == 0:
            raise ValueError(f"the {method} threshold needs scores of {THRESHOLD_CUTS[method]}")
        scores = np.concatenate([normal_scores, anomaly_scores])
        labels = np.concatenate([np.zeros(len(normal_scores), int), np.ones(len(anomaly_scores), int)])
        return f1_optimal_threshold(scores, labels)[0]
    raise ValueError(f"unknown threshold method {method!r}")


# A pixel's spread is at least this share of the median spread: a pixel that never changed on
# the held-out normals must not turn the smallest change into a huge score.
SPREAD_FLOOR = 0.1
# Fixed hot spots: the top 5 % of pixels by mean normal map.
HOT_SHARE = 0.05


def calibrate_pixels(
    model: ScoringModel, images: np.ndarray, batch_size: int = 64, device: str | torch.device = "cpu"
) -> tuple[Scored, dict[str, Any]]:
    """Set the model's per-pixel mean and spread from held-out normals; return their leave-one-out scores.

    Each image's own map is left out of the statistics it is normalised with, so that
    the threshold sees what an unseen normal part would score, not one that taught the
    statistics. The report says whether the normals' peaks sat on fixed places before
    (what per-pixel calibration removes) and after.
    """
    model.pixel_mean.zero_()
    model.pixel_spread.fill_(1.0)
    raw = score_images(model, images, batch_size=batch_size, device=device)
    maps = raw.residual.astype(np.float64)  # (n, H, W): identity calibration, so these are the raw maps
    n = len(maps)
    if n < 3:
        raise ValueError(f"per-pixel calibration needs at least 3 held-out normals, got {n}")
    mean, spread = maps.mean(axis=0), maps.std(axis=0)
    floor = max(SPREAD_FLOOR * float(np.median(spread)), 1e-6)
    z, peaks, score = leave_one_out_scores(model.cfg, maps, raw.l_d, floor)
    hot = mean >= np.quantile(mean, 1.0 - HOT_SHARE)

    def on_hot(m: np.ndarray) -> float:
        flat = m.reshape(len(m), -1).argmax(axis=1)
        return float(hot.ravel()[flat].mean())

    before, after = on_hot(maps), on_hot(z)
    report = {
        "spread_floor": floor,
        "peaks_on_hot_pixels_before": before,
        "peaks_on_hot_pixels_after": after,
        "hot_share": HOT_SHARE,
        "helps": bool(before >= 0.25 and after < before / 2),
    }
    model.pixel_mean.copy_(torch.from_numpy(mean.astype(np.float32)))
    model.pixel_spread.copy_(torch.from_numpy(np.maximum(spread, floor).astype(np.float32)))
    return Scored(score=score, l_r=peaks, l_d=raw.l_d, residual=z, heatmap=z), report


def leave_one_out_scores(
    model_cfg: Any, maps: np.ndarray, l_d: np.ndarray, floor: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(normalised maps, their peaks, scores) of n normals' raw maps (n, H, W), each map measured
    against the per-pixel mean and spread of the other n - 1: what an unseen normal part would score."""
    maps = np.asarray(maps, dtype=np.float64)
    n = len(maps)
    total, squares = maps.sum(axis=0), np.square(maps).sum(axis=0)
    loo_mean = (total - maps) / (n - 1)
    loo_spread = np.sqrt(np.maximum((squares - np.square(maps)) / (n - 1) - loo_mean**2, 0.0))
    z = ((maps - loo_mean) / np.maximum(loo_spread, floor)).astype(np.float32)
    peaks = z.reshape(n, -1).max(axis=1)
    segmentation = getattr(model_cfg, "scoring", "residual") == "segmentation"
    score = peaks if segmentation else weighted_score(peaks, np.asarray(l_d), model_cfg.lambda_)
    return z, peaks, np.asarray(score, dtype=np.float32)


def calibrate(
    model: ScoringModel,
    normal_images: Any,
    settings: CalibrationSection,
    *,
    device: str | torch.device = "cpu",
    anomaly_images: Any = None,
    tiles: bool = False,
    overlap: int = 0,
) -> Calibration:
    """Compute threshold and heatmap scale on held-out normals and store them in the model's buffers.

    `settings` is the run config's calibration section (nu, heatmap quantile, batch size,
    threshold method, per_pixel). With `tiles`, the images are native-size and scored tile
    by tile as the edge scores them. With `per_pixel` (aligned parts), the map's per-pixel
    mean and spread are estimated too (`pixel_calibration`), and the threshold comes from
    leave-one-out normalised maps. `anomaly_images` are what the pseudo_defects and
    f1_optimal methods cut against (`threshold_anomalies`).
    """
    nu, quantile, batch_size, method = settings.nu, settings.heatmap_quantile, settings.batch_size, settings.threshold
    pixel_report = None
    if settings.per_pixel:
        scored, pixel_report = calibrate_pixels(model, normal_images, batch_size, device)
    else:
        scored = score_framed(model, normal_images, tiles, overlap, batch_size=batch_size, device=device)
    anomaly_scores = None
    if method in THRESHOLD_CUTS:
        if anomaly_images is None:
            raise ValueError(f"the {method} threshold needs {THRESHOLD_CUTS[method]}")
        anomaly_scores = score_framed(model, anomaly_images, tiles, overlap, batch_size=batch_size, device=device).score
    threshold = choose_threshold(scored.score, nu, method, anomaly_scores)
    cal = Calibration(
        threshold=threshold,
        nu=nu,
        n_images=len(normal_images),
        heatmap_scale=heatmap_scale(scored.residual, quantile),
        heatmap_quantile=quantile,
        method=method,
        n_anomalies=0 if anomaly_scores is None else len(anomaly_scores),
        normal_quantile_threshold=normal_quantile_threshold(scored.score, nu),
        confidence=threshold_confidence(scored.score, threshold, nu),
        per_pixel=pixel_report,
    )
    model.threshold.fill_(cal.threshold)
    model.heatmap_scale.fill_(cal.heatmap_scale)
    return cal
