"""The data folder fills up or turns read-only under a running daemon: a clear stop, nothing lost.

The data folder is a real small filesystem (a 4 MiB tmpfs mounted by the test, so it needs root),
filled up while the daemon runs, or mounted read-only before it starts. What the daemon does:
NG images are dropped first (`images.min_free_bytes`), and when the outbox itself can no
longer be written the daemon stops with one line (exit 2) instead of publishing verdicts it
could not keep; systemd's restart brings it back once space returns. Every verdict it made
before is in the outbox or already at the broker, and a restart delivers the rest.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BASE_TOPIC = "gstest/testsite/l1/s1"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs as the data folder: needs root")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "data"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n")[:-1]]


def test_a_full_disk_stops_the_daemon_clearly_and_loses_nothing(
    small_disk, start_broker, mqtt_subscriber, tiny_bundle, make_video, make_edge_config, tmp_path
):
    broker = start_broker(persistent=True)
    sub = mqtt_subscriber(broker.host, broker.port, f"{BASE_TOPIC}/verdict", persistent=True)
    video = make_video(tmp_path / "parts.avi", [i % 2 == 0 for i in range(10)])
    config = make_edge_config(
        tiny_bundle,
        video,
        broker,
        source={"loop": True, "max_fps": 100},
        data={"dir": str(small_disk)},
        images={"save": "ng", "min_free_bytes": 1024 * 1024},
    )
    verdict_log = tmp_path / "verdicts.jsonl"
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
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(_lines(verdict_log)) < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_lines(verdict_log)) >= 30, "the daemon did not start inspecting"
        try:  # everything that is left; unbuffered, so nothing is left to fail at close
            with open(filler, "wb", buffering=0) as f:
                while True:
                    f.write(b"\0" * 65536)
        except OSError:
            pass
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("ganspect edge: error: cannot write the verdict outbox") and "Traceback" not in stderr
    assert "full" in last

    # Space comes back: the outbox is sound, and a restart delivers the rest.
    filler.unlink()
    db = sqlite3.connect(small_disk / "outbox.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    produced = _lines(verdict_log)
    rerun = subprocess.run([*command, "--max-frames", "5"], capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    wanted = {p["result_id"] for p in produced}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not wanted <= {
        json.loads(m.payload)["result_id"] for m in sub.on("/verdict")
    }:
        time.sleep(0.1)
    assert wanted <= {json.loads(m.payload)["result_id"] for m in sub.on("/verdict")}


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
