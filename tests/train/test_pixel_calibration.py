"""Per-pixel calibration for aligned parts: fixed rims stop deciding the peak; the graph carries it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ganspect.edge.errors import ConfigError
from ganspect.edge.manifest import load_bundle
from ganspect.export.bundle import export_run
from ganspect.train.config import config_from_dict
from ganspect.train.data import Framing, load_normal_images
from ganspect.train.evaluate import evaluate_run
from ganspect.train.loop import load_run_model, train


def _aligned_parts(root: Path, n: int, seed: int) -> None:
    """Aligned 32x32 parts: a sharp bright frame always in the same place (what a blurry
    reconstruction always misses) on a noisy grey face."""
    rng = np.random.default_rng(seed)
    (root / "train" / "good").mkdir(parents=True)
    for i in range(n):
        image = np.clip(rng.normal(110, 6, (32, 32)), 0, 255).astype(np.uint8)
        image[3:5, 3:29] = image[27:29, 3:29] = 250
        image[3:29, 3:5] = image[3:29, 27:29] = 250
        cv2.imwrite(str(root / "train" / "good" / f"{i:03d}.png"), image)


def _config(per_pixel: bool, spread: int = 0, polarity: str = "both") -> object:
    return config_from_dict(
        {
            "model": {
                "image_size": 32,
                "channels": 1,
                "latent_dim": 8,
                "base_width": 8,
                "residual_reduction": "peak",
                "heatmap_spread": spread,
                "residual_polarity": polarity,
            },
            "data": {"holdout": 0.3, "augment": {"shift": 0, "brightness": 0.0}},
            "train": {"steps": 10, "batch_size": 8, "threads": 2},
            "calibration": {"per_pixel": per_pixel},
        }
    )


def test_per_pixel_calibration_moves_normal_peaks_off_the_fixed_rim_and_ships_in_the_graph(tmp_path: Path) -> None:
    data = tmp_path / "parts"
    _aligned_parts(data, 40, seed=0)
    run = train(_config(per_pixel=True), data, tmp_path / "run")
    report = json.loads((run / "calibration.json").read_text(encoding="utf-8"))["per_pixel"]
    # Before: the raw residual peaks on the frame that is always there; after: on noise, anywhere.
    assert report["peaks_on_hot_pixels_before"] >= 0.5
    assert report["peaks_on_hot_pixels_after"] < report["peaks_on_hot_pixels_before"] / 2
    assert report["helps"] is True

    model, _ = load_run_model(run)
    assert float(model.pixel_spread.min()) >= report["spread_floor"] > 0
    bundle = export_run(run, tmp_path / "bundle", latency_budget_s=0.02)  # its parity check runs the graph
    manifest = load_bundle(bundle).manifest
    assert manifest.heatmap.per_pixel is True


def test_a_darker_only_residual_runs_in_the_exported_graph_as_in_training(tmp_path: Path) -> None:
    data = tmp_path / "parts"
    _aligned_parts(data, 40, seed=5)
    run = train(_config(per_pixel=True, polarity="darker"), data, tmp_path / "run")
    bundle = export_run(run, tmp_path / "bundle", latency_budget_s=0.02)  # its parity check runs the graph
    assert "darker than its reconstruction" in load_bundle(bundle).manifest.score.formula


def test_per_pixel_statistics_are_those_of_the_widened_maps_the_graph_normalises(tmp_path: Path) -> None:
    data = tmp_path / "parts"
    _aligned_parts(data, 40, seed=1)
    run = train(_config(per_pixel=True, spread=2), data, tmp_path / "run")
    model, _ = load_run_model(run)
    names = json.loads((run / "run.json").read_text(encoding="utf-8"))["holdout_names"]
    normals = load_normal_images(data, 32, 1, Framing(32))
    held = normals.images[[normals.names.index(n) for n in names]]
    with torch.no_grad():
        narrow = model.score_parts(model.normalise(torch.from_numpy(held))).residual.numpy()
    square = np.ones((5, 5), np.uint8)  # 2 pixels on each side
    widened = np.stack([cv2.dilate(m, square, borderType=cv2.BORDER_REPLICATE) for m in narrow])
    assert np.allclose(model.pixel_mean.numpy(), widened.mean(axis=0), rtol=1e-4, atol=1e-6)
    # ... and the graph normalises widened maps with them, not narrow ones widened afterwards.
    with torch.no_grad():
        _, heatmap = model(torch.from_numpy(held))
    expected = (widened - model.pixel_mean.numpy()) / model.pixel_spread.numpy() / float(model.heatmap_scale)
    assert np.allclose(heatmap.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_a_model_file_of_a_per_pixel_run_gets_its_threshold_by_leave_one_out_as_training_did(tmp_path: Path) -> None:
    """An INT8 file's threshold is chosen on its own scores of the held-out normals. Scored by a
    graph whose statistics include them, those normals look safer than unseen parts (the
    threshold of one seed of ELPV fell from 13.6 to 6.4, and its guard saw 76 % agreement).
    The FP32 file computes what training computed, so by the same rule it must get training's
    threshold back."""
    from ganspect.export.bundle import _check_images, _file_threshold, _read_run

    data = tmp_path / "parts"
    _aligned_parts(data, 40, seed=4)
    run = train(_config(per_pixel=True), data, tmp_path / "run")
    bundle = export_run(run, tmp_path / "bundle", latency_budget_s=0.02)
    src = _read_run(run)
    images = _check_images(src, None, int8=True).images
    assert images is not None
    assert _file_threshold(bundle / "model.onnx", images, src) == pytest.approx(src.threshold, rel=1e-4)


def test_evaluation_measures_held_out_normals_as_the_threshold_saw_them(tmp_path: Path) -> None:
    """Scored by the calibrated model, a held-out normal is measured against statistics it
    helped estimate and looks safer than an unseen part; the threshold was set on
    leave-one-out scores, so the evaluation's held-out figures must be those."""
    data = tmp_path / "parts"
    _aligned_parts(data, 40, seed=2)
    _aligned_parts(tmp_path / "test_good", 6, seed=3)
    (data / "test").mkdir()
    (tmp_path / "test_good" / "train" / "good").rename(data / "test" / "good")
    (data / "test" / "hole").mkdir()
    for i, name in enumerate(sorted((data / "test" / "good").iterdir())[:3]):
        image = cv2.imread(str(name), cv2.IMREAD_GRAYSCALE)
        image[12:18, 12:18] = 0
        cv2.imwrite(str(data / "test" / "hole" / f"{i}.png"), image)
    run = train(_config(per_pixel=True), data, tmp_path / "run")
    confidence = json.loads((run / "calibration.json").read_text(encoding="utf-8"))["confidence"]
    assert confidence["held_out_above"] >= 1  # the 99th percentile of 12 normals lies below their maximum

    metrics = evaluate_run(run, None, report=False)
    assert metrics["false_alarm_rate_held_out"] == pytest.approx(confidence["false_alarm_rate_held_out"])
    with open(run / "scores.csv", encoding="utf-8") as f:
        held = [float(row["score"]) for row in csv.DictReader(f) if row["split"] == "held_out"]
    assert sum(score > metrics["threshold"] for score in held) == confidence["held_out_above"]


def test_per_pixel_calibration_is_refused_where_it_cannot_mean_anything() -> None:
    with pytest.raises(ConfigError, match="aligned parts scored whole"):
        config_from_dict({"calibration": {"per_pixel": True}, "tiling": {"mode": "tiles"}})
    with pytest.raises(ConfigError, match="needs a peak score"):
        config_from_dict({"calibration": {"per_pixel": True}, "model": {"residual_reduction": "mean"}})
