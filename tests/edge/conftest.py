"""Fixtures of the edge tests: a live camera stand-in that OpenCV reads over HTTP like an IP camera."""

from __future__ import annotations

import http.server
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import cv2
import numpy as np
import pytest


class MjpegCamera:
    """A real HTTP MJPEG stream (multipart/x-mixed-replace), as IP cameras serve it, read by OpenCV's FFmpeg.

    `pause()` makes it go silent: open connections stop receiving frames and new ones are
    refused with 503 (a camera that hangs, then reboots); `resume()` brings it back.
    Frame i is NG when ng_every and i % ng_every == 0.
    """

    def __init__(self, make_image: Callable[..., np.ndarray], fps: float = 20.0, ng_every: int = 0) -> None:
        self.fps = fps
        self.ng_every = ng_every
        self.paused = threading.Event()
        self.sent = 0
        camera = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if camera.paused.is_set():
                    self.send_error(503)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    while not camera.paused.is_set():
                        i = camera.sent
                        ng = bool(camera.ng_every) and i % camera.ng_every == 0
                        _ok, jpg = cv2.imencode(".jpg", make_image(ng, i), [cv2.IMWRITE_JPEG_QUALITY, 95])
                        self.wfile.write(
                            b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg)
                            + jpg.tobytes()
                            + b"\r\n"
                        )
                        camera.sent += 1
                        time.sleep(1.0 / camera.fps)
                    while camera.paused.is_set():  # hold the connection open, sending nothing
                        time.sleep(0.05)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/stream.mjpg"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.paused.clear()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mjpeg_camera(make_part_image: Callable[..., np.ndarray]) -> Iterator[Any]:
    """Factory: mjpeg_camera(fps=20.0, ng_every=0) -> a running MjpegCamera (closed at teardown)."""
    cameras: list[MjpegCamera] = []

    def make(**kwargs: Any) -> MjpegCamera:
        camera = MjpegCamera(make_part_image, **kwargs)
        cameras.append(camera)
        return camera

    yield make
    for camera in cameras:
        camera.close()
