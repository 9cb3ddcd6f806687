"""Evaluate a run on a labelled test set (MVTec AD layout) and write `run/metrics.json` and a report.

Each image's score goes to `run/scores.csv` (test images and held-out normals), so that a
line can study its own threshold or mislabelled parts without scoring everything again.

The threshold comes from calibration on held-out normal training images (stored in the
checkpoint); the test set never chooses it, and is read here only. The F1-optimal
threshold on the test set is reported beside it, for information only, as
`f1_optimal_threshold`.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ganspect.edge.errors import GanspectError

LAMBDA_SWEEP = [round(0.1 * i, 1) for i in range(11)]


def image_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """AUROC, AUPRC and precision/recall/F1 at `threshold` (score > threshold = anomalous)."""
    from sklearn.metrics import average_precision_score, precision_recall_fscore_support, roc_auc_score

    labels = np.asarray(labels).astype(int)
    pred = (np.asarray(scores) > threshold).astype(int)
    both = len(np.unique(labels)) == 2
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, pred, average="binary", pos_label=1, zero_division=0
    )
    return {
        "image_auroc": float(roc_auc_score(labels, scores)) if both else math.nan,
        "image_auprc": float(average_precision_score(labels, scores)) if both else math.nan,
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "accuracy": float((pred == labels).mean()),
    }


def f1_optimal_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising F1 with `score > threshold`; thresholds are midpoints of sorted scores."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    # precision_recall_curve uses score >= t; step just below t so that score > threshold agrees.
    below = np.asarray(scores)[np.asarray(scores) < thresholds[best]]
    thr = float((below.max() + thresholds[best]) / 2) if len(below) else float(thresholds[best]) - 1e-6
    return thr, float(f1[best])


# Above this many pixels, pixel AUROC reads a regular grid of them (every k-th row and column):
# a thousand 640x640 boards are 410 million pixels, which sklearn would sort in ~10 GB.
PIXEL_AUROC_MAX_PIXELS = 20_000_000


def pixel_auroc(heatmaps: Any, masks: Any) -> float:
    """Per-pixel AUROC of heatmaps (N, H, W) against 0/1 masks (N, H, W) over the whole test set.

    Lists of maps of several sizes work too. Past PIXEL_AUROC_MAX_PIXELS pixels, every
    k-th row and column of every map is read, k the smallest stride that fits.
    """
    from sklearn.metrics import roc_auc_score

    total = sum(np.size(m) for m in masks)
    k = max(1, math.ceil(math.sqrt(total / PIXEL_AUROC_MAX_PIXELS)))
    y = np.concatenate([(np.asarray(m)[::k, ::k] > 0).ravel() for m in masks]).astype(np.uint8)
    if y.min() == y.max():
        return math.nan
    scores = np.concatenate([np.asarray(h, dtype=np.float32)[::k, ::k].ravel() for h in heatmaps])
    return float(roc_auc_score(y, scores))


def per_kind_auroc(scores: np.ndarray, labels: np.ndarray, kinds: list[str]) -> dict[str, float]:
    """AUROC of the good test images against each defect kind on its own."""
    from sklearn.metrics import roc_auc_score

    kinds_arr = np.asarray(kinds)
    good = labels == 0
    result = {}
    for kind in sorted(set(kinds_arr[labels == 1])):
        sel = good | (kinds_arr == kind)
        result[kind] = float(roc_auc_score(labels[sel], scores[sel]))
    return result


def lambda_sweep(
    l_r: np.ndarray,
    l_d: np.ndarray,
    labels: np.ndarray,
    held_l_r: np.ndarray | None = None,
    held_l_d: np.ndarray | None = None,
    nu: float = 0.01,
) -> list[dict[str, float | None]]:
    """Seed 000's table from the score parts: for lambda = 0.0 ... 1.0, image AUROC and AUPRC, and F1.

    F1 is measured at that lambda's own threshold, the (1 - nu) quantile of the held-out
    normal scores with that lambda (when their parts are given), so that no test label
    chooses it; the F1-optimal F1 on the test set is beside it, for information only.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    from ganspect.train.calibrate import normal_quantile_threshold
    from ganspect.train.models.common import weighted_score

    rows: list[dict[str, float | None]] = []
    for lam in LAMBDA_SWEEP:
        scores = weighted_score(l_r, l_d, lam)
        row: dict[str, float | None] = {
            "lambda": lam,
            "image_auroc": float(roc_auc_score(labels, scores)),
            "image_auprc": float(average_precision_score(labels, scores)),
            "f1_optimal": f1_optimal_threshold(scores, labels)[1],
            "threshold": None,
            "f1": None,
        }
        if held_l_r is not None and held_l_d is not None and len(held_l_r):
            thr = normal_quantile_threshold(weighted_score(held_l_r, held_l_d, lam), nu)
            row["threshold"] = thr
            row["f1"] = image_metrics(scores, labels, thr)["f1"]
        rows.append(row)
    return rows


