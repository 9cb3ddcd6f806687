"""The edge daemon: capture -> (trigger) -> inspect -> verdict -> image store -> outbox/MQTT (+ log, + window).

Threads, started in this order and joined in the reverse order at exit:

1. the MQTT publisher (paho's network thread and the outbox sender), when enabled;
2. the image writer (NG JPEGs, `images.py`);
3. the capture thread (`source.Capture`).

The scoring loop and the operator window run on the main thread (HighGUI wants it).
One stop event, set by SIGINT and SIGTERM alike (and by `q` in the window), ends the
loop the same way whatever asked; the loop also ends at `run.max_frames` or at the end
of the source. Then the capture stops, the image writer finishes its queue, and the
publisher sends what the outbox holds (bounded by `mqtt.drain_timeout_s`) and says
`stopped`.

Each verdict is committed to the disk outbox (which also keeps the station's `seq`)
before it is published or written to the verdict log, so nothing the log shows can be
lost by a crash. A verdict is never OK by default: a stale frame, a source that gives
nothing, or a failed inference is UNDEFINED with the reason.

A full data disk does not stop the daemon. NG images give way first (`images.py`). A
verdict the outbox then has no room for becomes UNDEFINED ("data disk full"), its score
kept, and goes straight to the broker while it is online, unstored: without the outbox
its delivery is not guaranteed, so the MES must not take it as a judged part. Every
result tries the outbox again, so the daemon is back to OK/NG by itself once space
returns. What the outbox held is untouched.

Trigger mode (`trigger.mode: mqtt`): `EdgeDaemon.accept_trigger` (called by the MQTT
command handler on its own thread) queues a `TriggerRequest`; the capture thread binds it
to the first frame captured after it arrived (`triggers.FrameClaims`), and the loop scores
that frame and publishes with its part_id and trigger_id. Triggers that share a frame
share its inspection: one inference, one verdict each.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import IO, Any

import numpy as np

from ganspect.edge.common import first_line, utc_iso
from ganspect.edge.config import EdgeConfig, read_password
from ganspect.edge.errors import GanspectError
from ganspect.edge.health import Health, VerdictCounts, log_line
from ganspect.edge.images import ImageStore, StoreStats
from ganspect.edge.inspector import Inspection, Inspector
from ganspect.edge.live_model import LiveModel
from ganspect.edge.model_store import BundleWatch, load_current_or_previous
from ganspect.edge.mqtt import DeliveryReport, VerdictPublisher
from ganspect.edge.notify import SystemdNotifier, Watchdog, watchdog_interval_s
from ganspect.edge.outbox import OUTBOX_FILE, Outbox, OutboxError, OutboxFull
from ganspect.edge.overlay import OverlayWindow, StatusLine, display_available, render_overlay
from ganspect.edge.remote import RemoteCommands
from ganspect.edge.scorer import Scorer
from ganspect.edge.source import Capture, Frame, delivery_for, open_source
from ganspect.edge.triggers import FrameClaims, PendingTrigger, TriggerRequest
from ganspect.edge.verdict import (
    Evaluation,
    HeatmapPeak,
    ModelUsed,
    ResultState,
    StationName,
    ThresholdUsed,
    Timings,
    Verdict,
    finite_or_none,
    judge,
)

log = logging.getLogger(__name__)

# Verdicts are logged at INFO at most this often per result (the rest at DEBUG), so a
# fast video or a burst of NG parts cannot flood the journal; NG gets the closer look.
_LOG_INTERVAL_S = {"OK": 1.0, "NG": 0.1, "UNDEFINED": 0.1}
# How long the loop waits at a time: the window's keys, the stop event and health stay responsive.
_TICK_S = 0.05
# A full data disk is logged at ERROR at most this often, with the running count.
_DISK_FULL_LOG_INTERVAL_S = 10.0


@dataclass
class RunSummary:
    counts: VerdictCounts = field(default_factory=VerdictCounts)  # the daemon's health.counts: one count for both
    latency_sum_ms: float = 0.0
    # The p95 comes from the most recent frames only: a daemon runs for weeks.
    recent_latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    delivery: DeliveryReport | None = None  # None when MQTT is disabled
    stopped_by: str = "end of source"
    skipped: int = 0  # frames the capture replaced before the loop took them (latest-frame policy)
    images_saved: int = 0
    images_dropped: int = 0

    @property
    def frames(self) -> int:
        return self.counts.total

    def add_latency(self, latency_ms: float) -> None:
        self.latency_sum_ms += latency_ms
        self.recent_latencies_ms.append(latency_ms)

    def lines(self) -> list[str]:
        mean = self.latency_sum_ms / self.frames if self.frames else 0.0
        p95 = float(np.percentile(self.recent_latencies_ms, 95)) if self.recent_latencies_ms else 0.0
        counts = self.counts
        out = [
            f"frames {self.frames}: OK {counts.ok}, NG {counts.ng}"
            + (f", UNDEFINED {counts.undefined}" if counts.undefined else "")
            + f" (stopped by {self.stopped_by})",
            f"latency per frame: mean {mean:.2f} ms, p95 {p95:.2f} ms",
            f"frames skipped (newer frame arrived first) {self.skipped}; images saved {self.images_saved}, "
            f"dropped {self.images_dropped}",
        ]
        if self.delivery is None:
            out.append("verdicts published: none (mqtt.enabled is false)")
        else:
            d = self.delivery
            out.append(
                f"verdicts queued {d.queued}, acknowledged {d.acknowledged} (replayed {d.replayed}), "
                f"dropped when full {d.dropped}, left in the outbox {d.backlog}"
            )
            out.append(f"outbox {d.outbox}: {d.backlog_at_start} waiting at start, {d.backlog} at exit")
        return out


@dataclass(frozen=True)
class Shown:
    """What the operator window and an NG image show of one result: the verdict's state, score and threshold."""

    inspection: Inspection | None  # the heatmap and where it lies; None when nothing was scored
    evaluation: Evaluation
    score: float | None  # finite or None, as in the verdict
    threshold: float


