"""ROI and tiling with the real tiny bundle under onnxruntime: a small defect in one tile of a large ROI."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import cv2
import jsonschema
import numpy as np
import pytest

import ganspect.edge
from ganspect.edge.config import InspectionConfig, RoiConfig
from ganspect.edge.errors import ConfigError
from ganspect.edge.inspector import Inspector, Region, tile_starts
from ganspect.edge.scorer import Scorer

VERDICT_SCHEMA = json.loads((Path(ganspect.edge.__file__).parent / "schemas" / "verdict.schema.json").read_text())
FRAME_SIZE = (240, 160)  # (w, h)
ROI = RoiConfig(x=16, y=8, width=200, height=136)
DEFECT = (120, 70, 22, 22)  # x, y, w, h in frame pixels: a white patch far smaller than the ROI


def _frame(make_part_image: Any, defect: bool, index: int = 0) -> np.ndarray:
    image = make_part_image(False, index, FRAME_SIZE)
    if defect:
        x, y, w, h = DEFECT
        image[y : y + h, x : x + w] = 255
    return image


class CountingSession:
    """The real onnxruntime session, counting its runs and recording the batch shapes."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.batches: list[tuple[int, ...]] = []

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> Any:
        self.batches.extend(tuple(v.shape) for v in feeds.values())
        return self._session.run(outputs, feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


@pytest.mark.parametrize(
    ("length", "tile", "overlap", "expected"),
    [
        (32, 32, 8, [0]),
        (200, 32, 8, [0, 24, 48, 72, 96, 120, 144, 168]),
        (136, 32, 8, [0, 24, 48, 72, 96, 104]),  # the last tile is flush with the edge
        (64, 32, 0, [0, 32]),
    ],
)
def test_tiles_cover_the_length_with_the_overlap(length, tile, overlap, expected):
    starts = tile_starts(length, tile, overlap)
    assert starts == expected
    assert starts[-1] + tile == length
    assert all(b - a <= tile - overlap for a, b in itertools.pairwise(starts))


def test_a_small_defect_in_one_tile_is_found_in_one_run_and_its_heatmap_lands_on_it(tiny_bundle, make_part_image):
    scorer = Scorer.load(tiny_bundle, intra_op_threads=1)
    counting = CountingSession(scorer._session)
    scorer._session = counting  # type: ignore[assignment]
    tiles = Inspector(InspectionConfig(roi=ROI, tiling="tiles", tile_overlap=8))
    resized = Inspector(InspectionConfig(roi=ROI, tiling="resize"))
    threshold = scorer.threshold

    found = tiles.inspect(_frame(make_part_image, defect=True), scorer, threshold)
    good = tiles.inspect(_frame(make_part_image, defect=False), scorer, threshold)
    missed = resized.inspect(_frame(make_part_image, defect=True), scorer, threshold)

    # 8 x 6 tiles of 32x32 over the 200x136 ROI, one batch per frame, one run per frame.
    assert counting.batches == [(48, 32, 32, 1), (48, 32, 32, 1), (1, 32, 32, 1)]
    assert found.tiles == 48 and found.roi == Region(ROI.x, ROI.y, ROI.width, ROI.height)
    assert found.score.result == "NG" and good.score.result == "OK"
    # Resized to the model's 32x32, the same defect shrinks below what the model can tell apart.
    assert missed.score.result == "OK"
    # The stitched heatmap is the ROI's size and hot exactly where the defect is (ROI pixels).
    heat = found.score.heatmap
    assert heat.shape == (ROI.height, ROI.width)
    x, y, w, h = DEFECT
    rows, cols = np.nonzero(heat > 2.0)
    assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (
        x - ROI.x,
        y - ROI.y,
        x - ROI.x + w,
        y - ROI.y + h,
    )
    assert x - ROI.x <= found.score.peak_x < x - ROI.x + w and y - ROI.y <= found.score.peak_y < y - ROI.y + h
    assert np.isfinite(heat).all()  # every ROI pixel is covered by a tile
    # The worst tile decides: the frame's score is the largest tile score.
    assert found.score.score > found.score.threshold > good.score.score


class MovedPeakSession(CountingSession):
    """The real session, with its `peak` output moved one pixel to the right."""

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> Any:
        results = super().run(outputs, feeds)
        moved = results[2].copy()
        moved[:, 1] += 1
        return [*results[:2], moved]


def test_a_resized_frame_s_peak_is_the_graph_s_peak_output(tiny_bundle, make_part_image):
    # The graph carries the peak rule (export/graph.py): the edge reports its answer, it does not work out its own.
    scorer = Scorer.load(tiny_bundle, intra_op_threads=1)
    frame = _frame(make_part_image, defect=True)
    honest = Inspector(InspectionConfig(roi=ROI)).inspect(frame, scorer, scorer.threshold).score
    scorer._session = MovedPeakSession(scorer._session)  # type: ignore[assignment]
    moved = Inspector(InspectionConfig(roi=ROI)).inspect(frame, scorer, scorer.threshold).score
    assert honest.heatmap[honest.peak_y, honest.peak_x] == honest.heatmap.max() == honest.peak_value
    assert (moved.peak_y, moved.peak_x) == (honest.peak_y, honest.peak_x + 1)
    assert moved.peak_value == moved.heatmap[moved.peak_y, moved.peak_x]


def test_tiles_larger_than_the_roi_or_an_overlap_as_large_as_a_tile_are_refused(tiny_bundle):
    manifest = Scorer.load(tiny_bundle, intra_op_threads=1).manifest  # 32x32
    with pytest.raises(ConfigError, match=re.escape("inspection.roi 20x40 is smaller than the model's 32x32 tiles")):
        Inspector(InspectionConfig(roi=RoiConfig(x=0, y=0, width=20, height=40), tiling="tiles")).check(manifest)
    with pytest.raises(ConfigError, match=re.escape("inspection.tile_overlap 32 must be smaller")):
        Inspector(InspectionConfig(tiling="tiles", tile_overlap=32)).check(manifest)
    Inspector(InspectionConfig(roi=RoiConfig(x=0, y=0, width=20, height=40), tiling="resize")).check(manifest)


def test_daemon_with_tiles_finds_the_small_defect_and_saves_its_image(
    tiny_bundle, make_part_image, make_edge_config, ganspect_cli, tmp_path
):
    pattern = [False, True, False, False]
    video = tmp_path / "wide.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"FFV1"), 10.0, FRAME_SIZE)
    for i, defect in enumerate(pattern):
        writer.write(_frame(make_part_image, defect, i))
    writer.release()
    config = make_edge_config(
        tiny_bundle,
        video,
        None,
        inspection={
            "roi": {"x": ROI.x, "y": ROI.y, "width": ROI.width, "height": ROI.height},
            "tiling": "tiles",
            "tile_overlap": 8,
        },
    )
    verdict_log = tmp_path / "v.jsonl"

    proc = ganspect_cli("edge", "--config", str(config), "--headless", "--verdict-log", str(verdict_log))

    assert proc.returncode == 0, proc.stderr
    verdicts = [json.loads(line) for line in verdict_log.read_text(encoding="utf-8").splitlines()]
    assert [v["evaluation"]["state"] for v in verdicts] == ["NG" if d else "OK" for d in pattern]
    for v in verdicts:
        jsonschema.validate(v, VERDICT_SCHEMA)
    ng = verdicts[1]
    x, y, w, h = DEFECT
    peak = ng["heatmap_peak"]
    assert x - ROI.x <= peak["x"] < x - ROI.x + w and y - ROI.y <= peak["y"] < y - ROI.y + h
    # The NG image: named by the verdict id, the frame with the heatmap drawn over the defect.
    assert ng["image_path"] is not None and Path(ng["image_path"]).name == f"{ng['result_id']}.jpg"
    saved = cv2.imread(ng["image_path"])
    assert saved is not None
    assert all(v["image_path"] is None for v in verdicts if v["evaluation"]["state"] == "OK")
    scale = saved.shape[1] / FRAME_SIZE[0]  # the overlay scales small frames up for legibility
    defect_px = saved[int((y + 4) * scale) : int((y + h - 4) * scale), int((x + 4) * scale) : int((x + w - 4) * scale)]
    plain_px = saved[int(130 * scale) : int(150 * scale), int(30 * scale) : int(60 * scale)]
    # JET at the clip is dark red: the blended defect turns red-dominant; elsewhere the part stays grey.
    assert defect_px[..., 2].mean() > defect_px[..., 0].mean() + 40
    assert abs(float(plain_px[..., 2].mean()) - float(plain_px[..., 0].mean())) < 25


def test_the_bundle_s_tiling_frames_the_frame_when_the_station_says_nothing(make_bundle, make_part_image, tmp_path):
    # The model says how it was trained to see a frame (tiles of its input, this overlap, this region):
    # a station config that is silent on tiling follows it, and scores the same 48 tiles as above.
    trained = {"mode": "tiles", "overlap": 8, "roi": {"x": ROI.x, "y": ROI.y, "width": ROI.width, "height": ROI.height}}
    scorer = Scorer.load(make_bundle(tmp_path / "tiled", tiling=trained), intra_op_threads=1)
    inspector = Inspector(InspectionConfig())
    inspector.check(scorer.manifest)
    found = inspector.inspect(_frame(make_part_image, defect=True), scorer, scorer.threshold)
    assert found.tiles == 48 and found.roi == Region(ROI.x, ROI.y, ROI.width, ROI.height)
    assert found.score.result == "NG"


@pytest.mark.parametrize(
    ("station", "message"),
    [
        ({"tiling": "resize"}, "inspection.tiling is resize but the model tiny-test was trained with tiling tiles"),
        (
            {"tiling": "tiles", "tile_overlap": 4},
            "inspection.tile_overlap is 4 but the model tiny-test was trained with tiles overlapping by 8",
        ),
        ({"roi": {"x": 0, "y": 0, "width": 64, "height": 64}}, r"inspection.roi \(0,0\) 64x64 differs from the region"),
    ],
)
def test_a_station_that_would_tile_differently_from_the_training_is_refused(make_bundle, tmp_path, station, message):
    trained = {"mode": "tiles", "overlap": 8, "roi": {"x": 8, "y": 8, "width": 96, "height": 64}}
    manifest = Scorer.load(make_bundle(tmp_path / "tiled", tiling=trained), intra_op_threads=1).manifest
    with pytest.raises(ConfigError, match=message):
        Inspector(InspectionConfig.model_validate(station)).check(manifest)
    # Saying the same as the bundle is fine.
    Inspector(InspectionConfig(tiling="tiles", tile_overlap=8, roi=RoiConfig(x=8, y=8, width=96, height=64))).check(
        manifest
    )
