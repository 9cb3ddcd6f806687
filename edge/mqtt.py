"""Verdicts over MQTT (paho-mqtt 2.x): topics, the verdict payload, and the publisher.

Topic tree (prefix from the config, then the plant hierarchy):

- `<prefix>/<site>/<line>/<station>/verdict`: one JSON verdict per part, QoS 1 (or 2),
  not retained; the payload is documented by `schemas/verdict.schema.json`.
- `<prefix>/<site>/<line>/<station>/status`: retained `online` while connected,
  `stopped` after a clean exit, and `offline` (the last will) when the daemon dies or
  loses its connection without saying goodbye.

Start-up policy: with `mqtt.require_broker: true` (the default) a broker that does not
accept the connection within `connect_timeout_s` stops the daemon with an error, because
a station whose verdicts go nowhere is usually a wiring mistake. With `false` the
daemon starts anyway, logs that verdicts are not being delivered, and paho keeps them
in memory and sends them when the broker answers. The disk spool (SQLite outbox) is a
later addition behind the same `publish()` / `close()` interface.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import paho.mqtt.client as mqtt
from pydantic import SecretStr

from ganspect.edge.config import MqttConfig, StationConfig
from ganspect.edge.errors import GanspectError
from ganspect.edge.manifest import Manifest, ModelFile
from ganspect.edge.scorer import Score

log = logging.getLogger(__name__)

VERDICT_SCHEMA = "ganspect.verdict/1"
STATUS_ONLINE = "online"
STATUS_OFFLINE = "offline"
STATUS_STOPPED = "stopped"


class MqttError(GanspectError):
    """The broker refused or did not answer."""


def utc_iso(moment: datetime) -> str:
    """UTC ISO 8601 with milliseconds and a Z, e.g. 2024-05-01T08:30:00.123Z."""
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _finite_or_none(value: float) -> float | None:
    # JSON has no NaN or infinity; a non-finite score is published as null (and is NG).
    return value if value == value and abs(value) != float("inf") else None


def build_verdict(*, seq: int, station: StationConfig, part_id: str, captured_at: datetime, score: Score,
                  manifest: Manifest, model_file: ModelFile, total_ms: float) -> dict[str, Any]:
    """The verdict payload as a dict; `schemas/verdict.schema.json` documents every field."""
    return {
        "schema": VERDICT_SCHEMA,
        "seq": seq,
        "verdict_id": str(uuid.uuid4()),
        "station": {"site": station.site, "line": station.line, "station": station.station},
        "part_id": part_id,
        "captured_at": utc_iso(captured_at),
        "published_at": utc_iso(datetime.now(timezone.utc)),
        "result": score.result,
        "score": _finite_or_none(score.score),
        "threshold": score.threshold,
        "model": {
            "name": manifest.name,
            "kind": manifest.kind,
            "sha256": model_file.sha256,
            "precision": model_file.precision,
        },
        "latency_ms": {
            "preprocess": round(score.preprocess_ms, 3),
            "inference": round(score.inference_ms, 3),
            "total": round(total_ms, 3),
        },
        "heatmap_peak": {"x": score.peak_x, "y": score.peak_y, "value": _finite_or_none(score.peak_value)},
        "image_path": None,
    }


def topic_base(prefix: str, station: StationConfig) -> str:
    return f"{prefix}/{station.site}/{station.line}/{station.station}"


@dataclass(frozen=True)
class DeliveryReport:
    published: int  # verdicts handed to the client
    acknowledged: int  # verdicts the broker acknowledged (PUBACK / PUBCOMP)

    @property
    def undelivered(self) -> int:
        return self.published - self.acknowledged


class VerdictPublisher:
    """One paho client per daemon: status with a last will, verdicts at QoS 1, drained at exit."""

    def __init__(self, config: MqttConfig, station: StationConfig, password: SecretStr | None = None) -> None:
        self._config = config
        base = topic_base(config.prefix, station)
        self.verdict_topic = f"{base}/verdict"
        self.status_topic = f"{base}/status"
        client_id = config.client_id or f"ganspect-{station.site}-{station.line}-{station.station}"
        self._client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        if config.username:
            self._client.username_pw_set(config.username, password.get_secret_value() if password else None)
        self._client.will_set(self.status_topic, STATUS_OFFLINE, qos=1, retain=True)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._connected = threading.Event()
        self._refused: str | None = None
        self._last_failure: str | None = None
        self._client.on_publish = self._on_publish
        # Delivery bookkeeping by message id. The broker's ack can be handled on the
        # network thread before publish() has returned the id to us, so an ack for an id
        # we do not know yet is parked in _early and matched when publish() returns.
        # (MQTTMessageInfo.is_published() cannot be used: it raises for a message queued
        # while disconnected, even after paho delivered it on reconnect.)
        self._lock = threading.Lock()
        self._unacked: set[int] = set()
        self._early: set[int] = set()
        self._status_mids: set[int] = set()
        self._published = 0
        self._acknowledged = 0

    @property
    def where(self) -> str:
        return f"{self._config.host}:{self._config.port}"

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # paho callbacks run on the network thread.
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            log.error("MQTT broker %s refused the connection: %s", self.where, reason_code)
            return
        self._refused = None
        info = client.publish(self.status_topic, STATUS_ONLINE, qos=1, retain=True)
        with self._lock:
            # Its ack is handled later on this same thread, so the id is known in time.
            self._status_mids.add(info.mid)
        if not self._connected.is_set():
            log.info("MQTT connected to %s; verdicts go to %s", self.where, self.verdict_topic)
        self._connected.set()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._lock:
            if mid in self._status_mids:
                self._status_mids.discard(mid)
            elif mid in self._unacked:
                self._unacked.discard(mid)
                self._acknowledged += 1
            else:
                self._early.add(mid)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._last_failure = "no answer (connection refused or timed out)"

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        if self._connected.is_set():
            self._connected.clear()
            if reason_code.is_failure:
                log.warning("MQTT connection to %s lost (%s): verdicts are not being delivered until it is back",
                            self.where, reason_code)

    def start(self) -> None:
        """Connect in the background and wait up to connect_timeout_s for the broker."""
        try:
            self._client.connect_async(self._config.host, self._config.port, keepalive=self._config.keepalive)
        except (OSError, ValueError) as exc:
            raise MqttError(f"MQTT broker {self.where}: {exc}") from exc
        self._client.loop_start()
        deadline = time.monotonic() + self._config.connect_timeout_s
        while not self._connected.wait(0.05):
            if self._refused or time.monotonic() > deadline:
                break
        if self._connected.is_set():
            return
        why = f"refused the connection: {self._refused}" if self._refused else (
            f"did not answer within {self._config.connect_timeout_s:g} s"
            + (f" ({self._last_failure})" if self._last_failure else ""))
        if self._config.require_broker or self._refused:
            self._client.loop_stop()
            raise MqttError(f"MQTT broker {self.where} {why}; check mqtt.host/mqtt.port and that the broker runs, "
                            "or set mqtt.require_broker: false to inspect without it")
        log.warning("MQTT broker %s %s: inspecting anyway, verdicts are NOT being delivered until it answers",
                    self.where, why)

    def publish(self, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, separators=(",", ":"), allow_nan=False)
        info = self._client.publish(self.verdict_topic, data, qos=self._config.qos)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            # NO_CONN: paho keeps a QoS>0 message and sends it on reconnect; anything else is lost.
            log.error("verdict seq %s not queued for MQTT: %s", payload.get("seq"), mqtt.error_string(info.rc))
        with self._lock:
            self._published += 1
            if info.mid in self._early:
                self._early.discard(info.mid)
                self._acknowledged += 1
            else:
                self._unacked.add(info.mid)

    def report(self) -> DeliveryReport:
        with self._lock:
            return DeliveryReport(self._published, self._acknowledged)

    def close(self, stopped: bool = True) -> DeliveryReport:
        """Wait for the broker's acks (up to drain_timeout_s), say `stopped`, disconnect."""
        deadline = time.monotonic() + self._config.drain_timeout_s
        while self.report().undelivered and time.monotonic() < deadline:
            time.sleep(0.02)
        report = self.report()
        if report.undelivered:
            log.error("%d of %d verdicts were not acknowledged by the MQTT broker %s before exit",
                      report.undelivered, report.published, self.where)
        if stopped and self._connected.is_set():
            info = self._client.publish(self.status_topic, STATUS_STOPPED, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=min(2.0, max(0.1, deadline - time.monotonic() + 1.0)))
            except (RuntimeError, ValueError):
                pass  # the broker went away: its last will says offline, which is true enough
        # A clean DISCONNECT tells the broker not to send the last will.
        self._client.disconnect()
        self._client.loop_stop()
        return report
