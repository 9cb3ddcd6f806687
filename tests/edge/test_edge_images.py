"""The NG image store: real JPEG files on disk, retention, and dropping (never blocking) when full."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import cv2
import numpy as np

from ganspect.edge.config import ImagesConfig
from ganspect.edge.images import ImageStore


def _noise(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_images_are_named_by_result_id_and_retention_keeps_the_newest(tmp_path):
    store = ImageStore(tmp_path, ImagesConfig(max_count=3, min_free_bytes=0))
    store.start()
    ids = [str(uuid.uuid4()) for _ in range(5)]
    paths = [store.offer(rid, "2026-01-02", lambda i=i: _noise(i)) for i, rid in enumerate(ids)]
    store.close()

    assert [p.name for p in paths] == [f"{rid}.jpg" for rid in ids]  # type: ignore[union-attr]
    assert {p.parent for p in paths} == {tmp_path / "images" / "2026-01-02"}  # type: ignore[union-attr]
    kept = sorted(p.name for p in (tmp_path / "images").rglob("*.jpg"))
    assert kept == sorted(f"{rid}.jpg" for rid in ids[2:])
    assert cv2.imread(str(paths[-1])).shape == (64, 64, 3)  # type: ignore[union-attr]
    stats = store.stats()
    assert (stats.saved, stats.deleted, stats.kept) == (5, 2, 3)
    assert not list((tmp_path / "images").rglob("*.part"))


def test_retention_by_bytes_and_by_age_including_what_an_earlier_run_left(tmp_path):
    old_day = tmp_path / "images" / "2025-01-01"
    old_day.mkdir(parents=True)
    old = old_day / "old.jpg"
    cv2.imwrite(str(old), _noise(0))
    forty_days_ago = time.time() - 40 * 86_400
    os.utime(old, (forty_days_ago, forty_days_ago))

    store = ImageStore(
        tmp_path, ImagesConfig(max_bytes=1024 * 1024, max_age_days=30, min_free_bytes=0, jpeg_quality=100)
    )
    store.start()
    for i in range(12):  # ~130 kB each at quality 100: noise does not compress
        store.offer(f"r{i}", "2026-01-02", lambda i=i: _noise(i, 256))
    store.close()

    assert not old.exists() and not old_day.exists()  # too old, and its emptied day folder is gone
    stats = store.stats()
    assert stats.kept_bytes <= 1024 * 1024 and stats.kept < 12
    on_disk = sum(p.stat().st_size for p in (tmp_path / "images").rglob("*.jpg"))
    assert on_disk == stats.kept_bytes
    assert (tmp_path / "images" / "2026-01-02" / "r11.jpg").exists()  # the newest stays


def test_a_nearly_full_disk_drops_images_and_counts_them(tmp_path):
    store = ImageStore(tmp_path, ImagesConfig(min_free_bytes=2**62))  # more than any disk has free
    store.start()
    assert store.offer("r1", "2026-01-02", lambda: _noise(1)) is None
    store.close()
    assert store.stats().dropped_disk_full == 1 and store.stats().saved == 0
    assert not list((tmp_path / "images").rglob("*.jpg"))


def test_a_writer_that_falls_behind_never_blocks_the_caller(tmp_path):
    store = ImageStore(tmp_path, ImagesConfig(queue_size=1, min_free_bytes=0))
    store.start()
    release = threading.Event()
    started = threading.Event()

    def slow_render() -> np.ndarray:
        started.set()
        release.wait(10)  # a disk that stalls
        return _noise(1)

    first = store.offer("r1", "d", slow_render)
    assert started.wait(5)  # the writer holds r1
    second = store.offer("r2", "d", lambda: _noise(2))  # waits in the queue
    t0 = time.monotonic()
    third = store.offer("r3", "d", lambda: _noise(3))  # no room: dropped at once
    waited = time.monotonic() - t0
    release.set()
    store.close()

    assert first is not None and second is not None and third is None
    assert waited < 5  # it returned instead of waiting for the stalled writer
    stats = store.stats()
    assert (stats.saved, stats.dropped_queue_full) == (2, 1)


def test_daemon_keeps_judging_when_the_disk_is_nearly_full(
    tiny_bundle, tiny_video, make_edge_config, ganspect_cli, tmp_path
):
    config = make_edge_config(tiny_bundle, tiny_video.path, None, images={"min_free_bytes": 2**62})
    verdict_log = tmp_path / "v.jsonl"

    proc = ganspect_cli("edge", "--config", str(config), "--headless", "--verdict-log", str(verdict_log))

    assert proc.returncode == 0, proc.stderr
    verdicts = [json.loads(line) for line in verdict_log.read_text(encoding="utf-8").splitlines()]
    assert [v["evaluation"]["state"] for v in verdicts] == tiny_video.expected
    assert all(v["image_path"] is None for v in verdicts)
    n_ng = tiny_video.expected.count("NG")
    assert f"images saved 0, dropped {n_ng}" in proc.stdout
    assert "below images.min_free_bytes: image not saved" in proc.stderr


def test_the_summary_counts_the_images_the_writer_finished_after_the_last_frame(
    tiny_bundle, make_video, make_edge_config, ganspect_cli, tmp_path
):
    # The last frames are NG: their images are still being written when the loop ends.
    video = make_video(tmp_path / "parts.avi", [False, True, True, True, True])
    config = make_edge_config(tiny_bundle, video, None)
    proc = ganspect_cli("edge", "--config", str(config), "--headless")
    assert proc.returncode == 0, proc.stderr
    assert "images saved 4, dropped 0" in proc.stdout, proc.stdout
    assert len(list((tmp_path / "edge-data" / "images").rglob("*.jpg"))) == 4
