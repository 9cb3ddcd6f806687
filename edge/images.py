"""The NG image store: frames with their heatmap overlay as JPEG, named by verdict id, with retention.

The scoring loop only decides and enqueues (`offer`); a writer thread renders the overlay,
encodes and writes, then enforces retention (count, bytes, age). The queue is bounded:
when the writer falls behind, or the disk has less than `images.min_free_bytes` free,
the image is dropped and counted, and the verdict says `image_path: null`. Verdicts never
wait for an image.

Images give way to the verdict outbox: while free space is below `images.min_free_bytes`
(or the outbox finds the disk full and asks, `make_room`), the writer deletes the oldest
images until it is back above, or none is left. On a disk short of space the newest images
are kept in what is left above the limit.

Files: `<data.dir>/images/<YYYY-MM-DD>/<result_id>.jpg` (UTC date of capture), so the
MES can fetch the image of a verdict by its id.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ganspect.edge.config import ImagesConfig
from ganspect.edge.errors import GanspectError

log = logging.getLogger(__name__)

IMAGES_FOLDER = "images"
_FREE_SPACE_CHECK_S = 1.0  # statvfs at most once a second
_FAILURE_LOG_INTERVAL_S = 10.0  # a read-only disk fails every image: one line per interval, with the count
_MAKE_ROOM = None  # the writer's queue: free space now (see make_room)
_STOP = "stop"


@dataclass(frozen=True)
class ImageJob:
    path: Path
    render: Callable[[], np.ndarray]  # draws the overlay on the writer thread: the loop does not wait for it


@dataclass(frozen=True)
class StoreStats:
    saved: int
    dropped_queue_full: int
    dropped_disk_full: int
    failed: int
    deleted: int
    kept: int
    kept_bytes: int


class ImageStore:
    def __init__(self, root: Path, config: ImagesConfig) -> None:
        self.root = root / IMAGES_FOLDER
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GanspectError(f"cannot create the image folder {self.root}: {exc.strerror or exc}") from exc
        self._config = config
        self._queue: queue.Queue[ImageJob | str | None] = queue.Queue(maxsize=config.queue_size)
        self._room_asked = threading.Event()  # a make-room request waits in the queue
        self._last_room_log = float("-inf")
        self._lock = threading.Lock()
        self._saved = self._dropped_full = self._dropped_disk = self._failed = self._deleted = 0
        self._last_failure_logged = float("-inf")
        self._ok_seen = 0
        self._free_checked = float("-inf")
        self._free_bytes = 0
        # (mtime, path, size), oldest first: what retention deletes from.
        self._kept: deque[tuple[float, Path, int]] = deque(
            sorted((p.stat().st_mtime, p, p.stat().st_size) for p in self.root.glob("*/*.jpg"))
        )
        self._kept_bytes = sum(size for _, _, size in self._kept)
        self._thread = threading.Thread(target=self._run, name="ganspect-image-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wanted(self, state: str) -> bool:
        """Whether a result in `state` has its image saved (NG, UNDEFINED if asked, every Nth OK if asked)."""
        save = self._config.save
        if state == "NG":
            return save != "none"
        if state == "UNDEFINED":
            return save == "ng_and_undefined"
        self._ok_seen += 1
        every = self._config.ok_sample_every
        return bool(every) and self._ok_seen % every == 0

    def free_bytes(self) -> int:
        now = time.monotonic()
        if now - self._free_checked >= _FREE_SPACE_CHECK_S:
            self._free_bytes = shutil.disk_usage(self.root).free
            self._free_checked = now
        return self._free_bytes

    def make_room(self) -> None:
        """Ask the writer to delete the oldest images until free space is above images.min_free_bytes; no wait."""
        if self._room_asked.is_set():
            return
        self._room_asked.set()
        try:
            self._queue.put_nowait(_MAKE_ROOM)
        except queue.Full:
            self._room_asked.clear()  # the writer is busy with images; it frees space after each one anyway

    def offer(self, result_id: str, day: str, render: Callable[[], np.ndarray]) -> Path | None:
        """Queue an image for `result_id`; its future path, or None when it was dropped (disk or queue full)."""
        if self.free_bytes() < self._config.min_free_bytes:
            self.make_room()
            with self._lock:
                self._dropped_disk += 1
                first = self._dropped_disk == 1
            if first or self._dropped_disk % 100 == 0:
                log.error(
                    "images: disk %s has %d MB free, below images.min_free_bytes: image not saved "
                    "(%d dropped so far); verdicts still flow",
                    self.root,
                    self._free_bytes // 2**20,
                    self._dropped_disk,
                )
            return None
        path = self.root / day / f"{result_id}.jpg"
        try:
            self._queue.put_nowait(ImageJob(path, render))
        except queue.Full:
            with self._lock:
                self._dropped_full += 1
                count = self._dropped_full
            if count == 1 or count % 100 == 0:
                log.warning(
                    "images: the writer is behind (%d waiting): image not saved (%d dropped so far)",
                    self._config.queue_size,
                    count,
                )
            return None
        return path

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(
                saved=self._saved,
                dropped_queue_full=self._dropped_full,
                dropped_disk_full=self._dropped_disk,
                failed=self._failed,
                deleted=self._deleted,
                kept=len(self._kept),
                kept_bytes=self._kept_bytes,
            )

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout=30)

    # -- the writer thread ----------------------------------------------------------------
    def _run(self) -> None:
        self._enforce_retention()  # what an earlier run left may already be over the limits
        self.free_space()
        while True:
            job = self._queue.get()
            if job == _STOP:
                return
            if job is _MAKE_ROOM:
                self._room_asked.clear()
                self.free_space()
                continue
            assert isinstance(job, ImageJob)
            try:
                self._write(job)
            except OSError as exc:  # a full or read-only disk: expected on a station, so no traceback
                with self._lock:
                    self._failed += 1
                    failed = self._failed
                now = time.monotonic()
                if now - self._last_failure_logged >= _FAILURE_LOG_INTERVAL_S:
                    self._last_failure_logged = now
                    log.error(
                        "images: cannot write %s: %s (image dropped, %d so far; verdicts still flow)",
                        job.path,
                        exc.strerror or exc,
                        failed,
                    )
            except Exception:
                with self._lock:
                    self._failed += 1
                log.exception("images: writing %s failed", job.path)

    def _write(self, job: ImageJob) -> None:
        image = job.render()
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self._config.jpeg_quality])
        if not ok:
            raise OSError("OpenCV could not encode the image as JPEG")
        job.path.parent.mkdir(parents=True, exist_ok=True)
        partial = job.path.with_suffix(".jpg.part")
        try:
            partial.write_bytes(data.tobytes())
        except OSError:
            partial.unlink(missing_ok=True)  # half an image on a full disk holds the space the outbox needs
            raise
        partial.replace(job.path)  # a reader never sees half an image
        with self._lock:
            self._saved += 1
            self._kept.append((time.time(), job.path, len(data)))
            self._kept_bytes += len(data)
        self._enforce_retention()
        self.free_space()

    def free_space(self) -> None:
        """Delete the oldest images while the disk has less than images.min_free_bytes free."""
        wanted = self._config.min_free_bytes
        deleted = freed = 0
        try:
            while shutil.disk_usage(self.root).free < wanted:
                with self._lock:
                    if not self._kept:
                        break
                    _, path, size = self._kept.popleft()
                    self._kept_bytes -= size
                    self._deleted += 1
                self._delete(path)
                deleted += 1
                freed += size
        except OSError as exc:
            log.error("images: freeing space in %s failed: %s", self.root, exc.strerror or exc)
        self._free_checked = float("-inf")  # offer() looks again
        now = time.monotonic()
        if deleted and now - self._last_room_log >= _FAILURE_LOG_INTERVAL_S:
            self._last_room_log = now
            log.warning(
                "images: the disk %s had less than images.min_free_bytes free: deleted the %d oldest image(s) "
                "(%d kB) to make room for the verdict outbox",
                self.root,
                deleted,
                freed // 1024,
            )

    def _delete(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        if path.parent != self.root and not any(path.parent.iterdir()):
            path.parent.rmdir()  # an emptied day folder

    def _enforce_retention(self) -> None:
        config = self._config
        oldest_allowed = time.time() - config.max_age_days * 86_400
        while True:
            with self._lock:
                if not self._kept:
                    return
                mtime, path, size = self._kept[0]
                if not (
                    len(self._kept) > config.max_count or self._kept_bytes > config.max_bytes or mtime < oldest_allowed
                ):
                    return
                self._kept.popleft()
                self._kept_bytes -= size
                self._deleted += 1
            self._delete(path)
