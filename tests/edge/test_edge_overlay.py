"""The overlay drawing as a pure function: banner colours, heatmap blend, size."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from ganspect.edge.overlay import MIN_DISPLAY_WIDTH, banner_height, display_available, render_overlay


def _banner(image: np.ndarray) -> np.ndarray:
    return image[: banner_height(image.shape[0])].reshape(-1, 3).astype(int)  # (pixels, BGR)


def _share(pixels: np.ndarray, channel: int) -> float:
    """Fraction of pixels where `channel` clearly dominates the other two."""
    others = [c for c in range(3) if c != channel]
    return float(np.mean((pixels[:, channel] > 150) & (pixels[:, others].max(axis=1) < 60)))


def test_ng_banner_is_red_and_ok_banner_is_green(make_part_image):
    frame = make_part_image(False, 0)  # (48, 64, 3)
    heatmap = np.zeros((32, 32), np.float32)
    ng = render_overlay(frame, heatmap, "NG", 0.31, 0.15, fps=12.5)
    ok = render_overlay(frame, heatmap, "OK", 0.02, 0.15, fps=12.5)
    assert _share(_banner(ng), channel=2) > 0.6 and _share(_banner(ng), channel=1) == 0.0
    assert _share(_banner(ok), channel=1) > 0.6 and _share(_banner(ok), channel=2) == 0.0
    undefined = _banner(render_overlay(frame, heatmap, "UNDEFINED", None, 0.15))
    assert _share(undefined, channel=1) == 0.0 and _share(undefined, channel=2) == 0.0
    assert np.mean(np.ptp(undefined, axis=1) < 10) > 0.6  # grey: the three channels agree
    # Small frames are scaled up so the text is legible; the frame itself is not modified.
    assert ng.shape == (48 * MIN_DISPLAY_WIDTH // 64, MIN_DISPLAY_WIDTH, 3) and ng.dtype == np.uint8
    assert np.array_equal(frame, make_part_image(False, 0))


def test_heatmap_blend_marks_the_hot_region_and_can_be_toggled():
    frame = np.full((480, 640, 3), 128, np.uint8)
    heatmap = np.full((32, 32), 0.5, np.float32)  # half the largest normal residual
    heatmap[24:, 24:] = 2.0  # bottom-right corner: "clearly abnormal" (clipped top of the colour map)
    shown = render_overlay(frame, heatmap, "NG", 0.4, 0.15, show_heatmap=True)
    hidden = render_overlay(frame, heatmap, "NG", 0.4, 0.15, show_heatmap=False)
    hot = shown[440:470, 560:630].reshape(-1, 3).astype(int)  # inside the hot corner, below the text
    cold = shown[250:300, 50:150].reshape(-1, 3).astype(int)
    assert hot[:, 2].mean() > hot[:, 0].mean() + 40  # JET top is red
    assert cold[:, 0].mean() > cold[:, 2].mean() + 20  # JET's lower half is blue, lightly blended
    assert np.abs(cold - 128).max() < np.abs(hot - 128).max()  # the part shows through where heat is low
    assert np.array_equal(hidden[250:300, 50:150], frame[250:300, 50:150])


def _free_display_number() -> int:
    return next(n for n in range(90, 200) if not Path(f"/tmp/.X11-unix/X{n}").exists())


@pytest.mark.parametrize("display", ["", "garbage", ":{n}", "unix:{n}.0", "127.0.0.1:{n}.0"])
def test_a_display_that_does_not_answer_is_not_available(monkeypatch, display):
    # Qt aborts the process on a display it cannot reach; the daemon must see that first.
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setenv("DISPLAY", display.format(n=_free_display_number()))

    assert display_available() is False


@pytest.mark.needs_tools("Xvfb")
def test_a_running_x_server_is_available(monkeypatch):
    number = _free_display_number()
    server = subprocess.Popen(
        ["Xvfb", f":{number}", "-screen", "0", "320x240x24"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while not Path(f"/tmp/.X11-unix/X{number}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
        monkeypatch.setenv("DISPLAY", f":{number}")
        assert display_available() is True
    finally:
        server.terminate()
        server.wait(10)
