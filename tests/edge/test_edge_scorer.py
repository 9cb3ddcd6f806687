"""Preprocessing and scoring with real OpenCV and onnxruntime on the tiny bundle, as the daemon scores."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from ganspect.edge.config import InspectionConfig
from ganspect.edge.inspector import Inspector
from ganspect.edge.manifest import InputSpec
from ganspect.edge.preprocess import preprocess
from ganspect.edge.scorer import Scorer


def test_preprocess_gray_resizes_with_area_and_keeps_the_channel_axis():
    frame = np.random.default_rng(0).integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    spec = InputSpec(height=30, width=40, channels=1, colour_order="GRAY")
    batch = preprocess(frame, spec)
    assert batch.shape == (1, 30, 40, 1) and batch.dtype == np.uint8
    expected = cv2.resize(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), (40, 30), interpolation=cv2.INTER_AREA)
    assert np.array_equal(batch[0, :, :, 0], expected)


def test_preprocess_bgr_linear_and_gray_frames():
    frame = np.random.default_rng(1).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    spec = InputSpec(height=20, width=24, channels=3, colour_order="BGR", resize_interpolation="linear")
    batch = preprocess(frame, spec)
    assert batch.shape == (1, 20, 24, 3)
    assert np.array_equal(batch[0], cv2.resize(frame, (24, 20), interpolation=cv2.INTER_LINEAR))
    gray_frame = frame[:, :, 0]
    assert preprocess(gray_frame, spec).shape == (1, 20, 24, 3)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(frame.astype(np.float32), spec)


@pytest.mark.parametrize("colour_order", ["GRAY", "BGR"])
def test_score_matches_the_models_formula(tmp_path, make_bundle, make_part_image, colour_order):
    # Through the daemon's path: the inspector resizes the whole frame (no ROI, no tiles) for one session.run.
    scorer = Scorer.load(make_bundle(tmp_path / "b", height=24, width=40, colour_order=colour_order))
    inspector = Inspector(InspectionConfig())
    for index, ng in enumerate([False, True, True]):
        frame = make_part_image(ng, index)
        result = inspector.inspect(frame, scorer, scorer.threshold).score
        batch = preprocess(frame, scorer.manifest.input)  # (1, H, W, C)
        deviation = np.abs(batch[0].astype(np.float64) / 255.0 - 0.5).mean(axis=2)  # (H, W)
        assert result.score == pytest.approx(deviation.mean(), abs=1e-5)
        assert result.heatmap.shape == (24, 40)
        assert result.result == ("NG" if ng else "OK")
        assert result.peak_value == pytest.approx(result.heatmap.max())
        assert result.heatmap[result.peak_y, result.peak_x] == result.heatmap.max()
        # The peak is the graph's own output, not worked out again here.
        _, _, peaks = scorer.run_batch(batch)
        assert (result.peak_y, result.peak_x) == tuple(peaks[0])
        assert result.preprocess_ms >= 0 and result.inference_ms > 0


def test_nan_score_is_undefined_never_ok():
    from ganspect.edge.scorer import Score

    nan = Score(
        score=float("nan"),
        threshold=0.1,
        heatmap=np.zeros((2, 2), np.float32),
        peak_x=0,
        peak_y=0,
        peak_value=0.0,
        preprocess_ms=0.0,
        inference_ms=0.0,
    )
    assert nan.result == "UNDEFINED"
