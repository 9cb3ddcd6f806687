"""The inspector: region of interest and tiling, a frame -> one batch for one `session.run` -> one score and heatmap.

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

from ganspect.edge.config import InspectionConfig, RoiConfig
from ganspect.edge.errors import ConfigError
from ganspect.edge.manifest import Manifest
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


def stitch(tile_maps: np.ndarray, origins: list[tuple[int, int]], height: int, width: int) -> np.ndarray:
    """Tile maps (T, h, w) back into one (height, width) map, the larger value where tiles overlap.

    The trainer's evaluation stitches with this too, so that it scores exactly as the edge does.
    """
    tile_h, tile_w = tile_maps.shape[-2:]
    out = np.full((height, width), -np.inf, np.float32)
    for (y, x), tile in zip(origins, tile_maps):
        window = out[y : y + tile_h, x : x + tile_w]
        np.maximum(window, tile, out=window)
    return out


@dataclass(frozen=True)
class Framing:
    """The tiling actually used: the bundle's (how the model was trained) over the station's settings."""

    tiling: str
    tile_overlap: int
    roi: RoiConfig | None


def framing_for(config: InspectionConfig, manifest: Manifest) -> Framing:
    """The bundle's tiling where it records one; a station setting that contradicts it is refused.

    A station set to tile differently from its training would score tiles the model was
    never shown (or squash what it learned at native pixels): it must fail at load, not
    quietly miss defects.
    """
    spec = manifest.tiling
    if spec is None:
        return Framing(config.tiling, config.tile_overlap, config.roi)
    explicit = config.model_fields_set
    if "tiling" in explicit and config.tiling != spec.mode:
        raise ConfigError(
            f"inspection.tiling is {config.tiling} but the model {manifest.name} was trained with "
            f"tiling {spec.mode}; remove inspection.tiling (the bundle says how to frame) or retrain"
        )
    if spec.mode == "tiles" and "tile_overlap" in explicit and config.tile_overlap != spec.overlap:
        raise ConfigError(
            f"inspection.tile_overlap is {config.tile_overlap} but the model {manifest.name} was "
            f"trained with tiles overlapping by {spec.overlap}; remove inspection.tile_overlap"
        )
    roi = config.roi
    if spec.roi is not None:
        trained = RoiConfig(x=spec.roi.x, y=spec.roi.y, width=spec.roi.width, height=spec.roi.height)
        if roi is not None and roi != trained:
            raise ConfigError(
                f"inspection.roi ({roi.x},{roi.y}) {roi.width}x{roi.height} differs from the region the "
                f"model {manifest.name} was trained on ({trained.x},{trained.y}) "
                f"{trained.width}x{trained.height}; remove inspection.roi or retrain"
            )
        roi = trained
    return Framing(spec.mode, spec.overlap, roi)


class Inspector:
    """Crops, batches and scores frames as the bundle and `inspection` say; `inspect` is one session.run per frame.

    The scorer and threshold come with each call, so a model reload or a threshold
    override between two frames needs nothing from here but `check` of the new model.
    """

    def __init__(self, config: InspectionConfig) -> None:
        self._config = config
        self._framed: tuple[Manifest, Framing] | None = None

    def framing(self, manifest: Manifest) -> Framing:
        """`framing_for` the model in use, worked out once per model rather than on every frame."""
        if self._framed is None or self._framed[0] is not manifest:
            self._framed = (manifest, framing_for(self._config, manifest))
        return self._framed[1]

    def check(self, manifest: Manifest) -> None:
        """Refuse settings the model cannot serve (tiles larger than the ROI, overlap as large as a tile,
        tiling other than the model's training)."""
        config = framing_for(self._config, manifest)
        spec = manifest.input
        if config.tiling != "tiles":
            return
        if config.tile_overlap >= min(spec.height, spec.width):
            raise ConfigError(
                f"inspection.tile_overlap {config.tile_overlap} must be smaller than the model's "
                f"{spec.width}x{spec.height} input"
            )
        roi = config.roi
        if roi is not None and (roi.width < spec.width or roi.height < spec.height):
            raise ConfigError(
                f"inspection.roi {roi.width}x{roi.height} is smaller than the model's "
                f"{spec.width}x{spec.height} tiles; enlarge it or use inspection.tiling: resize"
            )

    def region(self, frame_shape: tuple[int, ...], roi: RoiConfig | None = None) -> Region:
        height, width = frame_shape[:2]
        if roi is None:
            return Region(0, 0, width, height)
        if roi.x + roi.width > width or roi.y + roi.height > height:
            raise ValueError(
                f"inspection.roi ({roi.x},{roi.y}) {roi.width}x{roi.height} does not fit in the {width}x{height} frame"
            )
        return Region(roi.x, roi.y, roi.width, roi.height)

    def inspect(self, frame_bgr: np.ndarray, scorer: Scorer, threshold: float) -> Inspection:
        """Score one frame with `scorer`; NG when the (worst tile's) score is above `threshold`."""
        t0 = time.perf_counter()
        framing = self.framing(scorer.manifest)
        region = self.region(frame_bgr.shape, framing.roi)
        crop = frame_bgr[region.y : region.y + region.height, region.x : region.x + region.width]
        spec = scorer.manifest.input
        if framing.tiling == "resize":
            batch = preprocess(crop, spec)  # (1, H, W, C)
            origins = [(0, 0)]
        else:
            ys = tile_starts(region.height, spec.height, framing.tile_overlap)
            xs = tile_starts(region.width, spec.width, framing.tile_overlap)
            origins = [(y, x) for y in ys for x in xs]
            # Tiles are model-sized already: preprocess only converts colour and adds the batch axis.
            batch = np.concatenate(
                [preprocess(crop[y : y + spec.height, x : x + spec.width], spec) for y, x in origins]
            )  # (N, H, W, C)
        t1 = time.perf_counter()
        scores, heatmaps, peaks = scorer.run_batch(batch)  # (N,), (N, H, W), (N, 2)
        t2 = time.perf_counter()
        if framing.tiling == "resize":
            heat = heatmaps[0]
            peak_y, peak_x = (int(v) for v in peaks[0])  # the graph's own argmax: no model maths here
        else:
            # The stitched map is made here (the larger value where tiles overlap), so its peak is found here.
            heat = stitch(heatmaps, origins, region.height, region.width)
            peak_y, peak_x = (int(v) for v in np.unravel_index(int(np.argmax(heat)), heat.shape))
        # max() of a NaN-holding array is NaN: a broken tile makes the frame UNDEFINED, never OK.
        worst = float(np.max(scores))
        score = Score(
            score=worst,
            threshold=threshold,
            heatmap=heat,
            peak_x=peak_x,
            peak_y=peak_y,
            peak_value=float(heat[peak_y, peak_x]),
            preprocess_ms=(t1 - t0) * 1000.0,
            inference_ms=(t2 - t1) * 1000.0,
        )
        return Inspection(score=score, roi=region, tiles=len(origins))
