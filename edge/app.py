"""The edge daemon: source -> preprocess -> score -> verdict -> MQTT (+ log, + window).

One stop event, set by SIGINT and SIGTERM alike (and by `q` in the window), ends the
loop the same way whatever asked: the publisher sends what the outbox holds (bounded by
`mqtt.drain_timeout_s`), says `stopped`, and a summary is printed. The loop also ends at
`run.max_frames` or at the end of the source.

Each verdict is committed to the disk outbox (which also keeps the station's `seq`)
before it is published or written to the verdict log, so nothing the log shows can be
lost by a crash.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import numpy as np

from ganspect.edge.config import EdgeConfig, read_password
from ganspect.edge.errors import GanspectError
from ganspect.edge.mqtt import DeliveryReport, VerdictPublisher, build_verdict, verdict_json
from ganspect.edge.overlay import OverlayWindow, display_available, render_overlay
from ganspect.edge.remote import LiveModel, RemoteCommands, refuse_triggers_in_continuous_mode
from ganspect.edge.scorer import Scorer
from ganspect.edge.source import FrameSource, open_source
from ganspect.edge.spool import OUTBOX_FILE, Outbox

log = logging.getLogger(__name__)

# Verdicts are logged at INFO at most this often per result (the rest at DEBUG), so a
# fast video or a burst of NG parts cannot flood the journal; NG gets the closer look.
_LOG_INTERVAL_S = {"OK": 1.0, "NG": 0.1, "UNDEFINED": 0.1}


@dataclass
class RunSummary:
    frames: int = 0
    ok: int = 0
    ng: int = 0
    undefined: int = 0
    latency_sum_ms: float = 0.0
    # The p95 comes from the most recent frames only: a daemon runs for weeks.
    recent_latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    delivery: DeliveryReport | None = None  # None when MQTT is disabled
    stopped_by: str = "end of source"

    def add(self, state: str, latency_ms: float) -> None:
        self.frames += 1
        self.ok += state == "OK"
        self.ng += state == "NG"
        self.undefined += state == "UNDEFINED"
        self.latency_sum_ms += latency_ms
        self.recent_latencies_ms.append(latency_ms)

    def lines(self) -> list[str]:
        mean = self.latency_sum_ms / self.frames if self.frames else 0.0
        p95 = float(np.percentile(self.recent_latencies_ms, 95)) if self.recent_latencies_ms else 0.0
        out = [
            f"frames {self.frames}: OK {self.ok}, NG {self.ng}"
            + (f", UNDEFINED {self.undefined}" if self.undefined else "") + f" (stopped by {self.stopped_by})",
            f"latency per frame: mean {mean:.2f} ms, p95 {p95:.2f} ms",
        ]
        if self.delivery is None:
            out.append("verdicts published: none (mqtt.enabled is false)")
        else:
            d = self.delivery
            out.append(f"verdicts queued {d.queued}, acknowledged {d.acknowledged} (replayed {d.replayed}), "
                       f"dropped when full {d.dropped}, left in the outbox {d.backlog}")
            out.append(f"outbox {d.outbox}: {d.backlog_at_start} waiting at start, {d.backlog} at exit")
        return out


def window_wanted(config: EdgeConfig, headless: bool) -> bool:
    if headless or config.display.window == "off":
        return False
    if config.display.window == "on":
        if not display_available():
            raise GanspectError(f"display.window is on but no display answers "
                                f"(DISPLAY={os.environ.get('DISPLAY', '')!r}); use --headless or display.window: auto")
        return True
    return display_available()


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM both set `stop`; the previous handlers come back afterwards."""
    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _log_verdict(payload: dict[str, Any], last_logged: dict[str, float]) -> None:
    now = time.monotonic()
    result = payload["evaluation"]["state"]
    level = logging.INFO if now - last_logged.get(result, float("-inf")) >= _LOG_INTERVAL_S[result] else logging.DEBUG
    if level == logging.INFO:
        last_logged[result] = now
    peak = payload["heatmap_peak"]
    log.log(level, "#%d %s %s score %s thr %.4g peak (%d,%d) %.1f ms", payload["seq"], payload["part_id"],
            result, f"{payload['score']:.4g}" if payload["score"] is not None else "n/a",
            payload["threshold"]["value"], peak["x"], peak["y"], payload["processing_ms"]["total"])


