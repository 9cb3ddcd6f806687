"""End to end: the edge daemon, headless, on a 640x480 video, publishing to a real mosquitto.

For each core count the daemon runs twice under `taskset`, as the `ganspect` command a
line PC runs, with its own config:

- **throughput**: the video as fast as the daemon takes it (every frame scored, looped
  to N frames). Sustained frames per second, per-stage latency from the verdicts'
  `processing_ms`, resident memory (VmRSS from /proc/PID/status) after warm-up and at
  the end, and its slope over the run.
- **paced**: the same video offered at the target rate (`source.max_fps`), like a
  camera: the rate the daemon keeps up, and frame-to-published latency = the
  subscriber's receipt time minus the verdict's `captured_at` (same clock, same machine).

The subscriber is a paho client in this process; the broker is a `mosquitto` started
here on a free port of 127.0.0.1 and stopped at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.bench_stats import Stats

FRAME_W, FRAME_H = 640, 480
PREFIX = "bench"
STATION = {"site": "bench", "line": "line1", "station": "cam1"}
# Stages of the verdict's processing_ms, in pipeline order; `publish` is reported by the
# daemon's health metrics (it happens after the verdict is sealed), not by the verdict.
STAGES = ("capture_age", "preprocess", "inference", "overlay", "publish", "total")
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


# ---------------------------------------------------------------------------------------
# Video


def write_video(path: Path, n_frames: int, fps: float, seed: int = 0) -> Path:
    """A 640x480 MJPG video of synthetic parts (the project's renderer), one part per frame.

    `fps` goes into the header: a build whose capture paces a file like a camera (delivery
    `latest`) reads it at that rate, so it is the paced run's rate.

    MJPG, as USB cameras deliver 640x480 at high rates: the daemon pays the JPEG decode a
    camera would cost it. The 480x480 rendering is widened to 640 with a reflected border.
    """
    import cv2

    from ganspect.train.synth import DEFECT_KINDS, render_part

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (FRAME_W, FRAME_H), True)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write an MJPG video at {path}")
    pad = (FRAME_W - FRAME_H) // 2
    try:
        for i in range(n_frames):
            defect = DEFECT_KINDS[i % len(DEFECT_KINDS)] if i % 5 == 4 else None  # one part in five defective
            image, _ = render_part(np.random.default_rng([seed, i]), defect, FRAME_H)
            writer.write(cv2.copyMakeBorder(image, 0, 0, pad, pad, cv2.BORDER_REFLECT_101))
    finally:
        writer.release()
    return path


# ---------------------------------------------------------------------------------------
# Broker and subscriber


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """A mosquitto on a free port of 127.0.0.1 (never the shared 1883), stopped by `stop()`."""

    def __init__(self, folder: Path) -> None:
        if not Path(MOSQUITTO).exists():
            raise RuntimeError(f"{MOSQUITTO} not found: install mosquitto (apt-get install -y mosquitto)")
        self.port = _free_port()
        conf = folder / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n", encoding="utf-8")
        self._log = open(folder / "mosquitto.log", "ab")
        self.process = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.process.returncode}; see {folder / 'mosquitto.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("mosquitto did not listen within 10 s") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


class Subscriber:
    """Records the receipt time (time.time()) of every verdict, and the latest health metrics."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.received: dict[str, float] = {}  # result_id (or seq) -> receipt time
        self.metrics: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{os.getpid()}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"{PREFIX}/#", qos=1)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("the benchmark's subscriber got no SUBACK from the broker")

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        now = time.time()
        topic = message.topic
        if topic.endswith("/verdict"):
            try:
                doc = json.loads(message.payload)
            except ValueError:
                return
            key = str(doc.get("result_id") or doc.get("seq"))
            with self._lock:
                self.received.setdefault(key, now)  # a QoS 1 duplicate keeps the first receipt
        elif topic.endswith("/metrics"):
            with contextlib.suppress(ValueError):
                self.metrics.append(json.loads(message.payload))

    def count(self) -> int:
        with self._lock:
            return len(self.received)

    def reset(self) -> None:
        with self._lock:
            self.received.clear()
            self.metrics.clear()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# ---------------------------------------------------------------------------------------
# The daemon


def _edge_has(section: str, key: str) -> bool:
    """Whether this build's edge config has `section.key` (the edge issue adds sections)."""
    from ganspect.edge.config import EdgeConfig

    field_info = EdgeConfig.model_fields.get(section)
    sub = getattr(field_info, "annotation", None) if field_info else None
    return key in getattr(sub, "model_fields", {})


