"""Evaluate a run on a labelled test set (MVTec AD layout) and write `run/metrics.json`.

The threshold comes from calibration on held-out normal training images (stored in the
checkpoint); the test set never chooses it. The F1-optimal threshold on the test set is
reported beside it, for information only, as `f1_optimal_threshold`.
"""

from __future__ import annotations

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
        labels, pred, average="binary", pos_label=1, zero_division=0)
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


def pixel_auroc(heatmaps: np.ndarray, masks: np.ndarray) -> float:
    """Per-pixel AUROC of heatmaps (N, H, W) against 0/1 masks (N, H, W) over the whole test set."""
    from sklearn.metrics import roc_auc_score

    y = (np.asarray(masks).ravel() > 0).astype(np.uint8)
    if y.min() == y.max():
        return math.nan
    return float(roc_auc_score(y, np.asarray(heatmaps, dtype=np.float32).ravel()))


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


def lambda_sweep(l_r: np.ndarray, l_d: np.ndarray, labels: np.ndarray) -> list[dict[str, float]]:
    """Image AUROC for lambda = 0.0 ... 1.0 (seed 000's table), from the score parts."""
    from sklearn.metrics import roc_auc_score

    from ganspect.train.models.efficient_gan import weighted_score

    return [{"lambda": lam, "image_auroc": float(roc_auc_score(labels, weighted_score(l_r, l_d, lam)))}
            for lam in LAMBDA_SWEEP]


def evaluate_run(run: Path, data: Path | None) -> dict[str, Any]:
    """Score the run's held-out normals and the test set under `data` (default: the training data)."""
    from ganspect.train.calibrate import score_images
    from ganspect.train.data import is_mvtec_layout, load_test_set
    from ganspect.train.loop import load_run_model, read_run_config, read_run_info

    run = Path(run)
    config = read_run_config(run)
    info = read_run_info(run)
    model, ckpt = load_run_model(run)
    if not ckpt.get("calibrated"):
        raise GanspectError(f"{run}: training did not finish (no calibration yet); resume it with --resume")
    data = Path(data) if data is not None else Path(info["source"])
    if not is_mvtec_layout(data):
        raise GanspectError(f"{data} has no MVTec-style test/ folder with good and defective images to evaluate on")

    size, channels = model.cfg.image_size, model.cfg.channels
    test = load_test_set(data, size, channels)
    labels = np.asarray(test.labels).astype(int)
    if len(labels) == 0:
        raise GanspectError(f"{data}/test holds no images")
    bs = config.calibration.batch_size
    scored = score_images(model, test.images, batch_size=bs)
    threshold = float(model.threshold)
    cal_path = run / "calibration.json"
    cal = json.loads(cal_path.read_text(encoding="utf-8")) if cal_path.is_file() else {}

    metrics: dict[str, Any] = image_metrics(scored.score, labels, threshold)
    metrics.update({
        "threshold": threshold,
        "threshold_method": cal.get("method", "normal_quantile"),
        "nu": cal.get("nu", config.calibration.nu),
        "lambda": model.cfg.lambda_,
        "n_test_good": int((labels == 0).sum()),
        "n_test_bad": int((labels == 1).sum()),
        "n_calibration": int(cal.get("n_images", 0)),
    })
    if len(np.unique(labels)) == 2:
        thr, f1 = f1_optimal_threshold(scored.score, labels)
        metrics["f1_optimal_threshold"] = thr
        metrics["f1_at_f1_optimal"] = f1
        metrics["image_auroc_by_kind"] = per_kind_auroc(scored.score, labels, list(test.kinds))
        metrics["lambda_sweep"] = lambda_sweep(scored.l_r, scored.l_d, labels)
    metrics["pixel_auroc"] = pixel_auroc(scored.heatmap, test.masks) if test.masks is not None else None
    metrics["data"] = str(data)

    (run / "metrics.json").write_text(json.dumps(_json_safe(metrics), indent=2) + "\n", encoding="utf-8")
    return metrics


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
        lines.append(f"F1-optimal      threshold {fmt(metrics['f1_optimal_threshold'])}  "
                     f"F1 {fmt(metrics['f1_at_f1_optimal'])} (chosen on the test set: information only)")
    for kind, auc in (metrics.get("image_auroc_by_kind") or {}).items():
        lines.append(f"  AUROC {kind:<20} {fmt(auc)}")
    return "\n".join(lines)
