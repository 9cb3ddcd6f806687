"""The operator window for real: the daemon draws with OpenCV HighGUI on an Xvfb server, and a screenshot
of the X screen (ImageMagick's `import`) shows the red NG banner, the score bar and the status strip."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from ganspect.edge.overlay import MIN_DISPLAY_WIDTH, NG_COLOUR, OK_COLOUR, STATUS_BACKGROUND

pytestmark = pytest.mark.skipif(shutil.which("Xvfb") is None or shutil.which("import") is None,
                                reason="needs Xvfb and ImageMagick's import (.ci/run installs xvfb and imagemagick)")
SCREEN = (1024, 768)


def _free_display_number() -> int:
    return next(n for n in range(100, 300) if not Path(f"/tmp/.X11-unix/X{n}").exists()
                and not Path(f"/tmp/.X{n}-lock").exists())


@pytest.fixture
def xvfb() -> Iterator[str]:
    """A private X server on a free display number; its DISPLAY string."""
    number = _free_display_number()
    server = subprocess.Popen(["Xvfb", f":{number}", "-screen", "0", f"{SCREEN[0]}x{SCREEN[1]}x24", "-nolisten",
                               "tcp"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not Path(f"/tmp/.X11-unix/X{number}").exists():
            assert server.poll() is None and time.monotonic() < deadline, "Xvfb did not start"
            time.sleep(0.05)
        yield f":{number}"
    finally:
        server.terminate()
        server.wait(10)


def _screenshot(display: str, path: Path) -> np.ndarray:
    subprocess.run(["import", "-display", display, "-window", "root", str(path)], check=True, timeout=30,
                   capture_output=True)
    image = cv2.imread(str(path))
    assert image is not None and image.shape[:2] == (SCREEN[1], SCREEN[0])
    return image


def _near(image: np.ndarray, colour: tuple[int, int, int], tolerance: int = 30) -> np.ndarray:
    return np.all(np.abs(image.astype(int) - np.array(colour)) <= tolerance, axis=-1)


def test_operator_window_shows_a_red_ng_banner_for_a_defective_part(
        xvfb, tiny_bundle, make_video, make_edge_config, tmp_path):
    video = make_video(tmp_path / "defects.avi", [True] * 10)
    verdict_log = tmp_path / "v.jsonl"
    config = make_edge_config(tiny_bundle, video, None, display={"window": "on"},
                              source={"loop": True, "max_fps": 10})
    env = {**os.environ, "DISPLAY": xvfb, "WAYLAND_DISPLAY": "", "QT_QPA_PLATFORM": "xcb"}
    proc = subprocess.Popen([sys.executable, "-m", "ganspect.edge", "edge", "--config", str(config),
                             "--verdict-log", str(verdict_log)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not verdict_log.exists()
                                               or len(verdict_log.read_text().splitlines()) < 8):
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.1)
        time.sleep(0.5)  # a few more frames drawn
        shot = _screenshot(xvfb, tmp_path / "screen.png")
        shutil.copy(tmp_path / "screen.png", tmp_path.parent / "operator-window.png")  # to look at afterwards
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert all(json.loads(line)["evaluation"]["state"] == "NG" for line in verdict_log.read_text().splitlines())

    red = _near(shot, NG_COLOUR)
    rows, cols = np.nonzero(red)
    assert red.sum() > MIN_DISPLAY_WIDTH * 30, "no red NG banner on the screen"
    # The banner spans the window's width (480 px for a 64x48 frame scaled up), as one block.
    left, right = cols.min(), cols.max()
    assert right - left + 1 >= MIN_DISPLAY_WIDTH * 0.95
    banner_rows = np.nonzero(red[:, left: left + MIN_DISPLAY_WIDTH].mean(axis=1) > 0.5)[0]
    assert len(banner_rows) >= 36
    assert not _near(shot, OK_COLOUR).any(), "a green OK banner is shown for a defective part"
    # Below the picture: the dark status strip with white text (station, counts, camera, broker).
    strip = _near(shot[:, left: left + MIN_DISPLAY_WIDTH], STATUS_BACKGROUND, 4).mean(axis=1) > 0.6
    strip_rows = np.nonzero(strip)[0]
    assert len(strip_rows) >= 15 and strip_rows.min() > banner_rows.max() + 300
    text = shot[strip_rows.min(): strip_rows.max() + 1, left: left + MIN_DISPLAY_WIDTH]
    assert (text.min(axis=-1) > 200).sum() > 100


@pytest.mark.skipif(shutil.which("xdotool") is None, reason="needs xdotool (.ci/run installs it)")
def test_operator_keys_toggle_the_heatmap_go_fullscreen_save_and_quit(
        xvfb, tiny_bundle, make_video, make_edge_config, tmp_path):
    video = make_video(tmp_path / "defects.avi", [True] * 10)
    config = make_edge_config(tiny_bundle, video, None, display={"window": "on"},
                              source={"loop": True, "max_fps": 10})
    env = {**os.environ, "DISPLAY": xvfb, "WAYLAND_DISPLAY": "", "QT_QPA_PLATFORM": "xcb"}
    proc = subprocess.Popen([sys.executable, "-m", "ganspect.edge", "edge", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def key(name: str) -> None:
        found = subprocess.run(["xdotool", "search", "--name", "ganspect"], env=env, capture_output=True, text=True,
                               timeout=10)
        window = found.stdout.split()[0]
        subprocess.run(["xdotool", "windowfocus", "--sync", window], env=env, check=True, timeout=10)
        subprocess.run(["xdotool", "key", name], env=env, check=True, timeout=10)
        time.sleep(0.6)  # a few frames at 10 fps

    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and subprocess.run(
                ["xdotool", "search", "--name", "ganspect"], env=env, capture_output=True).returncode != 0:
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.2)
        time.sleep(1.0)
        before = _screenshot(xvfb, tmp_path / "before.png")
        # The part's patch, below the banner and bar: heatmap-blended (reddish) before `h`, the raw patch after.
        patch = (slice(150, 250), slice(150, 330))
        key("h")
        after_h = _screenshot(xvfb, tmp_path / "after_h.png")
        blended, raw = before[patch].astype(int), after_h[patch].astype(int)
        assert np.abs(raw[..., 2] - raw[..., 0]).mean() < 10  # grey-scale part: no colour left
        assert np.abs(blended[..., 2] - blended[..., 0]).mean() > 20  # the heatmap's colour
        key("s")
        snapshots = list((tmp_path / "edge-data" / "snapshots").glob("*.png"))
        assert len(snapshots) == 1 and cv2.imread(str(snapshots[0])) is not None
        # Fullscreen is the window manager's job, and Xvfb runs none: the request is all that can be seen here.
        key("f")
        key("q")
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "stopped by signal or quit key" in stdout and "Traceback" not in stderr
    assert "window: heatmap off" in stderr and "window: fullscreen on" in stderr
    assert f"saved the shown frame to {snapshots[0]}" in stderr