@dataclass(frozen=True)
class Work:
    """One result to make: a frame to score, or the reason none can be (then the result is UNDEFINED)."""

    part_id: str
    frame: Frame | None
    trigger_id: str | None = None
    undefined_reason: str | None = None


class _EndOfSource:
    pass


END_OF_SOURCE = _EndOfSource()


def window_wanted(config: EdgeConfig, headless: bool) -> bool:
    if headless or config.display.window == "off":
        return False
    if config.display.window == "on":
        if not display_available():
            raise GanspectError(
                f"display.window is on but no display answers "
                f"(DISPLAY={os.environ.get('DISPLAY', '')!r}); use --headless or display.window: auto"
            )
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


def _log_verdict(verdict: Verdict, last_logged: dict[str, float]) -> None:
    now = time.monotonic()
    result = verdict.evaluation.state
    level = logging.INFO if now - last_logged.get(result, float("-inf")) >= _LOG_INTERVAL_S[result] else logging.DEBUG
    if level == logging.INFO:
        last_logged[result] = now
    peak = verdict.heatmap_peak
    where = f"peak ({peak.x},{peak.y})" if peak else f"({verdict.evaluation.reason})"
    log.log(
        level,
        "#%d %s %s score %s thr %.4g %s %.1f ms",
        verdict.seq,
        verdict.part_id,
        result,
        f"{verdict.score:.4g}" if verdict.score is not None else "n/a",
        verdict.threshold.value,
        where,
        verdict.processing_ms.total,
    )


def _open_outbox(config: EdgeConfig) -> Outbox:
    outbox_config = config.mqtt.outbox
    outbox = Outbox(
        config.data.dir / OUTBOX_FILE,
        max_messages=outbox_config.max_messages,
        max_bytes=outbox_config.max_bytes,
        when_full=outbox_config.when_full,
    )
    if outbox.backlog_at_open and config.mqtt.enabled:
        log.info(
            "%d verdict(s) from an earlier run wait in the outbox %s; they are sent first",
            outbox.backlog_at_open,
            outbox.path,
        )
    elif outbox.backlog_at_open:
        log.warning(
            "%d verdict(s) from an earlier run wait in the outbox %s but mqtt.enabled is false",
            outbox.backlog_at_open,
            outbox.path,
        )
    return outbox


