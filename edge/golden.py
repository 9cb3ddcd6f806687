"""Golden images: model-sized PNGs in the bundle with each model file's expected outputs.

The exporter writes them (`write_golden_image`) and records what every model file
scored on them; `ganspect.edge.scorer.Scorer.load` reads them back (`read_golden_image`)
and runs them before the line starts, so a graph that computes differently on this
machine (another CPU's kernels, an onnxruntime that rounds otherwise, INT8 saturation on
a CPU without VNNI) is refused instead of judging parts. PNG is lossless: what the edge
reads is bit for bit what the exporter scored.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ganspect.edge.errors import BundleError
from ganspect.edge.manifest import InputSpec


def write_golden_image(path: Path, image: np.ndarray) -> Path:
    """Write one (H, W, C) uint8 image (C = 1 or 3, BGR) as PNG."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"golden images are uint8 (H, W, 1|3), got {image.dtype} {image.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image[:, :, 0] if image.shape[2] == 1 else image):
        raise OSError(f"could not write {path}")
    return path


def read_golden_image(path: Path, spec: InputSpec) -> np.ndarray:
    """Read a golden PNG as the model's (H, W, C) uint8 input; refuse one of another size or channel count."""
    flag = cv2.IMREAD_GRAYSCALE if spec.channels == 1 else cv2.IMREAD_COLOR
    image = cv2.imread(str(path), flag)
    if image is None:
        raise BundleError(f"golden image {path} is not a readable image")
    if image.ndim == 2:
        image = image[:, :, None]  # (H, W, 1)
    expected = (spec.height, spec.width, spec.channels)
    if image.shape != expected:
        raise BundleError(f"golden image {path} is {image.shape}, the manifest's input is {expected} (H, W, C)")
    return np.ascontiguousarray(image)