def run_edge(config: EdgeConfig, *, headless: bool = False, verdict_log: Path | None = None,
             stop: threading.Event | None = None) -> RunSummary:
    """Inspect until the source ends, max_frames is reached or `stop` is set; return the summary."""
    stop = stop or threading.Event()
    summary = RunSummary()
    with ExitStack() as stack:
        scorer = Scorer.load(config.model.bundle, config.model.precision, config.model.intra_op_threads)
        live = LiveModel(scorer, config)  # the model and threshold in force; cmd/reload and cmd/threshold change them
        show_window = window_wanted(config, headless)
        source = open_source(config.source)
        stack.callback(source.close)
        outbox = _open_outbox(config)
        stack.callback(outbox.close)
        publisher: VerdictPublisher | None = None
        remote: RemoteCommands | None = None
        if config.mqtt.enabled:
            publisher = VerdictPublisher(config.mqtt, config.station, outbox, read_password(config.mqtt))
            remote = RemoteCommands(config, live, refuse_triggers_in_continuous_mode, publisher.publish_result)
            publisher.start(on_command=remote.handle if config.mqtt.commands.enabled else None)
        else:
            log.info("mqtt.enabled is false: verdicts are logged, not published")
        log_file: IO[str] | None = None
        if verdict_log is not None:
            verdict_log.parent.mkdir(parents=True, exist_ok=True)
            log_file = stack.enter_context(open(verdict_log, "a", encoding="utf-8"))
        window = OverlayWindow(config.display.heatmap) if show_window else None
        if window is not None:
            stack.callback(window.close)
        stack.enter_context(stop_on_signals(stop))
        try:
            _loop(config, live, source, outbox, publisher, log_file, window, stop, summary)
        finally:
            if remote is not None:
                remote.close()  # a reload under way finishes and its answer goes out before the publisher closes
            if publisher is not None:
                summary.delivery = publisher.close()
    return summary


def _open_outbox(config: EdgeConfig) -> Outbox:
    outbox_config = config.mqtt.outbox
    outbox = Outbox(config.data.dir / OUTBOX_FILE, max_messages=outbox_config.max_messages,
                    max_bytes=outbox_config.max_bytes, when_full=outbox_config.when_full)
    if outbox.backlog_at_open and config.mqtt.enabled:
        log.info("%d verdict(s) from an earlier run wait in the outbox %s; they are sent first",
                 outbox.backlog_at_open, outbox.path)
    elif outbox.backlog_at_open:
        log.warning("%d verdict(s) from an earlier run wait in the outbox %s but mqtt.enabled is false",
                    outbox.backlog_at_open, outbox.path)
    return outbox


def _loop(config: EdgeConfig, live: LiveModel, source: FrameSource, outbox: Outbox,
          publisher: VerdictPublisher | None, log_file: IO[str] | None, window: OverlayWindow | None,
          stop: threading.Event, summary: RunSummary) -> None:
    max_frames = config.run.max_frames
    last_logged: dict[str, float] = {}
    fps: float | None = None
    last_shown: float | None = None
    min_interval = 1.0 / config.source.max_fps if config.source.max_fps else 0.0
    next_due = time.monotonic()
    while True:
        if min_interval:
            # Pace a file or folder like a conveyor; waiting on the event keeps signals prompt.
            stop.wait(max(0.0, next_due - time.monotonic()))
            next_due = max(next_due + min_interval, time.monotonic())
        if stop.is_set():
            summary.stopped_by = "signal or quit key"
            return
        if max_frames is not None and summary.frames >= max_frames:
            summary.stopped_by = f"max_frames {max_frames}"
            return
        frame = source.read()
        if frame is None:
            return
        started = time.perf_counter()
        judged = live.score(frame.image)  # the model and threshold in force for this frame
        score = judged.score
        seq = outbox.next_seq()
        payload = build_verdict(
            seq=seq, station=config.station, part_id=f"{source.name}:{frame.index}",
            captured_at=frame.captured_at, score=score, manifest=judged.scorer.manifest,
            model_file=judged.scorer.model_file, total_ms=(time.perf_counter() - started) * 1000.0,
            threshold_source=judged.threshold_source,
        )
        text = verdict_json(payload)  # serialised once: stored, logged and (from the outbox) sent
        if publisher is not None:
            publisher.submit(payload, text)  # on disk when this returns
        else:
            outbox.note_seq(seq)
        if log_file is not None:
            log_file.write(text + "\n")
            log_file.flush()
        summary.add(payload["evaluation"]["state"], payload["processing_ms"]["total"])
        _log_verdict(payload, last_logged)
        if window is not None:
            now = time.monotonic()
            if last_shown is not None:  # the first frame has no interval to measure
                instant = 1.0 / max(now - last_shown, 1e-6)
                fps = instant if fps is None else 0.9 * fps + 0.1 * instant
            last_shown = now
            image = render_overlay(frame.image, score.heatmap, payload["evaluation"]["state"], payload["score"],
                                   score.threshold, fps=fps, show_heatmap=window.show_heatmap)
            if not window.show(image):
                stop.set()