def _score_held_out(model: Any, config: Any, info: dict[str, Any], **kw: Any) -> Any:
    """The held-out normals scored as the threshold saw them; None when the training data is gone."""
    from ganspect.train.calibrate import calibrate_pixels, score_framed
    from ganspect.train.data import held_out_images

    images = held_out_images(config, Path(info["source"]))
    if images is None:
        return None
    if config.calibration.per_pixel and kw["scoring"] == "model":
        # A per-pixel threshold was set on leave-one-out scores: scored by the calibrated model,
        # each normal would be measured against statistics it helped estimate, and look safer
        # than an unseen part. This re-derives the same statistics from the same images.
        return calibrate_pixels(model, images, kw["batch_size"])[0]
    return score_framed(model, images, config.tiling.mode == "tiles", config.tiling.overlap, **kw)


def _check_evaluable(run: Path, scoring: str, kind: str, ckpt: dict[str, Any]) -> None:
    if scoring == "search" and kind != "anogan":
        raise GanspectError(
            f"--scoring search is AnoGAN's latent search; {run} holds an {kind} model "
            "(it scores in one pass: use --scoring encoder)"
        )
    if not ckpt.get("calibrated"):
        raise GanspectError(f"{run}: training did not finish (no calibration yet); resume it with --resume")


def _load_test(data: Path, size: int, channels: int, tiling: Any) -> Any:
    """The test set under `data` (MVTec layout), framed as in training; refused when it holds no images."""
    from ganspect.train.data import Framing, is_mvtec_layout, load_test_set

    if not is_mvtec_layout(data):
        raise GanspectError(f"{data} has no MVTec-style test/ folder with good and defective images to evaluate on")
    test = load_test_set(data, size, channels, Framing.of(size, tiling))
    if len(test.labels) == 0:
        raise GanspectError(f"{data}/test holds no images")
    return test


def _calibrate_search(held: Any, scored: Any, nu: float, heatmap_quantile: float) -> float:
    """The search's own threshold from the held-out normals it scored; rescales both sets' heatmaps to match.

    The search finds other reconstructions than the encoder: its scores need their own threshold.
    """
    from ganspect.train.calibrate import choose_threshold, heatmap_scale

    threshold = choose_threshold(held.score, nu, "normal_quantile")
    scale = heatmap_scale(held.residual, heatmap_quantile)
    scored.heatmap = scored.residual / scale
    held.heatmap = held.residual / scale
    return threshold


def _labelled_metrics(scored: Any, labels: np.ndarray, kinds: list[str], held: Any | None, nu: float) -> dict[str, Any]:
    """What a test set with good and defective images tells beyond AUROC: the F1 optimum, per kind, the λ sweep."""
    thr, f1 = f1_optimal_threshold(scored.score, labels)
    return {
        "f1_optimal_threshold": thr,
        "f1_at_f1_optimal": f1,
        "image_auroc_by_kind": per_kind_auroc(scored.score, labels, kinds),
        "lambda_sweep": lambda_sweep(
            scored.l_r, scored.l_d, labels, None if held is None else held.l_r, None if held is None else held.l_d, nu
        ),
    }


