"""Frame -> model input, exactly as the manifest says (numpy and OpenCV only).

The graph normalises pixels itself, so the edge only converts colour, resizes and adds
the batch axis: what goes in is uint8 (1, H, W, C), never scaled or guessed from data.
"""

from __future__ import annotations

import cv2
import numpy as np

from ganspect.edge.manifest import InputSpec

_INTERPOLATION = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR}


def preprocess(frame_bgr: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(h, w, 3) or (h, w) uint8 BGR frame -> (1, H, W, C) uint8 for the model's `image` input."""
    if frame_bgr.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frame_bgr.dtype}")
    image = frame_bgr
    if spec.colour_order == "GRAY" and image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)  # (h, w)
    elif spec.colour_order == "BGR" and image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)  # (h, w, 3)
    if image.shape[:2] != (spec.height, spec.width):
        # cv2.resize takes (width, height).
        image = cv2.resize(image, (spec.width, spec.height), interpolation=_INTERPOLATION[spec.resize_interpolation])
    if image.ndim == 2:
        image = image[:, :, None]  # (H, W, 1): keep the channel axis for NHWC
    return np.ascontiguousarray(image[None])  # (1, H, W, C)
