"""Soak: the daemon on a looping video for many frames while the broker bounces; nothing grows, nothing is lost.

Samples the daemon's resident memory, open file descriptors and threads from /proc once a
second. The regular suite runs a short soak (GANSPECT_SOAK_FRAMES, default 3,000 frames,
broker bounced every 3 s); `docs/reliability.md` gives the full command (100,000 frames or
more) and its figures. GANSPECT_SOAK_REPORT names a JSON file for the samples.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BASE_TOPIC = "gstest/testsite/l1/s1"
FRAMES = int(os.environ.get("GANSPECT_SOAK_FRAMES", "3000"))
BOUNCE_EVERY_S = float(os.environ.get("GANSPECT_SOAK_BOUNCE_S", "3"))
OUTAGE_S = 1.0
# Memory may settle after warm-up (allocator pools, SQLite's page cache); growth beyond this is a leak.
RSS_GROWTH_LIMIT_KB = 30 * 1024


def _proc_sample(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "VmRSS" not in fields:  # exited but not yet reaped: a zombie has no memory to sample
        raise ProcessLookupError(pid)
    return {
        "rss_kb": int(fields["VmRSS"].split()[0]),
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n")[:-1]]


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def test_soak_with_a_bouncing_broker(  # noqa: PLR0915 — one long daemon life and its checks, in order
    start_broker, mqtt_subscriber, tiny_bundle, make_video, make_edge_config, tmp_path
):
    broker = start_broker(persistent=True)
    sub = mqtt_subscriber(broker.host, broker.port, f"{BASE_TOPIC}/verdict", persistent=True)
    video = make_video(tmp_path / "parts.avi", [i % 5 == 0 for i in range(50)])
    config = make_edge_config(
        tiny_bundle,
        video,
        broker,
        source={"loop": True},
        run={"max_frames": FRAMES},
        mqtt={"reconnect_max_delay_s": 1, "keepalive": 5, "drain_timeout_s": 60},
    )
    verdict_log = tmp_path / "verdicts.jsonl"
    # The daemon's output goes to files: a pipe nobody reads for minutes fills up and blocks its logging.
    out_path, err_path = tmp_path / "daemon.out", tmp_path / "daemon.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ganspect.edge",
                "edge",
                "--config",
                str(config),
                "--headless",
                "--verdict-log",
                str(verdict_log),
            ],
            stdout=out,
            stderr=err,
            text=True,
        )
    samples: list[dict[str, Any]] = []
    bounces = 0
    started = time.monotonic()
    next_bounce = started + BOUNCE_EVERY_S
    try:
        while proc.poll() is None:
            try:
                samples.append(
                    {
                        "t_s": round(time.monotonic() - started, 1),
                        "frames": _count_lines(verdict_log),
                        **_proc_sample(proc.pid),
                    }
                )
            except (FileNotFoundError, ProcessLookupError):
                break  # it ended between poll() and the read
            # The last fifth runs with the broker up, so the daemon ends connected and drains its outbox;
            # what an exit during an outage leaves on disk is the SIGKILL test's business.
            if time.monotonic() >= next_bounce and samples[-1]["frames"] < FRAMES * 0.8:
                broker.stop()
                time.sleep(OUTAGE_S)
                broker = start_broker(broker.port, persistent=True)
                bounces += 1
                next_bounce = time.monotonic() + BOUNCE_EVERY_S
            time.sleep(1.0)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    stdout, stderr = out_path.read_text(encoding="utf-8"), err_path.read_text(encoding="utf-8")
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, stderr[-2000:]

    produced = _lines(verdict_log)
    assert len(produced) == FRAMES
    wanted = {p["result_id"] for p in produced}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not wanted <= {
        json.loads(m.payload)["result_id"] for m in sub.on("/verdict")
    }:
        time.sleep(0.2)
    delivered = wanted & {json.loads(m.payload)["result_id"] for m in sub.on("/verdict")}

    warm = [s for s in samples if s["frames"] >= min(200, FRAMES // 10)]
    report = {
        "frames": FRAMES,
        "seconds": round(elapsed, 1),
        "fps": round(FRAMES / elapsed, 1),
        "broker_bounces": bounces,
        "produced": len(produced),
        "delivered": len(delivered),
        "rss_kb_after_warm_up": warm[0]["rss_kb"] if warm else None,
        "rss_kb_max": max(s["rss_kb"] for s in samples),
        "rss_kb_end": samples[-1]["rss_kb"],
        "fds": sorted({s["fds"] for s in samples}),
        "threads": sorted({s["threads"] for s in samples}),
    }
    if os.environ.get("GANSPECT_SOAK_REPORT"):
        Path(os.environ["GANSPECT_SOAK_REPORT"]).write_text(json.dumps({**report, "samples": samples}, indent=1))
    print(json.dumps(report))
    if len(delivered) != len(produced):
        print(stdout, "\n".join(line for line in stderr.splitlines() if " #" not in line), sep="\n")
    assert len(delivered) == len(produced), report
    assert warm, report
    later = [s for s in warm if s is not warm[0]]
    assert max((s["rss_kb"] for s in later), default=0) - warm[0]["rss_kb"] < RSS_GROWTH_LIMIT_KB, report
    # Reconnects must not leak sockets or threads: what the first warm sample had, give or take a connection.
    assert max(s["fds"] for s in warm) - warm[0]["fds"] <= 3, report
    assert max(s["threads"] for s in warm) - warm[0]["threads"] <= 2, report
