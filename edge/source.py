"""Frame sources through OpenCV: camera index or device, video file, stream URL, image folder.

`FrameSource.read()` returns the next `Frame` or None at the end. This first version
reads sequentially on the caller's thread; the capture thread that keeps only the
latest frame and reopens a lost camera will wrap the same interface.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from ganspect.edge.config import SourceConfig, is_path_like_source
from ganspect.edge.errors import GanspectError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"})
# Stream and camera opens must not hang the daemon forever.
_OPEN_TIMEOUT_MS = 10_000


class SourceError(GanspectError):
    """A source that cannot be opened or read."""


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # (H, W, 3) uint8, BGR
    index: int  # 0, 1, 2, ... per run, also across loops
    captured_at: datetime  # UTC, when the frame was read


class FrameSource(Protocol):
    name: str

    def read(self) -> Frame | None: ...

    def close(self) -> None: ...


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _as_bgr(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


class VideoSource:
    """A cv2.VideoCapture over a camera index, device path, video file or stream URL."""

    def __init__(self, uri: str, name: str, loop: bool = False) -> None:
        self.uri = uri
        self.name = name
        self._loop = loop and Path(uri).is_file()
        self._index = 0
        self._cap = self._open()

    def _open(self) -> cv2.VideoCapture:
        target: int | str = int(self.uri) if self.uri.isdigit() else self.uri
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, _OPEN_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, _OPEN_TIMEOUT_MS]
        cap = cv2.VideoCapture(target, cv2.CAP_ANY, params)
        if not cap.isOpened():
            cap.release()
            kind = "camera" if isinstance(target, int) or self.uri.startswith("/dev/") else "video source"
            raise SourceError(f"cannot open {kind} {self.uri!r} (OpenCV could not open it; check the path, "
                              "the device permissions or the URL)")
        return cap

    def read(self) -> Frame | None:
        ok, image = self._cap.read()
        if not ok and self._loop and self._index > 0:
            # End of a video file: start it again (demos, soak tests).
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, image = self._cap.read()
        if not ok or image is None:
            return None
        frame = Frame(image=_as_bgr(image), index=self._index, captured_at=_now())
        self._index += 1
        return frame

    def close(self) -> None:
        self._cap.release()


class ImageFolderSource:
    """The images of a folder in name order, read with cv2.imread as BGR."""

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
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is not None:
                frame = Frame(image=image, index=self._index, captured_at=_now())
                self._index += 1
                return frame
            # One unreadable file should not stop the line; say which one.
            log.warning("skipping %s: OpenCV cannot read it as an image", path)
        return None

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


def open_source(config: SourceConfig) -> FrameSource:
    """Open the configured source (paths already resolved); raise SourceError when it cannot be opened."""
    uri = config.uri
    name = config.name or default_name(uri)
    if is_path_like_source(uri):
        path = Path(uri)
        if path.is_dir():
            return ImageFolderSource(path, name, loop=config.loop)
        if not path.exists():
            raise SourceError(f"source {uri} does not exist (expected a video file, an image folder or a device)")
    return VideoSource(uri, name, loop=config.loop)
