"""Evaluation: metrics on hand-computed cases, and metrics.json of a tiny trained run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from ganspect.train.config import config_from_dict
from ganspect.train.evaluate import (
    evaluate_run,
    f1_optimal_threshold,
    format_metrics,
    image_metrics,
    lambda_sweep,
    per_kind_auroc,
    pixel_auroc,
)
from ganspect.train.loop import train
from ganspect.train.synth import synthesize_dataset

SCORES = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
LABELS = np.array([0, 0, 1, 0, 1, 1])


def test_image_metrics_by_hand() -> None:
    m = image_metrics(SCORES, LABELS, threshold=0.35)
    # Predicted NG: 0.4, 0.5, 0.6 -> TP 2 (0.5, 0.6), FP 1 (0.4), FN 1 (0.3).
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    # 8 of the 9 (anomalous, normal) pairs are ordered correctly (0.3 < 0.4 is not).
    assert m["image_auroc"] == pytest.approx(8 / 9)
    # Ranked: P P N P -> AP = 1/3 * 1 + 1/3 * 1 + 1/3 * 3/4.
    assert m["image_auprc"] == pytest.approx((1 + 1 + 0.75) / 3)
    # score > threshold, not >=: a score equal to the threshold is OK.
    assert image_metrics(SCORES, LABELS, threshold=0.5)["recall"] == pytest.approx(1 / 3)


def test_f1_optimal_threshold_by_hand() -> None:
    # Calling the top 4 NG gives P 3/4, R 1, F1 6/7: the best cut lies between 0.2 and 0.3.
    thr, f1 = f1_optimal_threshold(SCORES, LABELS)
    assert thr == pytest.approx(0.25)
    assert f1 == pytest.approx(6 / 7)
    assert image_metrics(SCORES, LABELS, thr)["f1"] == pytest.approx(6 / 7)


def test_pixel_and_per_kind_auroc_by_hand() -> None:
    heat = np.array([[[0.9, 0.1], [0.2, 0.3]]])  # (1, 2, 2)
    mask = np.array([[[1, 0], [0, 1]]], dtype=np.uint8)
    # Positives 0.9, 0.3 vs negatives 0.1, 0.2: all 4 pairs ordered correctly.
    assert pixel_auroc(heat, mask) == pytest.approx(1.0)
    assert np.isnan(pixel_auroc(heat, np.zeros_like(mask)))
    kinds = ["good", "good", "dent", "good", "scratch", "scratch"]
    by_kind = per_kind_auroc(SCORES, LABELS, kinds)
    assert by_kind == {"dent": pytest.approx(2 / 3), "scratch": pytest.approx(1.0)}


def test_evaluate_run_writes_metrics(tmp_path: Path) -> None:
    data = tmp_path / "parts32"
    synthesize_dataset(data, size=32, n_train=20, n_test_good=6, n_test_bad=8, seed=1)
    config = config_from_dict(
        {
            "model": {"image_size": 32, "channels": 3, "latent_dim": 8, "base_width": 8},
            "train": {"steps": 4, "batch_size": 8, "threads": 2},
        }
    )
    run = train(config, data=data, out=tmp_path / "run")
    metrics = evaluate_run(run, data=None)
    written = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    for key in (
        "image_auroc",
        "image_auprc",
        "f1",
        "precision",
        "recall",
        "threshold",
        "threshold_method",
        "nu",
        "n_test_good",
        "n_test_bad",
        "pixel_auroc",
        "image_auroc_by_kind",
        "lambda_sweep",
    ):
        assert key in written, key
    assert written["n_test_good"] == 6 and written["n_test_bad"] == 8
    calibration = json.loads((run / "calibration.json").read_text(encoding="utf-8"))
    assert written["threshold"] == pytest.approx(calibration["threshold"], rel=1e-6)
    assert written["threshold_method"] == "normal_quantile"
    assert 0.0 <= written["image_auroc"] <= 1.0 and 0.0 <= written["pixel_auroc"] <= 1.0
    assert [row["lambda"] for row in written["lambda_sweep"]] == pytest.approx([i / 10 for i in range(11)])
    text = format_metrics(metrics)
    assert "image AUROC" in text and "pixel AUROC" in text
    # Each lambda has its own held-out threshold and F1 at it.
    assert all(row["threshold"] is not None and 0.0 <= row["f1"] <= 1.0 for row in written["lambda_sweep"])
    assert written["scoring"] == "encoder" and written["kind"] == "efficient_gan"
    assert 0.0 <= written["false_alarm_rate_held_out"] <= 1.0
    # Every image's score, as the metrics saw it: the same F1 at the threshold from the file alone.
    with open(run / "scores.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    test_rows = [r for r in rows if r["split"] == "test"]
    assert len(test_rows) == 14 and sum(r["split"] == "held_out" for r in rows) == written["n_calibration"]
    from_file = image_metrics(
        np.array([float(r["score"]) for r in test_rows]),
        np.array([int(r["label"]) for r in test_rows]),
        written["threshold"],
    )
    assert from_file["f1"] == pytest.approx(written["f1"], abs=1e-3)

    report = run / "report"
    text = (report / "report.md").read_text(encoding="utf-8")
    for png in ("losses.png", "scores.png", "roc_pr.png", "lambda_sweep.png", "examples.png"):
        assert (report / png).stat().st_size > 5000, png
        assert f"]({png})" in text
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| image AUROC |" in text


def test_lambda_sweep_by_hand() -> None:
    l_r = np.array([0.1, 0.2, 0.9, 0.8])
    l_d = np.array([0.9, 0.8, 0.1, 0.2])
    labels = np.array([0, 0, 1, 1])
    held_r = np.array([0.1, 0.3])
    held_d = np.array([0.5, 0.7])
    rows = lambda_sweep(l_r, l_d, labels, held_r, held_d, nu=0.0)
    assert [r["lambda"] for r in rows] == pytest.approx([i / 10 for i in range(11)])
    # lambda 0: the residual alone separates perfectly; lambda 1: the feature distance ranks backwards.
    assert rows[0]["image_auroc"] == pytest.approx(1.0) and rows[10]["image_auroc"] == pytest.approx(0.0)
    # Thresholds: max of the held-out scores (nu = 0): lambda 0 -> 0.3; lambda 1 -> 0.7.
    assert rows[0]["threshold"] == pytest.approx(0.3) and rows[10]["threshold"] == pytest.approx(0.7)
    assert rows[0]["f1"] == pytest.approx(1.0)  # 0.9, 0.8 > 0.3; 0.1, 0.2 are not
    # lambda 1: scores 0.9, 0.8 (normals) > 0.7 are NG, anomalies 0.1, 0.2 are not: F1 0.
    assert rows[10]["f1"] == pytest.approx(0.0)
    # lambda 0.5: every image scores 0.5, held-out 0.3 and 0.5 -> threshold 0.5 -> nothing NG.
    assert rows[5]["threshold"] == pytest.approx(0.5) and rows[5]["f1"] == pytest.approx(0.0)
    assert lambda_sweep(l_r, l_d, labels)[0]["f1"] is None


def test_latent_search_evaluation_is_refused_for_efficient_gan(tmp_path: Path, ganspect_cli) -> None:
    data = tmp_path / "parts32"
    synthesize_dataset(data, size=32, n_train=12, n_test_good=2, n_test_bad=2, seed=1)
    config = config_from_dict(
        {
            "model": {"image_size": 32, "channels": 1, "latent_dim": 8, "base_width": 8},
            "train": {"steps": 1, "batch_size": 4, "threads": 2},
        }
    )
    run = train(config, data=data, out=tmp_path / "run")
    proc = ganspect_cli("eval", str(run), "--scoring", "search")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "latent search" in proc.stderr and "efficient_gan" in proc.stderr
