"""Frame sources through OpenCV, and the capture thread that feeds the scoring loop.

Readers (`VideoSource`, `ImageFolderSource`) read one frame at a time. `Capture` runs a
reader on its own thread, so a slow or stuck camera never blocks scoring, and hands
frames to the loop under one of two delivery policies:

- `latest` (cameras, streams; any source in trigger mode): only the newest frame is
  kept; a frame the loop did not take before the next one arrived is dropped and
  counted as skipped. A file read under this policy is paced at its own frame rate,
  like the camera it stands in for.
- `every_frame` (video files and image folders in continuous mode): a short queue the
  capture thread waits on, so every frame is scored, in order, at the pace of scoring
  (or of `source.max_fps`). A file has no "now": its frames cannot go stale, and
  skipping some would make a recorded run unrepeatable.

Each frame carries its capture time twice: monotonic (for its age and for "captured
after the trigger") and UTC (for the verdict). A live source that stops delivering (read
failures, or no frame for `source.stale_after_s`) is released and reopened with back-off
(0.5 s doubling up to `source.reconnect_max_delay_s`); `Capture.state` says where it is:
`open`, `stalled`, `reconnecting`, `ended` or `stopped`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Protocol

import cv2
import numpy as np

from ganspect.edge.config import CameraConfig, SourceConfig, is_path_like_source
from ganspect.edge.errors import GanspectError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"})
# Frames a file source reads ahead of scoring under `every_frame`: enough to overlap a
# decode with a run, few enough that memory stays flat.
_READ_AHEAD = 2
_FIRST_RECONNECT_DELAY_S = 0.5
# A file read under `latest` without a usable frame rate in its header, nor max_fps.
_DEFAULT_FILE_FPS = 10.0

CaptureState = Literal["open", "stalled", "reconnecting", "ended", "stopped"]
Delivery = Literal["every_frame", "latest"]


class SourceError(GanspectError):
    """A source that cannot be opened or read."""


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # (H, W, 3) uint8, BGR
    index: int  # 0, 1, 2, ... per run, also across loops and reconnections
    captured_at: datetime  # UTC, when the frame was read
    captured_mono: float = 0.0  # time.monotonic() when the frame was read


class FrameReader(Protocol):
    """What `Capture` reads from: a video source or an image folder."""

    name: str
    live: bool  # a camera or stream: it has a "now", and frames it delivers late are stale

    @property
    def file_fps(self) -> float | None:
        """The frame rate a file says it was recorded at; None for live sources and folders."""
        ...

    def read(self) -> Frame | None:
        """The next frame, or None when there is none now (end of a file, a camera that gave nothing)."""
        ...

    def reopen(self) -> None: ...

    def close(self) -> None: ...


def _as_bgr(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def _stamp(image: np.ndarray, index: int) -> Frame:
    return Frame(image=image, index=index, captured_at=datetime.now(timezone.utc), captured_mono=time.monotonic())


def is_camera(uri: str) -> bool:
    return uri.isdigit() or uri.startswith("/dev/")


class VideoSource:
    """A cv2.VideoCapture over a camera index, device path, video file or stream URL."""

    def __init__(
        self, uri: str, name: str, loop: bool = False, timeout_s: float = 10.0, camera: CameraConfig | None = None
    ) -> None:
        self.uri = uri
        self.name = name
        self.live = not Path(uri).is_file()
        self._loop = loop and not self.live
        self._timeout_ms = int(timeout_s * 1000)
        self._camera = camera
        self._index = 0
        self._cap = self._open()

    @property
    def file_fps(self) -> float | None:
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        return fps if not self.live and 0 < fps < 1000 else None

    def _open(self) -> cv2.VideoCapture:
        target: int | str = int(self.uri) if self.uri.isdigit() else self.uri
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, self._timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, self._timeout_ms]
        camera = is_camera(self.uri)
        if camera and self._camera is not None:
            params += _camera_open_params(self._camera)
        # V4L2 directly for cameras: it honours MJPG, size, rate, exposure and gain; CAP_ANY might not.
        cap = cv2.VideoCapture(target, cv2.CAP_V4L2 if camera else cv2.CAP_ANY, params)
        if not cap.isOpened():
            cap.release()
            kind = "camera" if camera else "video source"
            raise SourceError(
                f"cannot open {kind} {self.uri!r} (OpenCV could not open it; check the path, "
                "the device permissions or the URL)"
            )
        if camera and self._camera is not None:
            _apply_camera_settings(cap, self._camera, self.uri)
        return cap

    def reopen(self) -> None:
        self._cap.release()
        self._cap = self._open()

    def read(self) -> Frame | None:
        ok, image = self._cap.read()
        if not ok and self._loop and self._index > 0:
            # End of a video file: start it again (demos, soak tests).
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, image = self._cap.read()
        if not ok or image is None:
            return None
        frame = _stamp(_as_bgr(image), self._index)
        self._index += 1
        return frame

    def close(self) -> None:
        self._cap.release()


def _camera_open_params(camera: CameraConfig) -> list[int]:
    """Format, size and rate as VideoCapture open parameters: V4L2 negotiates them before streaming starts."""
    params: list[int] = []
    if camera.fourcc:
        params += [cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*camera.fourcc)]
    if camera.width:
        params += [cv2.CAP_PROP_FRAME_WIDTH, camera.width]
    if camera.height:
        params += [cv2.CAP_PROP_FRAME_HEIGHT, camera.height]
    if camera.fps:
        params += [cv2.CAP_PROP_FPS, round(camera.fps)]
    return params


def _fourcc_text(value: float) -> str:
    code = int(value)
    return "".join(chr((code >> (8 * i)) & 0xFF) for i in range(4)).strip("\x00") or "?"


def _apply_camera_settings(cap: cv2.VideoCapture, camera: CameraConfig, uri: str) -> None:
    """Fixed exposure and gain, then log what the camera actually accepted (drivers round or ignore values)."""
    if camera.exposure is not None:
        # V4L2 through OpenCV: auto exposure 1 = manual, 3 = aperture priority (automatic).
        cap.set(cv2.CAP_PROP_AUTO_EXPOSURE, 1)
        cap.set(cv2.CAP_PROP_EXPOSURE, camera.exposure)
    if camera.gain is not None:
        cap.set(cv2.CAP_PROP_GAIN, camera.gain)
    if camera.buffer_size is not None:
        cap.set(cv2.CAP_PROP_BUFFERSIZE, camera.buffer_size)
    got = {
        "format": _fourcc_text(cap.get(cv2.CAP_PROP_FOURCC)),
        "size": f"{int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))}x{int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))}",
        "fps": f"{cap.get(cv2.CAP_PROP_FPS):g}",
        "auto exposure": f"{cap.get(cv2.CAP_PROP_AUTO_EXPOSURE):g}",
        "exposure": f"{cap.get(cv2.CAP_PROP_EXPOSURE):g}",
        "gain": f"{cap.get(cv2.CAP_PROP_GAIN):g}",
    }
    log.info("camera %s accepted: %s", uri, ", ".join(f"{k} {v}" for k, v in got.items()))
    wanted = {
        "format": camera.fourcc,
        "size": f"{camera.width}x{camera.height}" if camera.width and camera.height else None,
        "fps": f"{camera.fps:g}" if camera.fps else None,
    }
    for key, value in wanted.items():
        if value is not None and got[key] != value:
            log.warning("camera %s: asked for %s %s, it gives %s", uri, key, value, got[key])


class ImageFolderSource:
    """The images of a folder in name order, read with cv2.imread as BGR."""

    live = False
    file_fps = None

    def __init__(self, folder: Path, name: str, loop: bool = False) -> None:
        self.name = name
        self._loop = loop
        self._paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self._paths:
            raise SourceError(f"image folder {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self._next = 0
        self._index = 0

    def read(self) -> Frame | None:
        # At most one pass over the folder per call, so a folder of unreadable files ends.
        for _ in range(len(self._paths)):
            if self._next >= len(self._paths):
                if not self._loop:
                    return None
                self._next = 0
            path = self._paths[self._next]
            self._next += 1
            try:
                image = cv2.imread(str(path), cv2.IMREAD_COLOR)
                why = "OpenCV cannot read it as an image"
            except cv2.error as exc:  # e.g. a header claiming more pixels than OpenCV will allocate
                image, why = None, f"OpenCV refused it ({str(exc).strip().splitlines()[-1]})"
            if image is not None:
                frame = _stamp(image, self._index)
                self._index += 1
                return frame
            # One unreadable file should not stop the line; say which one.
            log.warning("skipping %s: %s", path, why)
        return None

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass


def default_name(uri: str) -> str:
    """A short, topic-safe name for part ids: file stem, folder name, cam<N> or the host."""
    if uri.isdigit():
        name = f"cam{uri}"
    elif is_path_like_source(uri):
        name = Path(uri).stem or "source"
    else:
        name = uri.split("://", 1)[1].split("/", 1)[0].split("@")[-1]
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in name) or "source"


def open_source(config: SourceConfig) -> FrameReader:
    """Open the configured source (paths already resolved); raise SourceError when it cannot be opened."""
    uri = config.uri
    name = config.name or default_name(uri)
    if is_path_like_source(uri):
        path = Path(uri)
        if path.is_dir():
            return ImageFolderSource(path, name, loop=config.loop)
        if not path.exists():
            raise SourceError(f"source {uri} does not exist (expected a video file, an image folder or a device)")
    return VideoSource(uri, name, loop=config.loop, timeout_s=config.read_timeout_s, camera=config.camera)


@dataclass(frozen=True)
class CaptureStats:
    state: CaptureState
    captured: int  # frames read from the source
    skipped: int  # frames replaced by a newer one before the loop took them (policy `latest`)
    reconnects: int  # times the source was reopened
    last_frame_age_s: float | None  # None before the first frame


class Capture:
    """Reads a source on its own thread; `get` hands frames to the scoring loop (see the module docstring)."""

    def __init__(
        self,
        reader: FrameReader,
        config: SourceConfig,
        delivery: Delivery,
        stop: threading.Event,
        on_frame: Callable[[Frame], None] | None = None,
    ) -> None:
        self.reader = reader
        # Called on the capture thread with every frame as it is read (trigger mode binds triggers to frames there).
        self._on_frame = on_frame
        self.name = reader.name
        self.delivery = delivery
        self._config = config
        self._stop = stop
        self._frames: deque[Frame] = deque()
        self._cond = threading.Condition()
        self._state: CaptureState = "open"
        self._captured = 0
        self._skipped = 0
        self._reconnects = 0
        self._last_mono: float | None = None
        # Live sources come at their own pace. Under `every_frame` the loop sets the pace (the
        # capture waits for it); under `latest` a file is paced to behave like a camera.
        pace = (
            None
            if delivery == "every_frame" or reader.live
            else (reader.file_fps or config.max_fps or _DEFAULT_FILE_FPS)
        )
        self._interval = 1.0 / pace if pace else 0.0
        self._thread = threading.Thread(target=self._run, name="ganspect-capture", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def live(self) -> bool:
        return self.reader.live

    @property
    def state(self) -> CaptureState:
        with self._cond:
            state = self._state
            last = self._last_mono
        if state == "open" and self.live and last is not None and time.monotonic() - last > self._config.stale_after_s:
            return "stalled"
        return state

    def stats(self) -> CaptureStats:
        with self._cond:
            last = self._last_mono
            captured, skipped, reconnects = self._captured, self._skipped, self._reconnects
        return CaptureStats(
            state=self.state,
            captured=captured,
            skipped=skipped,
            reconnects=reconnects,
            last_frame_age_s=None if last is None else time.monotonic() - last,
        )

    @property
    def ended(self) -> bool:
        """The source has ended (a file without loop) and every frame it gave was taken."""
        with self._cond:
            return self._state in ("ended", "stopped") and not self._frames

    def get(self, timeout: float) -> Frame | None:
        """The next frame (the oldest waiting; under `latest` the only one), or None after `timeout` s or at the end."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._frames:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._state in ("ended", "stopped") or self._stop.is_set():
                    return None
                self._cond.wait(min(remaining, 0.1))
            frame = self._frames.popleft()
            self._cond.notify_all()  # room for the capture thread under `every_frame`
            return frame

    def close(self) -> None:
        """Join the capture thread (the stop event or the end of the source ends it), then release the source."""
        with self._cond:
            if self._state not in ("ended",):
                self._state = "stopped"
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=max(5.0, self._config.read_timeout_s + 1.0))
        self.reader.close()

    # -- the capture thread -------------------------------------------------------------
    def _run(self) -> None:
        next_due = time.monotonic()
        failures = 0
        while not self._should_stop():
            if self._interval:
                self._stop.wait(max(0.0, next_due - time.monotonic()))
                next_due = max(next_due + self._interval, time.monotonic())
                if self._should_stop():
                    break
            try:
                frame = self.reader.read()
            except cv2.error as exc:  # a driver error is a failed read, not the end of the daemon
                log.warning("reading %s failed: %s", self.name, str(exc).strip().splitlines()[-1])
                frame = None
            if frame is None:
                if not self.reader.live:
                    self._set_state("ended")
                    log.info("source %s ended after %d frame(s)", self.name, self._captured)
                    return
                failures += 1
                self._reconnect(failures)
                continue
            failures = 0
            self._put(frame)

    def _should_stop(self) -> bool:
        with self._cond:
            return self._stop.is_set() or self._state == "stopped"

    def _set_state(self, state: CaptureState) -> None:
        with self._cond:
            if self._state != "stopped":
                self._state = state
            self._cond.notify_all()

    def _put(self, frame: Frame) -> None:
        with self._cond:
            if self.delivery == "every_frame":
                while len(self._frames) >= _READ_AHEAD and self._state != "stopped" and not self._stop.is_set():
                    self._cond.wait(0.1)
            elif self._frames:
                self._frames.clear()
                self._skipped += 1
            self._frames.append(frame)
            self._captured += 1
            self._last_mono = frame.captured_mono
            if self._state == "reconnecting":
                log.warning("source %s is back: frames arrive again", self.name)
            if self._state != "stopped":
                self._state = "open"
            self._cond.notify_all()
        if self._on_frame is not None:
            self._on_frame(frame)

    def _reconnect(self, failures: int) -> None:
        """Release and reopen a live source, waiting 0.5 s, 1 s, 2 s, ... up to reconnect_max_delay_s between tries."""
        self._set_state("reconnecting")
        # A source that reopens but still gives nothing keeps backing off: the delay grows with `failures` too.
        delay = min(_FIRST_RECONNECT_DELAY_S * 2 ** min(failures - 1, 16), self._config.reconnect_max_delay_s)
        attempt = 0
        if failures == 1:
            log.warning("source %s stopped delivering frames: reopening it (state reconnecting)", self.name)
        while not self._should_stop():
            if self._stop.wait(delay):
                return
            attempt += 1
            try:
                self.reader.reopen()
            except SourceError as exc:
                if attempt == 1 or attempt % 10 == 0:
                    log.warning(
                        "source %s: reopen attempt %d failed (%s); next try in %.1f s",
                        self.name,
                        attempt,
                        exc,
                        min(delay * 2, self._config.reconnect_max_delay_s),
                    )
                delay = min(delay * 2, self._config.reconnect_max_delay_s)
                continue
            with self._cond:
                self._reconnects += 1
            log.info("source %s reopened after %d attempt(s)", self.name, attempt)
            return


def delivery_for(config: SourceConfig, reader: FrameReader, continuous: bool) -> Delivery:
    """`source.delivery`, with auto resolved: every frame of a file in continuous mode, else the latest."""
    if config.delivery != "auto":
        return config.delivery
    return "every_frame" if continuous and not reader.live else "latest"
