"""SIGKILL at random moments, the broker bouncing in between: nothing produced is lost, the outbox never corrupts.

Real processes throughout: the daemon (`python -m ganspect.edge edge`) on a looping video, a
persistent mosquitto that the test stops and starts, and a subscriber holding a QoS 1
persistent session, so whatever the broker accepted reaches it. The daemon's verdict log is
written after a verdict is committed to the outbox, so every complete line in it is a
verdict the daemon owed the MES.

GANSPECT_FAULT_KILLS sets the number of kills (CI: 8; `docs/reliability.md` records a run with
more). The moment of each kill is random (seeded, printed on failure) within the daemon's life.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

BASE_TOPIC = "gstest/testsite/l1/s1"
KILLS = int(os.environ.get("GANSPECT_FAULT_KILLS", "8"))
SEED = int(os.environ.get("GANSPECT_FAULT_SEED", str(int(time.time()))))


def _complete_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n")[:-1]]


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (seed {SEED})")
        time.sleep(0.02)


def _outbox_is_sound(path: Path) -> tuple[str, int]:
    """SQLite's own integrity check of the outbox file as the killed daemon left it; and its row count."""
    db = sqlite3.connect(path)
    try:
        check = db.execute("PRAGMA integrity_check").fetchone()[0]
        rows = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
        return check, rows
    finally:
        db.close()


def test_random_sigkills_with_a_bouncing_broker_lose_nothing(
    start_broker, mqtt_subscriber, tiny_bundle, make_video, make_edge_config, tmp_path, edge_daemon
):
    rng = random.Random(SEED)
    broker = start_broker(persistent=True)
    sub = mqtt_subscriber(broker.host, broker.port, f"{BASE_TOPIC}/verdict", persistent=True)
    video = make_video(tmp_path / "parts.avi", [i % 3 == 0 for i in range(12)])
    config = make_edge_config(
        tiny_bundle,
        video,
        broker,
        source={"loop": True, "max_fps": 40},
        mqtt={"reconnect_max_delay_s": 1, "keepalive": 5, "connect_timeout_s": 1},
    )
    outbox = tmp_path / "edge-data" / "outbox.sqlite3"
    verdict_log = tmp_path / "verdicts.jsonl"
    broker_up = True
    for kill in range(KILLS):
        made_before = len(_complete_lines(verdict_log))
        proc = edge_daemon.start(config, verdict_log=verdict_log)
        _wait(
            lambda: len(_complete_lines(verdict_log)) > made_before or proc.poll() is not None,
            30,
            f"the daemon's first verdict after restart {kill}",
        )
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(rng.uniform(0.0, 1.2))  # somewhere in the middle of scoring, committing, publishing
        if rng.random() < 0.3:  # the broker goes away (or comes back) while the daemon runs
            if broker_up:
                broker.stop()
            else:
                broker = start_broker(broker.port, persistent=True)
            broker_up = not broker_up
            time.sleep(rng.uniform(0.0, 0.5))
        edge_daemon.finish(proc, signal.SIGKILL, timeout=10)
        check, _ = _outbox_is_sound(outbox)
        assert check == "ok", f"outbox corrupt after kill {kill} (seed {SEED}): {check}"

    if not broker_up:
        broker = start_broker(broker.port, persistent=True)
    produced = _complete_lines(verdict_log)
    assert len(produced) >= KILLS, "the daemon should have made verdicts between kills"
    # seq keeps increasing across every restart: no kill made the station reuse a number.
    seqs = [p["seq"] for p in produced]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), f"seq went back (seed {SEED})"

    # One clean run sends whatever the kills left on disk.
    final = edge_daemon.start(config, verdict_log=verdict_log)
    try:
        _wait(lambda: len(_complete_lines(verdict_log)) > len(produced), 30, "the final run's first verdict")
        wanted = {p["result_id"] for p in produced}
        _wait(
            lambda: wanted <= {json.loads(m.payload)["result_id"] for m in sub.on("/verdict")},
            60,
            "every verdict produced before the kills at the subscriber",
        )
    finally:
        stdout, stderr = edge_daemon.finish(final)
    assert final.returncode == 0, stderr
    assert _outbox_is_sound(outbox) == ("ok", 0), stdout
