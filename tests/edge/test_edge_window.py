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
from typing import Any

import cv2
import numpy as np
import pytest

from ganspect.edge.overlay import MIN_DISPLAY_WIDTH, NG_COLOUR, OK_COLOUR, STATUS_BACKGROUND, UNDEFINED_COLOUR

pytestmark = pytest.mark.needs_tools("Xvfb", "import")
SCREEN = (1024, 768)


@pytest.fixture
def xvfb() -> Iterator[str]:
    """A private X server; its DISPLAY string.

    `-displayfd` lets Xvfb pick a free display number itself and write it once it accepts
    connections: no race with another suite choosing "the first free number" at the same time.
    """
    read_end, write_end = os.pipe()
    server = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write_end), "-screen", "0", f"{SCREEN[0]}x{SCREEN[1]}x24", "-nolisten", "tcp"],
        pass_fds=(write_end,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_end)
    try:
        with os.fdopen(read_end) as announced:
            number = announced.readline().strip()  # blocks until the server is ready (or has exited)
        assert number.isdigit(), f"Xvfb did not start (exit code {server.poll()})"
        yield f":{number}"
    finally:
        server.terminate()
        server.wait(10)


def _screenshot(display: str, path: Path) -> np.ndarray:
    subprocess.run(
        ["import", "-display", display, "-window", "root", str(path)], check=True, timeout=30, capture_output=True
    )
    image = cv2.imread(str(path))
    assert image is not None and image.shape[:2] == (SCREEN[1], SCREEN[0])
    return image


def _window_tree(display: str) -> str:
    """The X server's windows, for a failure message (is the daemon's window there at all?)."""
    if shutil.which("xwininfo") is None:
        return "(xwininfo is not installed: apt-get install x11-utils)"
    found = subprocess.run(
        ["xwininfo", "-root", "-tree", "-display", display], capture_output=True, text=True, timeout=10
    )
    return found.stdout[-1500:] or found.stderr[-500:]


def _wait_for_screen(display: str, path: Path, shows: Any, timeout: float = 30.0) -> np.ndarray:
    """Screenshots until `shows(image)` holds (Qt maps the window a moment after the first frames, longer on
    a loaded machine), or the last one after `timeout`."""
    deadline = time.monotonic() + timeout
    shot = _screenshot(display, path)
    while not shows(shot) and time.monotonic() < deadline:
        time.sleep(0.2)
        shot = _screenshot(display, path)
    return shot


def _near(image: np.ndarray, colour: tuple[int, int, int], tolerance: int = 30) -> np.ndarray:
    return np.all(np.abs(image.astype(int) - np.array(colour)) <= tolerance, axis=-1)


def test_operator_window_shows_a_red_ng_banner_for_a_defective_part(
    xvfb, tiny_bundle, make_video, make_edge_config, tmp_path
):
    video = make_video(tmp_path / "defects.avi", [True] * 10)
    verdict_log = tmp_path / "v.jsonl"
    config = make_edge_config(tiny_bundle, video, None, display={"window": "on"}, source={"loop": True, "max_fps": 10})
    env = {**os.environ, "DISPLAY": xvfb, "WAYLAND_DISPLAY": "", "QT_QPA_PLATFORM": "xcb"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ganspect.edge", "edge", "--config", str(config), "--verdict-log", str(verdict_log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
            not verdict_log.exists() or len(verdict_log.read_text().splitlines()) < 8
        ):
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.1)
        shot = _wait_for_screen(
            xvfb, tmp_path / "screen.png", lambda image: _near(image, NG_COLOUR).sum() > MIN_DISPLAY_WIDTH * 30
        )
        shutil.copy(tmp_path / "screen.png", tmp_path.parent / "operator-window.png")  # to look at afterwards
        proc.send_signal(signal.SIGTERM)
        _stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert all(json.loads(line)["evaluation"]["state"] == "NG" for line in verdict_log.read_text().splitlines())

    red = _near(shot, NG_COLOUR)
    _rows, cols = np.nonzero(red)
    assert red.sum() > MIN_DISPLAY_WIDTH * 30, f"no red NG banner on the screen; windows: {_window_tree(xvfb)}"
    # The banner spans the window's width (480 px for a 64x48 frame scaled up), as one block.
    left, right = cols.min(), cols.max()
    assert right - left + 1 >= MIN_DISPLAY_WIDTH * 0.95
    banner_rows = np.nonzero(red[:, left : left + MIN_DISPLAY_WIDTH].mean(axis=1) > 0.5)[0]
    assert len(banner_rows) >= 36
    assert not _near(shot, OK_COLOUR).any(), "a green OK banner is shown for a defective part"
    # Below the picture: the dark status strip with white text (station, counts, camera, broker).
    strip = _near(shot[:, left : left + MIN_DISPLAY_WIDTH], STATUS_BACKGROUND, 4).mean(axis=1) > 0.6
    strip_rows = np.nonzero(strip)[0]
    assert len(strip_rows) >= 15 and strip_rows.min() > banner_rows.max() + 300
    text = shot[strip_rows.min() : strip_rows.max() + 1, left : left + MIN_DISPLAY_WIDTH]
    assert (text.min(axis=-1) > 200).sum() > 100


