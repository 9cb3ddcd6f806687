"""Region of interest and tiling: a frame -> one batch for one `session.run` -> one score and heatmap.

- `resize`: the ROI (or the whole frame) is resized to the model input, as the manifest
  says; the heatmap is in model pixels.
- `tiles`: the ROI is cut into tiles of exactly the model's input size, neighbours
  sharing `tile_overlap` pixels, the last tile of a row or column flush with the ROI's
  edge. One ROI pixel is one model pixel, so a defect keeps the size the model was
  trained to see. All tiles go through the graph as one batch; each tile's heatmap goes
  back to its place (the larger value where tiles overlap), and the frame's score is the
  worst tile's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from ganspect.edge.config import InspectionConfig
from ganspect.edge.errors import ConfigError
from ganspect.edge.manifest import InputSpec
from ganspect.edge.preprocess import preprocess
from ganspect.edge.scorer import Score, Scorer


@dataclass(frozen=True)
class Region:
    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True)
class Inspection:
    score: Score  # heatmap in model pixels (resize) or ROI pixels (tiles); peak in the same pixels
    roi: Region  # where the heatmap lies in the frame
    tiles: int  # images in the batch


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` pixels covering `length` with at least `overlap` shared; last one flush."""
    if length < tile:
        raise ValueError(f"a tile of {tile} px does not fit in {length} px")
    if length == tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    return [min(i * stride, length - tile) for i in range(count)]


class Inspector:
    """Crops, batches and scores frames as `inspection` says; `inspect` is one session.run per frame.

    The scorer and threshold come with each call, so a model reload or a threshold
    override between two frames needs nothing from here but `check` of the new model.
    """

    def __init__(self, config: InspectionConfig) -> None:
        self._config = config

    def check(self, spec: InputSpec) -> None:
        """Refuse settings the model cannot serve (tiles larger than the ROI, overlap as large as a tile)."""
        config = self._config
        if config.tiling != "tiles":
            return
        if config.tile_overlap >= min(spec.height, spec.width):
            raise ConfigError(f"inspection.tile_overlap {config.tile_overlap} must be smaller than the model's "
                              f"{spec.width}x{spec.height} input")
        roi = config.roi
        if roi is not None and (roi.width < spec.width or roi.height < spec.height):
            raise ConfigError(f"inspection.roi {roi.width}x{roi.height} is smaller than the model's "
                              f"{spec.width}x{spec.height} tiles; enlarge it or use inspection.tiling: resize")

    def region(self, frame_shape: tuple[int, ...]) -> Region:
        height, width = frame_shape[:2]
        roi = self._config.roi
        if roi is None:
            return Region(0, 0, width, height)
        if roi.x + roi.width > width or roi.y + roi.height > height:
            raise ValueError(f"inspection.roi ({roi.x},{roi.y}) {roi.width}x{roi.height} does not fit in the "
                             f"{width}x{height} frame")
        return Region(roi.x, roi.y, roi.width, roi.height)

    def inspect(self, frame_bgr: np.ndarray, scorer: Scorer, threshold: float) -> Inspection:
        """Score one frame with `scorer`; NG when the (worst tile's) score is above `threshold`."""
        t0 = time.perf_counter()
        region = self.region(frame_bgr.shape)
        crop = frame_bgr[region.y: region.y + region.height, region.x: region.x + region.width]
        spec = scorer.manifest.input
        if self._config.tiling == "resize":
            batch = preprocess(crop, spec)  # (1, H, W, C)
            origins = [(0, 0)]
        else:
            ys = tile_starts(region.height, spec.height, self._config.tile_overlap)
            xs = tile_starts(region.width, spec.width, self._config.tile_overlap)
            origins = [(y, x) for y in ys for x in xs]
            # Tiles are model-sized already: preprocess only converts colour and adds the batch axis.
            batch = np.concatenate([preprocess(crop[y: y + spec.height, x: x + spec.width], spec)
                                    for y, x in origins])  # (N, H, W, C)
        t1 = time.perf_counter()
        scores, heatmaps = scorer.run_batch(batch)  # (N,), (N, H, W)
        t2 = time.perf_counter()
        if self._config.tiling == "resize":
            heat = heatmaps[0]
        else:
            heat = np.full((region.height, region.width), -np.inf, np.float32)
            for (y, x), tile_heat in zip(origins, heatmaps):
                window = heat[y: y + spec.height, x: x + spec.width]
                np.maximum(window, tile_heat, out=window)
        peak_y, peak_x = np.unravel_index(int(np.argmax(heat)), heat.shape)
        # max() of a NaN-holding array is NaN: a broken tile makes the frame UNDEFINED, never OK.
        worst = float(np.max(scores))
        score = Score(score=worst, threshold=threshold, heatmap=heat, peak_x=int(peak_x), peak_y=int(peak_y),
                      peak_value=float(heat[peak_y, peak_x]), preprocess_ms=(t1 - t0) * 1000.0,
                      inference_ms=(t2 - t1) * 1000.0)
        return Inspection(score=score, roi=region, tiles=len(origins))