class EdgeDaemon:
    """The wired stages; `run()` inspects until the source ends, max_frames is reached or `stop` is set."""

    def __init__(
        self,
        config: EdgeConfig,
        *,
        headless: bool = False,
        verdict_log: Path | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.config = config
        self._station_name = StationName.of(config.station)  # the same in every verdict: built once
        self.stop = stop or threading.Event()
        self.health = Health()
        self.summary = RunSummary(self.health.counts)
        self._headless = headless
        self._verdict_log_path = verdict_log
        self._triggers: queue.Queue[PendingTrigger] = queue.Queue(maxsize=config.trigger.queue_size)
        self._claims = FrameClaims()
        # The last inspection made in trigger mode, for the triggers that share its frame.
        self._last_inspection: tuple[Frame, Scorer, float, Inspection] | None = None
        # Set in run(); None until then (and for the parts that are switched off).
        self.live: LiveModel | None = None  # the model and threshold in force; cmd/reload and cmd/threshold change them
        self._bundle_watch: BundleWatch | None = None  # swaps in what `install-model` installs
        # systemd (Type=notify): READY=1 once inspecting, WATCHDOG=1 from this loop only (see notify.py).
        self._notifier = SystemdNotifier()
        self._watchdog = Watchdog(self._notifier, watchdog_interval_s())
        self.inspector: Inspector | None = None
        self.capture: Capture | None = None
        self.publisher: VerdictPublisher | None = None
        self.images: ImageStore | None = None
        self.window: OverlayWindow | None = None
        self._outbox: Outbox | None = None
        self._log_file: IO[str] | None = None
        self._last_logged: dict[str, float] = {}
        self._fps: float | None = None
        self._last_shown: float | None = None
        self._last_window_frame: np.ndarray | None = None
        self._next_health = time.monotonic() + config.health.interval_s
        self._disk_full_since: float | None = None  # monotonic time the outbox first had no room; None when it has
        self._unstored = 0  # results the outbox had no room for, this run
        self._last_disk_log = float("-inf")

    # -- the MQTT command handler's entry point (issue 6) ----------------------------------
    def accept_trigger(self, request: TriggerRequest) -> str | None:
        """Queue a trigger for the loop; None when accepted, else why not (for the command's reply)."""
        if self.config.trigger.mode != "mqtt":
            return (
                "this station inspects continuously (trigger.mode: continuous): every frame is scored; "
                "set trigger.mode: mqtt to inspect on triggers"
            )
        if self.stop.is_set():
            return "the daemon is stopping"
        if self._triggers.full():  # this thread is the only producer: full now is full at put
            return f"trigger queue full ({self.config.trigger.queue_size} waiting)"
        self._triggers.put_nowait(self._claims.claim(request))
        return None

    # -- start-up and shut-down -------------------------------------------------------------
    def run(self) -> RunSummary:
        config = self.config
        with ExitStack() as stack:
            # First, so that a signal during start-up (a slow model load, a broker wait) is a clean stop too.
            stack.enter_context(stop_on_signals(self.stop))
            stack.callback(self._notifier.close)
            scorer = load_current_or_previous(config.model)
            self.inspector = Inspector(config.inspection)
            self.inspector.check(scorer.manifest)
            # A reloaded model the ROI and tiles do not suit is refused; the running one keeps scoring.
            inspector = self.inspector
            self.live = LiveModel(scorer, config, check_model=lambda new: inspector.check(new.manifest))
            self._bundle_watch = BundleWatch(self.live, config.model.bundle)
            stack.callback(self._bundle_watch.close)
            show_window = window_wanted(config, self._headless)
            reader = open_source(config.source)
            stack.callback(reader.close)
            images = None
            if config.images.save != "none" or config.images.ok_sample_every:
                images = ImageStore(config.data.dir, config.images)
                images.free_space()  # before the outbox opens: on a full disk it needs room for its journal
            self._outbox = _open_outbox(config)
            stack.callback(self._outbox.close)
            if config.mqtt.enabled:
                self.publisher = VerdictPublisher(config.mqtt, config.station, self._outbox, read_password(config.mqtt))
                # cmd/trigger, cmd/reload and cmd/threshold; a trigger goes to accept_trigger's queue.
                remote = RemoteCommands(config, self.live, self.accept_trigger, self.publisher.publish_result)
                self.publisher.start(on_command=remote.handle if config.mqtt.commands.enabled else None, stop=self.stop)
                stack.callback(self._close_publisher)
                # Unwound first: a reload under way finishes and its answer goes out before the publisher closes.
                stack.callback(remote.close)
            else:
                log.info("mqtt.enabled is false: verdicts are logged, not published")
            if images is not None:
                self.images = images
                self.images.start()
                stack.callback(self._count_images)  # after close: the writer's last jobs are counted too
                stack.callback(self.images.close)
            if self._verdict_log_path is not None:
                self._verdict_log_path.parent.mkdir(parents=True, exist_ok=True)
                self._log_file = stack.enter_context(open(self._verdict_log_path, "a", encoding="utf-8"))
            if show_window:
                self.window = OverlayWindow(config.display.heatmap, snapshot_dir=config.data.dir / "snapshots")
                stack.callback(self.window.close)
            continuous = config.trigger.mode == "continuous"
            self.capture = Capture(
                reader,
                config.source,
                delivery_for(config.source, reader, continuous),
                self.stop,
                on_frame=None if continuous else self._claims.offer,
            )
            self.capture.start()
            stack.callback(self.capture.close)
            log.info(
                "inspecting %s (%s, delivery %s), trigger mode %s, tiling %s",
                reader.name,
                "live" if reader.live else "file",
                self.capture.delivery,
                config.trigger.mode,
                config.inspection.tiling,
            )
            self._notifier.ready(f"inspecting {reader.name} with {scorer.manifest.name}")
            stack.callback(self._notifier.stopping)  # unwound first: systemd hears of the stop at once
            self._loop()
            self._report_health()
        return self.summary

    def _close_publisher(self) -> None:
        assert self.publisher is not None
        self.summary.delivery = self.publisher.close()

    # -- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        max_frames = self.config.run.max_frames
        next_due = time.monotonic()
        min_interval = 1.0 / self.config.source.max_fps if self.config.source.max_fps else 0.0
        continuous = self.config.trigger.mode == "continuous"
        while True:
            if continuous and min_interval:
                # At most max_fps results a second; the waits stay short so signals and keys are prompt.
                while not self.stop.is_set() and time.monotonic() < next_due:
                    self._idle(min(_TICK_S, next_due - time.monotonic()))
                next_due = max(next_due + min_interval, time.monotonic())
            if self.stop.is_set():
                self.summary.stopped_by = "signal or quit key"
                return
            if max_frames is not None and self.summary.frames >= max_frames:
                self.summary.stopped_by = f"max_frames {max_frames}"
                return
            work = self._next_continuous() if continuous else self._next_triggered()
            if isinstance(work, _EndOfSource):
                self.summary.stopped_by = "end of source"
                return
            if work is not None:
                self._process(work)

    def _idle(self, seconds: float) -> None:
        """Wait a little while keeping the window, the stop event and the health report alive."""
        if self.window is not None and not self.window.poll():
            self.stop.set()
        self._housekeeping()
        self.stop.wait(max(0.0, seconds))

    def _wait_for_frame(self, deadline: float) -> Frame | _EndOfSource | None:
        """The next frame before `deadline`; None if none came."""
        assert self.capture is not None
        while not self.stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            frame = self.capture.get(min(_TICK_S, remaining))
            if frame is None:
                if self.capture.ended:
                    return END_OF_SOURCE
                self._idle(0.0)
                continue
            return frame
        return None

    def _next_continuous(self) -> Work | _EndOfSource | None:
        """Every frame (files) or the latest (cameras); UNDEFINED for stale frames and for a silent live source."""
        assert self.capture is not None
        stale_after = self.config.source.stale_after_s
        name = self.capture.name
        got = self._wait_for_frame(time.monotonic() + stale_after)
        if isinstance(got, _EndOfSource):
            return got
        if got is None:
            if self.stop.is_set() or not self.capture.live:
                return None  # a file is never late: it only ends
            return Work(
                f"{name}:stalled",
                None,
                undefined_reason=(f"no frame from {name} for {stale_after:g} s (source state {self.capture.state})"),
            )
        return self._work_for(got, f"{name}:{got.index}")

    def _next_triggered(self) -> Work | _EndOfSource | None:
        """The frame bound to the next trigger, or UNDEFINED when none was captured in trigger.frame_timeout_s."""
        assert self.capture is not None
        # Frames reach triggers through the claims; the capture's own queue is only emptied here, so that
        # `every_frame` delivery does not stall the capture and `ended` can become true.
        while self.capture.get(0.0) is not None:
            pass
        try:
            pending = self._triggers.get(timeout=_TICK_S)
        except queue.Empty:
            if self.capture.ended:
                return END_OF_SOURCE
            self._idle(0.0)
            return None
        request = pending.request
        timeout = self.config.trigger.frame_timeout_s
        deadline = max(request.received_at, time.monotonic()) + timeout
        frame = self._claims.wait(pending, 0.0)
        ended = False
        while frame is None and not self.stop.is_set():
            while self.capture.get(0.0) is not None:
                pass
            ended = self.capture.ended
            remaining = deadline - time.monotonic()
            if ended or remaining <= 0:
                break
            frame = self._claims.wait(pending, min(_TICK_S, remaining))
            if frame is None:
                self._idle(0.0)
        if frame is None:
            self._claims.cancel(pending)
            why = (
                "the source has ended"
                if ended
                else (
                    "the daemon is stopping"
                    if self.stop.is_set()
                    else f"no frame captured within {timeout:g} s after the trigger (source state {self.capture.state})"
                )
            )
            return Work(request.part_id, None, trigger_id=request.trigger_id, undefined_reason=why)
        return self._work_for(frame, request.part_id, request.trigger_id)

    def _work_for(self, frame: Frame, part_id: str, trigger_id: str | None = None) -> Work:
        assert self.capture is not None
        age = time.monotonic() - frame.captured_mono
        limit = self.config.source.stale_after_s
        # Only a live source has a "now" for a frame to fall behind (see source.py).
        if self.capture.live and age > limit:
            self.health.note_stale()
            return Work(
                part_id,
                frame,
                trigger_id,
                undefined_reason=f"stale frame: {age:.2f} s old (source.stale_after_s {limit:g})",
            )
        return Work(part_id, frame, trigger_id)

    # -- one result ---------------------------------------------------------------------------
    def _process(self, work: Work) -> None:
        assert self._outbox is not None and self.live is not None
        started = time.perf_counter()
        frame = work.frame
        capture_age_ms = (time.monotonic() - frame.captured_mono) * 1000.0 if frame is not None else None
        now = self.live.in_force()  # one (model, threshold) pair per frame: commands change it between frames
        inspection, reason = self._inspect(work, now.scorer, now.threshold)
        score = inspection.score if inspection is not None else None
        shown = Shown(
            inspection=inspection,
            evaluation=judge(None if score is None else score.score, now.threshold, undefined=reason),
            score=None if score is None else finite_or_none(score.score),
            threshold=now.threshold,
        )
        result_id = str(uuid.uuid4())
        overlay_ms, window_image = self._draw_window(work, shown)
        image_path = self._queue_image(work, result_id, shown)
        verdict = Verdict(
            seq=self._outbox.next_seq(),
            result_id=result_id,
            part_id=work.part_id,
            trigger_id=work.trigger_id,
            station=self._station_name,
            captured_at=utc_iso(frame.captured_at if frame is not None else datetime.now(timezone.utc)),
            published_at=utc_iso(datetime.now(timezone.utc)),
            evaluation=shown.evaluation,
            score=shown.score,
            threshold=ThresholdUsed(value=now.threshold, source=now.threshold_source),
            model=ModelUsed.of(now.scorer.manifest, now.scorer.model_file),
            processing_ms=Timings(
                capture_age=capture_age_ms,
                preprocess=None if score is None else score.preprocess_ms,
                inference=None if score is None else score.inference_ms,
                overlay=overlay_ms,
                total=(time.perf_counter() - started) * 1000.0,
            ),
            heatmap_peak=None if score is None else HeatmapPeak.of(score),
            image_path=image_path,
        )
        publish_ms, delivered = self._deliver(verdict)
        if delivered is not verdict:  # unstored, so UNDEFINED: the operator sees what the MES gets
            shown = replace(shown, evaluation=delivered.evaluation)
            if window_image is not None and self._last_window_frame is not None:
                window_image = self._window_image(self._last_window_frame, shown)
        self.summary.add_latency(delivered.processing_ms.total)
        self.health.record(delivered.evaluation.state, {**delivered.processing_ms.model_dump(), "publish": publish_ms})
        _log_verdict(delivered, self._last_logged)
        if self.window is not None and window_image is not None and not self.window.show(window_image):
            self.stop.set()
        self._housekeeping()

    def _inspect(self, work: Work, scorer: Scorer, threshold: float) -> tuple[Inspection | None, str | None]:
        if work.frame is None or work.undefined_reason is not None:
            return None, work.undefined_reason
        assert self.inspector is not None
        last = self._last_inspection
        if last is not None and last[0] is work.frame and last[1] is scorer and last[2] == threshold:
            # Another trigger bound to the same frame: same frame, model and threshold give the same result.
            # No preprocessing or inference ran for this verdict, and its timings say so.
            inspection = last[3]
            score = replace(inspection.score, preprocess_ms=0.0, inference_ms=0.0)
            return replace(inspection, score=score), None
        try:
            inspection = self.inspector.inspect(work.frame.image, scorer, threshold)
            if self.config.trigger.mode == "mqtt":
                self._last_inspection = (work.frame, scorer, threshold, inspection)
            return inspection, None
        except Exception as exc:
            self.health.note_error()
            log.error(
                "inspecting %s failed: %s", work.part_id, first_line(exc, with_type=True), exc_info=log.isEnabledFor(10)
            )
            return None, f"inference failed: {first_line(exc, with_type=True)}"

    def _render(
        self, image: np.ndarray, shown: Shown, *, show_heatmap: bool = True, status: StatusLine | None = None
    ) -> np.ndarray:
        inspection = shown.inspection
        roi = inspection.roi if inspection is not None else None
        return render_overlay(
            image,
            inspection.score.heatmap if inspection is not None else None,
            shown.evaluation.state,
            shown.score,
            shown.threshold,
            fps=self._fps,
            show_heatmap=show_heatmap,
            status=status,
            roi=None if roi is None else (roi.x, roi.y, roi.width, roi.height),
        )

    def _window_image(self, image: np.ndarray, shown: Shown) -> np.ndarray:
        assert self.window is not None
        status = self._status_line(shown.evaluation.state)
        return self._render(image, shown, show_heatmap=self.window.show_heatmap, status=status)

    def _draw_window(self, work: Work, shown: Shown) -> tuple[float | None, np.ndarray | None]:
        if self.window is None:
            return None, None
        if work.frame is not None:
            self._last_window_frame = work.frame.image
        elif self._last_window_frame is None:
            return None, None
        # Without a frame (a silent camera) the last one is shown again under the grey UNDEFINED banner.
        t0 = time.perf_counter()
        now = time.monotonic()
        if self._last_shown is not None:  # the first frame has no interval to measure
            instant = 1.0 / max(now - self._last_shown, 1e-6)
            self._fps = instant if self._fps is None else 0.9 * self._fps + 0.1 * instant
        self._last_shown = now
        image = self._window_image(self._last_window_frame, shown)
        return (time.perf_counter() - t0) * 1000.0, image

    def _status_line(self, current: ResultState) -> StatusLine:
        """The counts include the result on screen (`current`), which is counted a moment later."""
        counts = self.health.counts
        broker = "disabled" if self.publisher is None else ("online" if self.publisher.online else "offline")
        camera = self.capture.state if self.capture is not None else "?"
        station = self.config.station
        return StatusLine(
            station=f"{station.line}/{station.station}",
            ok=counts.ok + (current == "OK"),
            ng=counts.ng + (current == "NG"),
            undefined=counts.undefined + (current == "UNDEFINED"),
            camera=camera,
            broker=broker,
        )

    def _queue_image(self, work: Work, result_id: str, shown: Shown) -> str | None:
        if self.images is None or work.frame is None or not self.images.wanted(shown.evaluation.state):
            return None
        image = work.frame.image
        day = work.frame.captured_at.strftime("%Y-%m-%d")
        path = self.images.offer(result_id, day, lambda: self._render(image, shown))
        return None if path is None else str(path)

    def _deliver(self, verdict: Verdict) -> tuple[float, Verdict]:
        """Commit to the outbox (and so to MQTT), then the verdict log; (milliseconds, the verdict as delivered:
        UNDEFINED when the outbox had no room for it)."""
        assert self._outbox is not None
        t0 = time.perf_counter()
        text = verdict.json_text()  # serialised once: stored, logged and (from the outbox) sent
        if self.publisher is not None:
            try:
                self.publisher.submit(verdict.seq, verdict.result_id, text)  # on disk when this returns
                self._disk_has_room()
            except OutboxFull as exc:
                self._disk_full(exc, "results are UNDEFINED and sent unstored while the outbox has no room")
                verdict = verdict.unstored()
                text = verdict.json_text()
                if not self.publisher.publish_unstored(verdict):
                    log.debug("unstored verdict seq %d not sent: the broker is offline", verdict.seq)
        else:
            try:
                self._outbox.note_seq(verdict.seq)
                self._disk_has_room()
            except OutboxError as exc:  # nothing to keep but the counter: the result is logged, the line goes on
                self._disk_full(exc, "seq is counted in memory only (it may repeat after a restart)")
        if self._log_file is not None:
            try:
                self._log_file.write(text + "\n")
                self._log_file.flush()
            except OSError as exc:
                self._disk_full(exc, f"the verdict log {self._verdict_log_path} misses results")
        return (time.perf_counter() - t0) * 1000.0, verdict

    def _disk_full(self, exc: Exception, consequence: str) -> None:
        if self.images is not None:
            self.images.make_room()  # NG images give way to the outbox
        now = time.monotonic()
        if self._disk_full_since is None:
            self._disk_full_since = now
        self._unstored += 1
        if now - self._last_disk_log >= _DISK_FULL_LOG_INTERVAL_S:
            self._last_disk_log = now
            log.error(
                "data disk full (%s): %s (%d result(s) so far); inspection goes on, and all is back by itself "
                "when space returns",
                exc,
                consequence,
                self._unstored,
            )

    def _disk_has_room(self) -> None:
        if self._disk_full_since is not None:
            log.warning(
                "data disk has room again: verdicts are stored and sent as before (%d result(s) in %.0f s met "
                "the full disk)",
                self._unstored,
                time.monotonic() - self._disk_full_since,
            )
            self._disk_full_since = None
            self._last_disk_log = float("-inf")

    # -- health -------------------------------------------------------------------------------
    def _housekeeping(self) -> None:
        """Once per loop turn, on the loop's own thread: a loop that hangs stops the watchdog pings."""
        self._watchdog.beat()
        if self._bundle_watch is not None:
            self._bundle_watch.poll()
        if time.monotonic() >= self._next_health:
            self._next_health = time.monotonic() + self.config.health.interval_s
            self._report_health()

    def metrics(self) -> dict[str, Any]:
        """The health report now (`schemas/metrics.schema.json`); resets the interval's frame rate."""
        assert self.live is not None
        scorer = self.live.scorer
        camera: dict[str, Any] = {
            "state": "not started",
            "captured_frames": 0,
            "skipped_frames": 0,
            "reconnects": 0,
            "last_frame_age_s": None,
        }
        if self.capture is not None:
            stats = self.capture.stats()
            self.summary.skipped = stats.skipped
            camera = {
                "state": stats.state,
                "captured_frames": stats.captured,
                "skipped_frames": stats.skipped,
                "reconnects": stats.reconnects,
                "last_frame_age_s": None if stats.last_frame_age_s is None else round(stats.last_frame_age_s, 3),
            }
        images: dict[str, int] | None = None
        if self.images is not None:
            st = self._count_images()
            images = {
                "saved": st.saved,
                "dropped_queue_full": st.dropped_queue_full,
                "dropped_disk_full": st.dropped_disk_full,
                "failed": st.failed,
                "deleted": st.deleted,
                "kept": st.kept,
                "kept_bytes": st.kept_bytes,
            }
        station = self.config.station
        return self.health.report(
            {
                "station": {"site": station.site, "line": station.line, "station": station.station},
                "camera": camera,
                "model": {
                    "name": scorer.manifest.name,
                    "sha256": scorer.model_file.sha256,
                    "precision": scorer.model_file.precision,
                },
                "trigger": {"mode": self.config.trigger.mode, "waiting": self._triggers.qsize()},
                "disk_free_bytes": shutil.disk_usage(self.config.data.dir).free,
                "images": images,
                "broker": "disabled" if self.publisher is None else ("online" if self.publisher.online else "offline"),
                "outbox_backlog": self.publisher.report().backlog if self.publisher is not None else None,
            }
        )

    def _count_images(self) -> StoreStats:
        """The image store's counters, copied into the run summary."""
        assert self.images is not None
        st = self.images.stats()
        self.summary.images_saved, self.summary.images_dropped = st.saved, st.dropped_queue_full + st.dropped_disk_full
        return st

    def _report_health(self) -> None:
        try:
            metrics = self.metrics()
        except Exception:
            log.exception("health report failed")
            return
        line = log_line(metrics)
        log.info(line)
        self._notifier.status(line)
        if self.publisher is not None and self.config.health.publish:
            self.publisher.publish_metrics(metrics)


def run_edge(
    config: EdgeConfig, *, headless: bool = False, verdict_log: Path | None = None, stop: threading.Event | None = None
) -> RunSummary:
    """Inspect until the source ends, max_frames is reached or `stop` is set; return the summary."""
    return EdgeDaemon(config, headless=headless, verdict_log=verdict_log, stop=stop).run()
