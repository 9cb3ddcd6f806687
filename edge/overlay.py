"""The operator window: frame, heatmap blend over the ROI, a big OK/NG banner, score bar, status.

`render_overlay` is a pure function (image in, image out) so it can be tested without a
screen, and the NG image store draws its JPEGs with it too; `OverlayWindow` shows its
result with OpenCV HighGUI on the main thread and turns key presses into actions
(h: toggle heatmap, f: fullscreen, s: save the shown image, q / Esc / closing the
window: quit).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
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
STATUS_BACKGROUND = (40, 40, 40)
BAR_BACKGROUND = (60, 60, 60)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatusLine:
    """What the strip under the frame says: where, how many, and whether camera and broker are well."""

    station: str
    ok: int
    ng: int
    undefined: int
    camera: str  # capture state: open, stalled, reconnecting, ...
    broker: str  # online, offline, disabled


def status_height(image_height: int) -> int:
    return max(22, image_height // 16)


def bar_height(image_height: int) -> int:
    return max(8, banner_height(image_height) // 4)


def banner_height(image_height: int) -> int:
    return max(36, image_height // 8)


def render_overlay(  # noqa: PLR0913 — display options with defaults, named by the callers that set them
    frame_bgr: np.ndarray,
    heatmap: np.ndarray | None,
    result: str,
    score: float | None,
    threshold: float,
    fps: float | None = None,
    show_heatmap: bool = True,
    alpha: float = 0.45,
    roi: tuple[int, int, int, int] | None = None,
    status: StatusLine | None = None,
) -> np.ndarray:
    """Frame (h, w, 3) uint8 + heatmap (H, W) float -> display image with banner and text.

    The heatmap is resized to the frame, clipped at 0..HEATMAP_CLIP and coloured with the
    JET map. It is blended with a per-pixel weight of `alpha` × heat (capped at 1), so
    the part stays visible where its residual is low and the colour shows where it is as
    large as the largest normal residual or more. `roi` (x, y, width, height in frame
    pixels) is where the heatmap lies; None = the whole frame. A banner of banner_height()
    rows on top is green for OK, red for NG and grey for UNDEFINED; under it a bar shows the
    score against the threshold (the white tick, at mid-width). With `status`, a dark strip of
    status_height() rows is added under the frame (station, counts, camera and broker).
    """
    image = frame_bgr if frame_bgr.ndim == 3 else cv2.cvtColor(frame_bgr, cv2.COLOR_GRAY2BGR)
    factor = 1.0
    if image.shape[1] < MIN_DISPLAY_WIDTH:
        factor = MIN_DISPLAY_WIDTH / image.shape[1]
        image = cv2.resize(image, (MIN_DISPLAY_WIDTH, round(image.shape[0] * factor)), interpolation=cv2.INTER_NEAREST)
    else:
        image = image.copy()
    h, w = image.shape[:2]
    rx, ry, rw, rh = (0, 0, w, h) if roi is None else (round(v * factor) for v in roi)
    rw, rh = max(1, min(rw, w - rx)), max(1, min(rh, h - ry))
    if show_heatmap and heatmap is not None:
        heat = cv2.resize(heatmap.astype(np.float32), (rw, rh), interpolation=cv2.INTER_LINEAR)
        heat = np.nan_to_num(heat, nan=HEATMAP_CLIP, posinf=HEATMAP_CLIP, neginf=0.0)
        heat_u8 = (np.clip(heat, 0.0, HEATMAP_CLIP) * (255.0 / HEATMAP_CLIP)).astype(np.uint8)
        coloured = cv2.applyColorMap(heat_u8, cv2.COLORMAP_JET)
        weight = (alpha * np.clip(heat, 0.0, 1.0))[:, :, None]  # (rh, rw, 1)
        part = image[ry : ry + rh, rx : rx + rw]
        image[ry : ry + rh, rx : rx + rw] = (coloured * weight + part * (1.0 - weight)).astype(np.uint8)
    if roi is not None:
        cv2.rectangle(image, (rx, ry), (rx + rw - 1, ry + rh - 1), (255, 255, 255), 1)
    band = banner_height(h)
    colour = BANNER_COLOURS.get(result, UNDEFINED_COLOUR)
    cv2.rectangle(image, (0, 0), (w - 1, band - 1), colour, thickness=cv2.FILLED)
    scale = band / 40.0
    cv2.putText(
        image,
        result,
        (10, band - max(6, band // 6)),
        cv2.FONT_HERSHEY_DUPLEX,
        scale,
        (255, 255, 255),
        max(1, round(2 * scale)),
        cv2.LINE_AA,
    )
    score_text = (
        "score n/a" if score is None else f"score {score:.4f} {'>' if result == 'NG' else '<='} {threshold:.4f}"
    )
    text_scale = max(0.45, band / 70.0)
    # The score follows the result word (UNDEFINED is long), at 30 % of the width at the earliest.
    word_width = cv2.getTextSize(result, cv2.FONT_HERSHEY_DUPLEX, scale, max(1, round(2 * scale)))[0][0]
    cv2.putText(
        image,
        score_text,
        (max(int(w * 0.3), 10 + word_width + 16), band - max(6, band // 4)),
        cv2.FONT_HERSHEY_SIMPLEX,
        text_scale,
        (255, 255, 255),
        1,
        cv2.LINE_AA,
    )
    _score_bar(image, band, score, threshold, colour)
    if fps is not None:
        _outlined_text(image, f"{fps:.1f} fps", (10, h - 10), text_scale)
    if status is not None:
        image = _with_status_strip(image, status)
    return image


def _score_bar(
    image: np.ndarray, top: int, score: float | None, threshold: float, colour: tuple[int, int, int]
) -> None:
    """Score against threshold: the bar spans 0 .. 2 x threshold, the threshold tick at mid-width."""
    h, w = image.shape[:2]
    rows = bar_height(h)
    cv2.rectangle(image, (0, top), (w - 1, top + rows - 1), BAR_BACKGROUND, thickness=cv2.FILLED)
    if score is not None and threshold > 0:
        filled = round(w * min(max(score / (2.0 * threshold), 0.0), 1.0))
        if filled:
            # Two rows of background on top keep the bar apart from a banner of the same colour.
            cv2.rectangle(image, (0, top + 2), (filled - 1, top + rows - 1), colour, thickness=cv2.FILLED)
    cv2.line(image, (w // 2, top), (w // 2, top + rows - 1), (255, 255, 255), 2)


def _with_status_strip(image: np.ndarray, status: StatusLine) -> np.ndarray:
    h, w = image.shape[:2]
    rows = status_height(h)
    strip = np.full((rows, w, 3), STATUS_BACKGROUND, np.uint8)
    text = (
        f"{status.station} | OK {status.ok}  NG {status.ng}"
        + (f"  UNDEF {status.undefined}" if status.undefined else "")
        + f" | camera {status.camera} | broker {status.broker}"
    )
    scale = rows / 36.0
    # Shrink the text until it fits the width: a long station name must not run off the screen.
    while scale > 0.3 and cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > w - 12:
        scale *= 0.9
    cv2.putText(
        strip, text, (6, rows - max(5, rows // 4)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA
    )
    return np.vstack([image, strip])


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
    """A HighGUI window; call `show` and `poll` from the main thread only."""

    def __init__(self, show_heatmap: bool = True, snapshot_dir: Path | None = None) -> None:
        self.show_heatmap = show_heatmap
        self.snapshot_dir = snapshot_dir
        self.fullscreen = False
        # GUI_NORMAL: no Qt zoom/save toolbar; an operator needs the picture, not tools.
        cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL | cv2.WINDOW_GUI_NORMAL)
        self._shown = False
        self._last: np.ndarray | None = None

    def show(self, image: np.ndarray) -> bool:
        """Show one image and handle keys; False when the operator asked to quit."""
        if not self._shown:
            # WINDOW_NORMAL windows may open at a toolkit default size; start at the image's.
            cv2.resizeWindow(WINDOW_NAME, image.shape[1], image.shape[0])
        cv2.imshow(WINDOW_NAME, image)
        self._shown = True
        self._last = image
        return self.poll()

    def poll(self) -> bool:
        """Handle keys and window events while nothing new is shown (trigger mode, a stalled camera)."""
        key = cv2.waitKey(1) & 0xFF
        if key == ord("h"):
            self.show_heatmap = not self.show_heatmap
            log.info("window: heatmap %s", "on" if self.show_heatmap else "off")
        elif key == ord("f"):
            self.fullscreen = not self.fullscreen
            # The window manager does the resizing: a bare X server (no manager) keeps the window's size.
            cv2.setWindowProperty(
                WINDOW_NAME, cv2.WND_PROP_FULLSCREEN, cv2.WINDOW_FULLSCREEN if self.fullscreen else cv2.WINDOW_NORMAL
            )
            log.info("window: fullscreen %s", "on" if self.fullscreen else "off")
        elif key == ord("s"):
            self.save_snapshot()
        elif key in (ord("q"), 27):
            return False
        if not self._shown:
            return True
        # The window's close button: HighGUI reports it as not visible any more.
        return cv2.getWindowProperty(WINDOW_NAME, cv2.WND_PROP_VISIBLE) >= 1

    def save_snapshot(self) -> Path | None:
        """Write the image on screen to <snapshot_dir>/<UTC time>.png (key s)."""
        if self._last is None or self.snapshot_dir is None:
            return None
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        path = self.snapshot_dir / f"{stamp}.png"
        if cv2.imwrite(str(path), self._last):
            log.info("saved the shown frame to %s", path)
            return path
        log.error("could not save the shown frame to %s", path)
        return None

    def close(self) -> None:
        cv2.destroyWindow(WINDOW_NAME)
        cv2.waitKey(1)
