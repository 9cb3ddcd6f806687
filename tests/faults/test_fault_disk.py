"""The data folder fills up or turns read-only under a running daemon: inspection goes on, nothing stored is lost.

The data folder is a real small filesystem (a 4 MiB tmpfs mounted by the test, so it needs root;
as root a mount that fails is a failure, not a skip), filled up while the daemon runs, or mounted
read-only before it starts. What the daemon does on a full disk (docs/reliability.md): NG images
give way first (the oldest are deleted while free space is below `images.min_free_bytes`); a
verdict the outbox still has no room for is UNDEFINED ("data disk full") and sent unstored while
the broker is online; the daemon keeps judging, and is back to stored OK/NG verdicts by itself
once space returns. Every verdict the outbox took reaches the broker.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BASE_TOPIC = "gstest/testsite/l1/s1"
DISK_FULL = "data disk full"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="mounts a 4 MiB tmpfs as the data folder, which needs root (CI runs the suite as root)"
)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "data"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.fail(
            f"cannot mount a 4 MiB tmpfs on {folder} (needed for the full-disk tests): {mounted.stderr.strip()}"
        )
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n")[:-1]]


def _fill(path: Path) -> None:
    """Write zeros into `path` until the filesystem says it is full (unbuffered: nothing left to fail at close)."""
    try:
        with open(path, "ab", buffering=0) as f:
            while True:
                f.write(b"\0" * 65536)
    except OSError:
        pass
    try:
        with open(path, "ab", buffering=0) as f:  # the last few KiB
            while True:
                f.write(b"\0" * 512)
    except OSError:
        pass


def _wait(condition: Any, timeout: float, proc: subprocess.Popen[str]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.1)
    return condition()


def test_a_full_disk_keeps_the_daemon_judging_images_give_way_and_nothing_stored_is_lost(  # noqa: PLR0915 — one daemon's life as the disk fills and frees, in order
    small_disk, start_broker, mqtt_subscriber, tiny_bundle, make_video, make_edge_config, tmp_path
):
    broker = start_broker(persistent=True)
    sub = mqtt_subscriber(broker.host, broker.port, f"{BASE_TOPIC}/verdict", persistent=True)
    video = make_video(tmp_path / "parts.avi", [i % 2 == 0 for i in range(10)])
    config = make_edge_config(
        tiny_bundle,
        video,
        broker,
        source={"loop": True, "max_fps": 25},
        data={"dir": str(small_disk)},
        images={"save": "ng", "min_free_bytes": 1024 * 1024},
    )
    verdict_log = tmp_path / "verdicts.jsonl"  # off the small disk: the test's record of every result
    command = [
        sys.executable,
        "-m",
        "ganspect.edge",
        "edge",
        "--config",
        str(config),
        "--headless",
        "--verdict-log",
        str(verdict_log),
    ]
    filler = small_disk / "filler"
    images = small_disk / "images"
    stderr_path = tmp_path / "daemon.stderr"
    with open(stderr_path, "w", encoding="utf-8") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, text=True)
    try:
        assert _wait(lambda: len(_lines(verdict_log)) >= 30, 30, proc), "the daemon did not start inspecting"
        saved = len(list(images.glob("*/*.jpg")))
        assert saved, "no NG image was saved before the disk filled"
        # The broker goes away, so the outbox must grow (a backlog), and the disk fills to the last block.
        broker.stop()
        _fill(filler)
        full_at = len(_lines(verdict_log))
        assert _wait(
            lambda: any(DISK_FULL in (v["evaluation"]["reason"] or "") for v in _lines(verdict_log)[full_at:]),
            30,
            proc,
        ), f"no UNDEFINED '{DISK_FULL}' result (daemon exit code {proc.poll()}): " + stderr_path.read_text()[-1500:]
        # Whatever the deleted images gave back is taken too (a process that keeps writing): the disk stays full.
        until = time.monotonic() + 3.0
        while time.monotonic() < until:
            _fill(filler)
            time.sleep(0.05)
        assert proc.poll() is None, "the daemon stopped on the full disk"
        met_full = [v for v in _lines(verdict_log)[full_at:] if DISK_FULL in (v["evaluation"]["reason"] or "")]
        assert len(met_full) >= 20, f"judging did not go on while the disk was full: {len(met_full)} results"
        assert len(list(images.glob("*/*.jpg"))) < saved, "no NG image gave way to the outbox"

        # Space returns: stored OK/NG verdicts again, without a restart.
        filler.unlink()
        last_full = max(i for i, v in enumerate(_lines(verdict_log)) if DISK_FULL in (v["evaluation"]["reason"] or ""))
        assert _wait(
            lambda: sum(v["evaluation"]["state"] != "UNDEFINED" for v in _lines(verdict_log)[last_full + 1 :]) >= 10,
            30,
            proc,
        ), "the daemon did not come back to OK/NG verdicts when space returned"
        start_broker(broker.port, persistent=True)
        produced = _lines(verdict_log)
        stored = {v["result_id"] for v in produced if DISK_FULL not in (v["evaluation"]["reason"] or "")}
        received = lambda: {json.loads(m.payload)["result_id"] for m in sub.on("/verdict")}  # noqa: E731
        _wait(lambda: stored <= received(), 60, proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    stderr = stderr_path.read_text(encoding="utf-8")
    assert proc.returncode == 0, stderr[-2000:]
    assert "Traceback" not in stderr
    missing = stored - received()
    assert not missing, f"{len(missing)} of {len(stored)} stored verdicts never reached the broker"
    unstored = [v for v in produced if DISK_FULL in (v["evaluation"]["reason"] or "")]
    assert all(v["evaluation"]["state"] == "UNDEFINED" and v["score"] is not None for v in unstored)
    assert "to make room for the verdict outbox" in stderr  # the images' deletion is said
    # One ERROR line per 10 s while the disk is full, however many results meet it.
    assert 1 <= stderr.count(DISK_FULL) <= 6, stderr.count(DISK_FULL)
    db = sqlite3.connect(small_disk / "outbox.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0  # everything acknowledged
    finally:
        db.close()


def test_a_read_only_data_folder_is_one_line_at_start_and_a_writable_one_works(
    small_disk, tiny_bundle, tiny_video, make_edge_config, ganspect_cli
):
    # A data folder mounted read-only (a remount after a file system error does this).
    config = make_edge_config(tiny_bundle, tiny_video.path, data={"dir": str(small_disk)})
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result = ganspect_cli("edge", "--config", str(config), "--headless", "--max-frames", "3")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ganspect edge: error:") and str(small_disk) in last and "read-only" in last.lower()
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    result = ganspect_cli("edge", "--config", str(config), "--headless", "--max-frames", "3")
    assert result.returncode == 0, result.stderr