def _ocnn_metrics(
    head: Any, codes: Any, gan_scores: np.ndarray, labels: np.ndarray, gan_auroc: float
) -> dict[str, Any]:
    """The OC-NN head's metrics on the test set's latent codes, and whether it helps the GAN score."""
    import torch
    from scipy.stats import rankdata

    with torch.no_grad():
        ocnn_scores = head.score(codes).numpy()
    ocnn = image_metrics(ocnn_scores, labels, 0.0)  # outside the boundary (r - y > 0) = anomalous
    # Whether it helps: beside the GAN score, and as a rank average with it.
    combined = (rankdata(gan_scores) + rankdata(ocnn_scores)) / (2 * len(labels))
    ocnn["combined_image_auroc"] = image_metrics(combined, labels, 0.5)["image_auroc"]
    ocnn["gan_image_auroc"] = gan_auroc
    return ocnn


def evaluate_run(run: Path, data: Path | None, scoring: str = "encoder", report: bool = True) -> dict[str, Any]:
    """Score the run's held-out normals and the test set under `data` (default: the training data).

    scoring "encoder" is the model's one-pass forward (the exported computation; the
    only choice for Efficient GAN); "search" is AnoGAN's latent search, slow, with its
    own threshold and heatmap scale from the held-out normals scored the same way.
    Writes `metrics.json` (encoder) or `metrics_search.json` (search), and the report.
    """
    from ganspect.train.calibrate import score_framed
    from ganspect.train.loop import latent_codes, load_ocnn_head, load_run_model, read_run_config, read_run_info

    if scoring not in ("encoder", "search"):
        raise GanspectError(f"--scoring must be encoder or search, got {scoring!r}")
    run = Path(run)
    config = read_run_config(run)
    info = read_run_info(run)
    model, ckpt = load_run_model(run)
    kind = ckpt.get("kind", "efficient_gan")
    _check_evaluable(run, scoring, kind, ckpt)
    data = Path(data) if data is not None else Path(info["source"])
    size, channels = model.cfg.image_size, model.cfg.channels
    tiles = config.tiling.mode == "tiles"
    test = _load_test(data, size, channels, config.tiling)
    labels = np.asarray(test.labels).astype(int)
    bs = config.calibration.batch_size
    kw = dict(
        batch_size=bs,
        scoring="search" if scoring == "search" else "model",
        search_steps=config.anogan.search_steps,
        search_lr=config.anogan.search_lr,
        seed=config.train.seed,
        progress=True,
    )
    overlap = config.tiling.overlap
    held = _score_held_out(model, config, info, **kw)
    scored = score_framed(model, test.images, tiles, overlap, keep_recon=report, **kw)
    cal_path = run / "calibration.json"
    cal = json.loads(cal_path.read_text(encoding="utf-8")) if cal_path.is_file() else {}
    nu = float(cal.get("nu", config.calibration.nu))
    threshold = float(model.threshold)
    method = cal.get("method", "normal_quantile")
    if scoring == "search":
        if held is None:
            raise GanspectError(
                f"latent-search evaluation needs the held-out normals to set its threshold, "
                f"but the training data {info['source']} is gone"
            )
        method = "normal_quantile"
        threshold = _calibrate_search(held, scored, nu, config.calibration.heatmap_quantile)

    metrics: dict[str, Any] = image_metrics(scored.score, labels, threshold)
    metrics.update(
        {
            "kind": kind,
            "scoring": scoring,
            "threshold": threshold,
            "threshold_method": method,
            "nu": nu,
            "lambda": model.cfg.lambda_,
            "discrimination": model.cfg.discrimination,
            "residual_reduction": model.cfg.residual_reduction,
            "n_test_good": int((labels == 0).sum()),
            "n_test_bad": int((labels == 1).sum()),
            "n_calibration": int(cal.get("n_images", 0)) if held is None else len(held.score),
        }
    )
    if held is not None:
        metrics["false_alarm_rate_held_out"] = float((held.score > threshold).mean())
    both_classes = len(np.unique(labels)) == 2
    if both_classes:
        metrics.update(_labelled_metrics(scored, labels, list(test.kinds), held, nu))
    metrics["pixel_auroc"] = pixel_auroc(scored.heatmap, test.masks) if test.masks is not None else None
    metrics["data"] = str(data)
    head = load_ocnn_head(ckpt)
    if head is not None and both_classes:
        codes = latent_codes(model, test.images, batch_size=bs)
        metrics["ocnn"] = _ocnn_metrics(head, codes, scored.score, labels, metrics["image_auroc"])

    _write_results(run, "" if scoring == "encoder" else "_search", metrics, test, scored, held, info)
    if report:
        from ganspect.train.report import write_report

        metrics["report"] = str(write_report(run, metrics, test, scored, held))
    return metrics