def edge_config(
    bundle: Path, video: Path, port: int, data_dir: Path, threads: int, max_frames: int, max_fps: float | None
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "station": STATION,
        "model": {"bundle": str(bundle), "precision": "auto", "intra_op_threads": threads},
        "source": {"uri": str(video), "loop": True, **({"max_fps": max_fps} if max_fps else {})},
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": port, "prefix": PREFIX, "require_broker": True},
        "data": {"dir": str(data_dir)},
        "display": {"window": "off"},
        "run": {"max_frames": max_frames},
    }
    if max_fps and _edge_has("source", "delivery"):
        # Like a camera: frames come at their rate whether or not scoring keeps up, and the
        # newest is scored (a file read under `every_frame` would wait for scoring instead).
        config["source"]["delivery"] = "latest"
    if _edge_has("health", "interval_s"):
        config["health"] = {"interval_s": 2.0}  # the publish stage's timing comes from here
    if _edge_has("images", "save"):
        # An untrained model's NG rate is arbitrary; saving NG frames would measure that, not the line.
        config["images"] = {"save": "none"}
    return config


def ganspect_command() -> list[str]:
    script = Path(sys.executable).parent / "ganspect"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ganspect.edge"]


def _rss_kib(pid: int) -> tuple[int | None, int | None]:
    """(VmRSS, VmHWM) in KiB from /proc/PID/status; None when the process is gone."""
    rss = hwm = None
    try:
        for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


@dataclass
class EdgeRun:
    mode: str  # throughput, paced or profiled
    cores: int
    inference_threads: int  # model.intra_op_threads
    frames: int  # verdicts in the log
    offered_fps: float | None  # pace asked for (None = as fast as it goes)
    fps: float | None = None  # sustained, after warm-up
    stages: dict[str, Stats | None] = field(default_factory=dict)
    stages_in_build: set[str] = field(default_factory=set)  # keys of this build's processing_ms
    skipped_frames: int | None = None  # frames the capture replaced before scoring took them (health metrics)
    publish_from_metrics: dict[str, float] | None = None  # the daemon's own p50/p99 of the publish stage
    frame_to_published: Stats | None = None
    received: int = 0
    rss_warm_mib: float | None = None
    rss_end_mib: float | None = None
    rss_peak_mib: float | None = None
    rss_slope_kib_per_1000: float | None = None
    precision: str | None = None
    profile: DaemonProfile | None = None
    results: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    wall_s: float = 0.0


@dataclass
class DaemonProfile:
    """py-spy samples of the daemon's threads: share of all samples, and the busiest project lines."""

    samples: int
    threads: list[tuple[str, float, list[tuple[str, float]]]]  # (thread, share, [(frame, share), ...])


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).is_file() else None


