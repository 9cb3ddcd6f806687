"""The operator window: frame, heatmap blend, a big OK/NG banner, score vs threshold, fps.

`render_overlay` is a pure function (image in, image out) so it can be tested without a
screen; `OverlayWindow` shows its result with OpenCV HighGUI on the main thread and
turns key presses into actions (h: toggle heatmap, q / Esc / closing the window: quit).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import cv2
import numpy as np

# BGR colours of the banner: readable from a distance, and the same as the test checks.
OK_COLOUR = (0, 170, 0)
NG_COLOUR = (0, 0, 220)
UNDEFINED_COLOUR = (128, 128, 128)  # no verdict could be made: neither pass nor fail
BANNER_COLOURS = {"OK": OK_COLOUR, "NG": NG_COLOUR}
# Heatmap values are clipped to 0..HEATMAP_CLIP before colouring: 1.0 is the largest
# normal residual, so anything at 2x or more is "clearly abnormal" and shows as red.
HEATMAP_CLIP = 2.0
# Small camera or model images are scaled up so the text stays legible.
MIN_DISPLAY_WIDTH = 480
WINDOW_NAME = "ganspect"


def banner_height(image_height: int) -> int:
    return max(36, image_height // 8)


def render_overlay(frame_bgr: np.ndarray, heatmap: np.ndarray, result: str, score: float | None,
                   threshold: float, fps: float | None = None, show_heatmap: bool = True,
                   alpha: float = 0.45) -> np.ndarray:
    """Frame (h, w, 3) uint8 + heatmap (H, W) float -> display image with banner and text.

    The heatmap is resized to the frame, clipped at 0..HEATMAP_CLIP and coloured with the
    JET map. It is blended with a per-pixel weight of `alpha` × heat (capped at 1), so
    the part stays visible where its residual is low and the colour shows where it is as
    large as the largest normal residual or more. A banner of banner_height() rows on top is
    green for OK, red for NG and grey for UNDEFINED.
    """
    image = frame_bgr if frame_bgr.ndim == 3 else cv2.cvtColor(frame_bgr, cv2.COLOR_GRAY2BGR)
    if image.shape[1] < MIN_DISPLAY_WIDTH:
        factor = MIN_DISPLAY_WIDTH / image.shape[1]
        image = cv2.resize(image, (MIN_DISPLAY_WIDTH, round(image.shape[0] * factor)), interpolation=cv2.INTER_NEAREST)
    else:
        image = image.copy()
    h, w = image.shape[:2]
    if show_heatmap:
        heat = cv2.resize(heatmap.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        heat_u8 = (np.clip(heat, 0.0, HEATMAP_CLIP) * (255.0 / HEATMAP_CLIP)).astype(np.uint8)
        coloured = cv2.applyColorMap(heat_u8, cv2.COLORMAP_JET)
        weight = (alpha * np.clip(heat, 0.0, 1.0))[:, :, None]  # (h, w, 1)
        image = (coloured * weight + image * (1.0 - weight)).astype(np.uint8)
    band = banner_height(h)
    colour = BANNER_COLOURS.get(result, UNDEFINED_COLOUR)
    cv2.rectangle(image, (0, 0), (w - 1, band - 1), colour, thickness=cv2.FILLED)
    scale = band / 40.0
    cv2.putText(image, result, (10, band - max(6, band // 6)), cv2.FONT_HERSHEY_DUPLEX, scale,
                (255, 255, 255), max(1, round(2 * scale)), cv2.LINE_AA)
    score_text = "score n/a" if score is None else f"score {score:.4f} {'>' if result == 'NG' else '<='} {threshold:.4f}"
    text_scale = max(0.45, band / 70.0)
    cv2.putText(image, score_text, (int(w * 0.3), band - max(6, band // 4)), cv2.FONT_HERSHEY_SIMPLEX,
                text_scale, (255, 255, 255), 1, cv2.LINE_AA)
    if fps is not None:
        _outlined_text(image, f"{fps:.1f} fps", (10, h - 10), text_scale)
    return image


def _outlined_text(image: np.ndarray, text: str, origin: tuple[int, int], scale: float) -> None:
    # Black outline under white text: readable on any part and any heatmap colour.
    cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


def display_available() -> bool:
    """True when the X or Wayland display named in the environment accepts connections.

    A stale $DISPLAY (an ssh session without X forwarding, a desktop that has logged
    out) is not enough: OpenCV's Qt backend aborts the whole process when it cannot
    connect, so the daemon looks before it opens a window.
    """
    wayland = os.environ.get("WAYLAND_DISPLAY")
    if wayland:
        runtime_dir = Path(os.environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.getuid()}"))
        if (runtime_dir / wayland).exists():
            return True
    display = os.environ.get("DISPLAY", "")
    host, _, screen = display.rpartition(":")
    number = screen.split(".")[0]
    if not number.isdigit():
        return False
    if host in ("", "unix"):
        return Path(f"/tmp/.X11-unix/X{number}").exists()
    try:  # X over TCP, e.g. ssh X forwarding's localhost:10.0 listens on 6010
        with socket.create_connection((host, 6000 + int(number)), timeout=0.5):
            return True
    except OSError:
        return False


class OverlayWindow:
    """A HighGUI window; call `show` from the main thread only."""

    def __init__(self, show_heatmap: bool = True) -> None:
        self.show_heatmap = show_heatmap
        # GUI_NORMAL: no Qt zoom/save toolbar; an operator needs the picture, not tools.
        cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL | cv2.WINDOW_GUI_NORMAL)
        self._shown = False

    def show(self, image: np.ndarray) -> bool:
        """Show one image and handle keys; False when the operator asked to quit."""
        if not self._shown:
            # WINDOW_NORMAL windows may open at a toolkit default size; start at the image's.
            cv2.resizeWindow(WINDOW_NAME, image.shape[1], image.shape[0])
        cv2.imshow(WINDOW_NAME, image)
        self._shown = True
        key = cv2.waitKey(1) & 0xFF
        if key == ord("h"):
            self.show_heatmap = not self.show_heatmap
        if key in (ord("q"), 27):
            return False
        # The window's close button: HighGUI reports it as not visible any more.
        return cv2.getWindowProperty(WINDOW_NAME, cv2.WND_PROP_VISIBLE) >= 1

    def close(self) -> None:
        cv2.destroyWindow(WINDOW_NAME)
        cv2.waitKey(1)
