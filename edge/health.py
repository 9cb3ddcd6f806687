"""Health: per-stage latency, counters and the periodic report (log line + MQTT `metrics` topic).

`Health` is fed by the scoring loop (one `record` per verdict, `note_*` for what did not
become one) and `report()` turns the last interval into one JSON object, documented by
`schemas/metrics.schema.json`. Its `counts` are the daemon's only verdict counters: the
run summary and the operator window read them too. Percentiles are over the most recent
frames only (a daemon runs for months); counters are totals since start, so a consumer
can difference them and a restart shows as a drop.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from ganspect.edge.verdict import ResultState

log = logging.getLogger(__name__)

METRICS_SCHEMA = "ganspect.metrics/1"
STAGES = ("capture_age", "preprocess", "inference", "overlay", "publish", "total")
_RECENT = 2000  # frames per percentile window


@dataclass
class VerdictCounts:
    """Verdicts made since start, by result state."""

    ok: int = 0
    ng: int = 0
    undefined: int = 0

    def add(self, state: ResultState) -> None:
        if state == "OK":
            self.ok += 1
        elif state == "NG":
            self.ng += 1
        else:
            self.undefined += 1

    @property
    def total(self) -> int:
        return self.ok + self.ng + self.undefined

    def by_state(self) -> dict[ResultState, int]:
        return {"OK": self.ok, "NG": self.ng, "UNDEFINED": self.undefined}


class Health:
    def __init__(self) -> None:
        self.started_mono = time.monotonic()
        self.counts = VerdictCounts()
        self._stages: dict[str, deque[float]] = {stage: deque(maxlen=_RECENT) for stage in STAGES}
        self._stale = 0
        self._errors = 0
        self._interval_start = time.monotonic()
        self._interval_start_total = 0

    def record(self, state: ResultState, timings_ms: Mapping[str, float | None]) -> None:
        """One verdict made; `timings_ms` by stage name (None: the stage did not run for it)."""
        self.counts.add(state)
        for stage, value in timings_ms.items():
            if value is not None and stage in self._stages:
                self._stages[stage].append(value)

    def note_stale(self) -> None:
        self._stale += 1

    def note_error(self) -> None:
        self._errors += 1

    def report(self, extra: dict[str, Any]) -> dict[str, Any]:
        """The metrics payload for the interval since the last report; `extra` adds the other parts' state."""
        now = time.monotonic()
        elapsed = max(now - self._interval_start, 1e-9)
        fps = (self.counts.total - self._interval_start_total) / elapsed
        self._interval_start, self._interval_start_total = now, self.counts.total
        latency: dict[str, dict[str, float] | None] = {}
        for stage, values in self._stages.items():
            if values:
                p50, p95, p99 = np.percentile(np.fromiter(values, float), [50, 95, 99])
                latency[stage] = {
                    "p50": round(float(p50), 3),
                    "p95": round(float(p95), 3),
                    "p99": round(float(p99), 3),
                    "max": round(max(values), 3),
                }
            else:
                latency[stage] = None
        return {
            "schema": METRICS_SCHEMA,
            "at": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "uptime_s": round(now - self.started_mono, 3),
            "interval_s": round(elapsed, 3),
            "fps": round(fps, 3),
            "results": self.counts.by_state(),
            "stale_frames": self._stale,
            "inference_errors": self._errors,
            "latency_ms": latency,
            **extra,
        }


def log_line(metrics: dict[str, Any]) -> str:
    """The report as one log line: what an engineer scanning the journal needs first."""
    total = metrics["latency_ms"]["total"]
    camera = metrics["camera"]
    parts = [
        f"{metrics['fps']:.1f} fps",
        "OK {OK} NG {NG} UNDEFINED {UNDEFINED}".format(**metrics["results"]),
        f"latency p50 {total['p50']:.1f} ms p95 {total['p95']:.1f} ms" if total else "no frames scored",
        f"camera {camera['state']} (skipped {camera['skipped_frames']}, reconnects {camera['reconnects']})",
        f"stale {metrics['stale_frames']}",
        f"disk free {metrics['disk_free_bytes'] / 2**30:.1f} GiB",
    ]
    if metrics.get("outbox_backlog") is not None:
        parts.append(f"outbox {metrics['outbox_backlog']}")
    return "health: " + ", ".join(parts)