@pytest.mark.needs_tools("xdotool")
def test_operator_keys_toggle_the_heatmap_go_fullscreen_save_and_quit(
    xvfb, tiny_bundle, make_video, make_edge_config, tmp_path
):
    video = make_video(tmp_path / "defects.avi", [True] * 10)
    config = make_edge_config(tiny_bundle, video, None, display={"window": "on"}, source={"loop": True, "max_fps": 10})
    env = {**os.environ, "DISPLAY": xvfb, "WAYLAND_DISPLAY": "", "QT_QPA_PLATFORM": "xcb"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ganspect.edge", "edge", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )

    def key(name: str) -> None:
        found = subprocess.run(
            ["xdotool", "search", "--name", "ganspect"], env=env, capture_output=True, text=True, timeout=10
        )
        window = found.stdout.split()[0]
        subprocess.run(["xdotool", "windowfocus", "--sync", window], env=env, check=True, timeout=10)
        subprocess.run(["xdotool", "key", name], env=env, check=True, timeout=10)
        time.sleep(0.6)  # a few frames at 10 fps

    try:
        deadline = time.monotonic() + 30
        while (
            time.monotonic() < deadline
            and subprocess.run(["xdotool", "search", "--name", "ganspect"], env=env, capture_output=True).returncode
            != 0
        ):
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.2)
        before = _wait_for_screen(
            xvfb, tmp_path / "before.png", lambda image: _near(image, NG_COLOUR).sum() > MIN_DISPLAY_WIDTH * 30
        )
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


def test_a_camera_that_goes_silent_shows_the_grey_undefined_banner(
    xvfb, tiny_bundle, make_edge_config, mjpeg_camera, tmp_path
):
    camera = mjpeg_camera(fps=20.0)
    verdict_log = tmp_path / "v.jsonl"
    config = make_edge_config(
        tiny_bundle,
        camera.url,
        None,
        display={"window": "on"},
        source={"stale_after_s": 0.5, "read_timeout_s": 1.0, "max_fps": 10},
    )
    env = {**os.environ, "DISPLAY": xvfb, "WAYLAND_DISPLAY": "", "QT_QPA_PLATFORM": "xcb"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ganspect.edge", "edge", "--config", str(config), "--verdict-log", str(verdict_log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )

    def states() -> list[str]:
        if not verdict_log.exists():
            return []
        return [json.loads(line)["evaluation"]["state"] for line in verdict_log.read_text().splitlines()]

    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(states()) < 5:
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.1)
        ok_shot = _wait_for_screen(
            xvfb, tmp_path / "ok.png", lambda image: _near(image, OK_COLOUR).sum() > MIN_DISPLAY_WIDTH * 30
        )
        camera.paused.set()
        shot = _wait_for_screen(
            xvfb,
            tmp_path / "undefined.png",
            lambda image: _near(image[:36, :MIN_DISPLAY_WIDTH], UNDEFINED_COLOUR, 2).mean() > 0.6,
        )
        shutil.copy(tmp_path / "undefined.png", tmp_path.parent / "operator-window-undefined.png")
        proc.send_signal(signal.SIGTERM)
        _stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    # Good parts first: green.
    assert _near(ok_shot, OK_COLOUR).sum() > MIN_DISPLAY_WIDTH * 30, f"no green banner; windows: {_window_tree(xvfb)}"
    band = shot[:36, :MIN_DISPLAY_WIDTH]  # the banner's rows: exactly the grey of UNDEFINED
    assert _near(band, UNDEFINED_COLOUR, 2).mean() > 0.6
    assert not _near(shot, OK_COLOUR).any() and not _near(shot, NG_COLOUR).any()