def profile_daemon(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """Start py-spy sampling `pid` for `seconds` (raw collapsed stacks into `out`); None without py-spy."""
    tool = py_spy()
    if tool is None:
        return None
    return subprocess.Popen(
        [
            tool,
            "record",
            "--format",
            "raw",
            "-o",
            str(out),
            "--duration",
            f"{max(1, int(seconds))}",
            "--pid",
            str(pid),
            "--threads",
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def read_profile(raw: Path, top: int = 4) -> DaemonProfile | None:
    """Per thread: its share of the samples and the project lines (ganspect) it spent them in."""
    if not raw.is_file():
        return None
    threads: dict[str, float] = {}
    lines: dict[str, dict[str, float]] = {}
    total = 0
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        # "thread (1234): MainThread" -> "MainThread"; the id changes from run to run.
        thread = frames[0].split(": ", 1)[-1]
        ours = [f for f in frames[1:] if "ganspect" in f or "edge/" in f]
        where = ours[-1] if ours else (frames[-1] if len(frames) > 1 else "(idle)")
        total += n
        threads[thread] = threads.get(thread, 0) + n
        lines.setdefault(thread, {})[where] = lines.get(thread, {}).get(where, 0) + n
    if not total:
        return None
    out = []
    for thread, n in sorted(threads.items(), key=lambda kv: -kv[1]):
        busiest = sorted(lines[thread].items(), key=lambda kv: -kv[1])[:top]
        out.append((thread, n / total, [(where, m / total) for where, m in busiest]))
    return DaemonProfile(samples=total, threads=out)


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def run_daemon(  # noqa: PLR0913 — one benchmark run's settings, each a command-line flag of main
    bundle: Path,
    video: Path,
    broker: Broker,
    subscriber: Subscriber,
    work: Path,
    cores: int,
    frames: int,
    max_fps: float | None,
    warmup_frames: int,
    timeout_s: float,
    profile_s: float | None = None,
    inference_threads: int | None = None,
) -> EdgeRun:
    """One daemon run on `cores` cores, onnxruntime on `inference_threads` of them (default: all).

    With `profile_s`, py-spy samples it for that long after warm-up (mode "profiled").
    """
    mode = "profiled" if profile_s else "paced" if max_fps else "throughput"
    threads = inference_threads or cores
    run = EdgeRun(mode=mode, cores=cores, frames=0, offered_fps=max_fps, inference_threads=threads)
    folder = Path(tempfile.mkdtemp(prefix=f"edge-{mode}-{cores}c{threads}t-", dir=work))
    config_path = folder / "edge.yaml"
    config_path.write_text(
        yaml.safe_dump(
            edge_config(bundle, video, broker.port, folder / "data", threads, frames, max_fps), sort_keys=False
        ),
        encoding="utf-8",
    )
    verdict_log = folder / "verdicts.jsonl"
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:cores])
    command = [
        "taskset",
        "-c",
        cpus,
        *ganspect_command(),
        "edge",
        "--config",
        str(config_path),
        "--headless",
        "--verdict-log",
        str(verdict_log),
    ]
    subscriber.reset()
    samples: list[tuple[int, int]] = []  # (verdicts received, VmRSS KiB)
    peak: int | None = None
    spy: subprocess.Popen[bytes] | None = None
    raw = folder / "py-spy.txt"
    started = time.monotonic()
    with open(folder / "daemon.log", "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                rss, hwm = _rss_kib(proc.pid)
                if rss is not None:
                    samples.append((subscriber.count(), rss))
                    peak = hwm
                if profile_s and spy is None and subscriber.count() >= warmup_frames:
                    spy = profile_daemon(proc.pid, profile_s, raw)
                if time.monotonic() - started > timeout_s:
                    proc.send_signal(signal.SIGTERM)
                    run.error = f"stopped after {timeout_s:.0f} s (timeout)"
                    proc.wait(timeout=30)
                    break
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if spy is not None:
                try:
                    spy.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait()
    run.wall_s = time.monotonic() - started
    run.profile = read_profile(raw)
    if proc.returncode not in (0, None) and run.error is None:
        tail = (folder / "daemon.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        run.error = f"exit code {proc.returncode}: {' | '.join(tail)}"
    time.sleep(0.5)  # the last acknowledged verdicts reach the subscriber
    _analyse(run, verdict_log, subscriber, samples, peak, warmup_frames)
    return run


def _analyse(  # noqa: C901 — each figure of a run from its verdicts, metrics and memory samples, skipped when missing
    run: EdgeRun,
    verdict_log: Path,
    subscriber: Subscriber,
    samples: list[tuple[int, int]],
    peak_kib: int | None,
    warmup_frames: int,
) -> None:
    if not verdict_log.is_file():
        run.error = run.error or "no verdict log written"
        return
    verdicts = [json.loads(line) for line in verdict_log.read_text(encoding="utf-8").splitlines() if line.strip()]
    run.frames = len(verdicts)
    if not verdicts:
        run.error = run.error or "no verdicts"
        return
    warm = min(warmup_frames, len(verdicts) // 2)
    steady = verdicts[warm:]
    run.precision = verdicts[-1].get("model", {}).get("precision")
    for v in verdicts:
        state = v.get("evaluation", {}).get("state", "?")
        run.results[state] = run.results.get(state, 0) + 1
    captured = np.array([_parse_time(v["captured_at"]) for v in steady])
    if len(captured) > 1 and captured[-1] > captured[0]:
        run.fps = (len(captured) - 1) / float(captured[-1] - captured[0])
    run.stages_in_build = set(verdicts[-1].get("processing_ms", {}))
    for stage in STAGES:
        values = [v["processing_ms"].get(stage) for v in steady]
        values = [x for x in values if isinstance(x, (int, float))]
        run.stages[stage] = Stats.of(values) if values else None
    if subscriber.metrics:
        publish = subscriber.metrics[-1].get("latency_ms", {}).get("publish")
        if isinstance(publish, dict):
            run.publish_from_metrics = {k: float(publish[k]) for k in ("p50", "p99") if k in publish}
        camera = subscriber.metrics[-1].get("camera")
        if isinstance(camera, dict) and isinstance(camera.get("skipped_frames"), int):
            run.skipped_frames = camera["skipped_frames"]
    received = subscriber.received
    run.received = len(received)
    delays = [
        (received[str(v.get("result_id") or v.get("seq"))] - _parse_time(v["captured_at"])) * 1000.0
        for v in steady
        if str(v.get("result_id") or v.get("seq")) in received
    ]
    if delays:
        run.frame_to_published = Stats.of(delays)
    # Samples while it inspected: from warm-up until the last verdict (not its shutdown).
    after_warm = [(n, rss) for n, rss in samples if warm <= n < len(verdicts)]
    if after_warm:
        run.rss_warm_mib = after_warm[0][1] / 1024
        run.rss_end_mib = after_warm[-1][1] / 1024
        n = np.array([s[0] for s in after_warm], float)
        r = np.array([s[1] for s in after_warm], float)
        if len(after_warm) >= 3 and n[-1] > n[0]:
            run.rss_slope_kib_per_1000 = float(np.polyfit(n, r, 1)[0] * 1000)
    if peak_kib is not None:
        run.rss_peak_mib = peak_kib / 1024