def _write_results(
    run: Path, suffix: str, metrics: dict[str, Any], test: Any, scored: Any, held: Any, info: dict[str, Any]
) -> None:
    """metrics<suffix>.json, and every image's score in scores<suffix>.csv."""
    (run / f"metrics{suffix}.json").write_text(json.dumps(_json_safe(metrics), indent=2) + "\n", encoding="utf-8")
    with open(run / f"scores{suffix}.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "image", "kind", "label", "score"])
        for name, kind, label, score in zip(test.names, test.kinds, test.labels, scored.score):
            writer.writerow(["test", name, kind, int(label), f"{float(score):.6g}"])
        if held is not None:
            for name, score in zip(info.get("holdout_names", []), held.score):
                writer.writerow(["held_out", name, "good", 0, f"{float(score):.6g}"])


def _json_safe(value: Any) -> Any:
    """NaN is not JSON: write null instead."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def format_metrics(metrics: dict[str, Any]) -> str:
    """A short human-readable table of the headline metrics."""

    def fmt(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "n/a"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = [
        f"model           {metrics.get('kind', 'efficient_gan')}, scoring {metrics.get('scoring', 'encoder')}",
        f"test images     {metrics.get('n_test_good')} good, {metrics.get('n_test_bad')} defective",
        f"image AUROC     {fmt(metrics.get('image_auroc'))}",
        f"image AUPRC     {fmt(metrics.get('image_auprc'))}",
        f"pixel AUROC     {fmt(metrics.get('pixel_auroc'))}",
        f"threshold       {fmt(metrics.get('threshold'))} ({metrics.get('threshold_method')}, "
        f"nu={fmt(metrics.get('nu'))})",
        f"at threshold    precision {fmt(metrics.get('precision'))}  recall {fmt(metrics.get('recall'))}  "
        f"F1 {fmt(metrics.get('f1'))}",
    ]
    if "f1_optimal_threshold" in metrics:
        lines.append(
            f"F1-optimal      threshold {fmt(metrics['f1_optimal_threshold'])}  "
            f"F1 {fmt(metrics['f1_at_f1_optimal'])} (chosen on the test set: information only)"
        )
    for kind, auc in (metrics.get("image_auroc_by_kind") or {}).items():
        lines.append(f"  AUROC {kind:<20} {fmt(auc)}")
    if metrics.get("ocnn"):
        o = metrics["ocnn"]
        lines.append(
            f"OC-NN head      AUROC {fmt(o['image_auroc'])}, F1 {fmt(o['f1'])} at its boundary; "
            f"rank average with the GAN score: AUROC {fmt(o['combined_image_auroc'])}"
        )
    if metrics.get("lambda_sweep"):
        lines.append(
            "lambda sweep    "
            + "  ".join(f"{r['lambda']:.1f}:{fmt(r['image_auroc'])[:5]}" for r in metrics["lambda_sweep"])
            + "  (AUROC)"
        )
    return "\n".join(lines)
