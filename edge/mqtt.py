"""Verdicts over MQTT (paho-mqtt 2.x): topics and the publisher (the payload is `ganspect.edge.verdict`).

Topic tree (prefix from the config, then the plant hierarchy; `docs/mqtt.md` has it all):

- `<prefix>/<site>/<line>/<station>/verdict`: one JSON verdict per part, QoS 1 (or 2),
  not retained; the payload is documented by `schemas/verdict.schema.json`.
- `<prefix>/<site>/<line>/<station>/status`: retained `online` while connected,
  `stopped` after a clean exit, and `offline` (the last will) when the daemon dies or
  loses its connection without saying goodbye.
- `<prefix>/<site>/<line>/<station>/cmd/+`: commands, subscribed to on every (re)connect
  and handed to `remote.RemoteCommands` (untrusted input: it validates them); their
  answers go to `.../cmd/result` (QoS 1, not retained), which the daemon itself ignores.
- `<prefix>/<site>/<line>/<station>/metrics`: the periodic health report, QoS 1, not
  retained (`schemas/metrics.schema.json`); sent only while connected, never spooled.

Delivery: every verdict goes through the disk outbox (`outbox.Outbox`). The main loop
commits it there; a sender thread hands rows to paho in seq order, at most
`mqtt.max_inflight` unacknowledged at a time and only while the connection is *ready*;
the broker's PUBACK (paho's `on_publish`) deletes the row. Rows that waited for a
connection (an outage, or an earlier run) are sent with `replayed: true`.

"Ready" is the acknowledgement of the retained `online` status that `on_connect`
publishes. paho resends the messages that were in flight when a connection broke right
after `on_connect` returns, on its network thread; the `online` ack is read after that,
so waiting for it keeps those resends ahead of anything newer and the broker sees the
verdicts in seq order.

Start-up: the connection is made in the background (`connect_async`) and paho
reconnects with back-off, so the daemon inspects without a broker; its verdicts wait on
disk. `mqtt.require_broker: true` turns a broker that does not answer within
`connect_timeout_s` into an error (for commissioning); a broker that *refuses* the
connection (bad credentials, a banned client id) is always an error at start-up.

Acknowledgements: paho numbers every message it sends (verdicts, status, command
answers) from one counter, and the broker's acknowledgement of a message published from
another thread can be read before `publish()` has returned its id. Status and answers
are published through `_publish_other`, which registers their ids; an ack read while
such a publish is under way is held until its id is known, so only verdict acks ever
reach the outbox (where an unknown id is parked for the `mark_sent` that follows).

Security: `mqtt.tls` makes the connection TLS, always verifying the broker's certificate
(against `ca_file` or the system's CAs, host name included) and presenting a client
certificate when one is set; `mqtt.username` and the password (from the environment or
a file, never logged) authenticate the daemon. A failed TLS handshake never reaches a
CONNACK: paho only reports that the attempt failed, so `_Client` keeps the `ssl` error
and the TLS alerts paho logs, and a TLS problem that retrying cannot fix (an untrusted
certificate, a host name mismatch, a client certificate the broker wants or rejects) is
treated like a refusal.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import SecretStr

from ganspect.edge.common import utc_iso
from ganspect.edge.config import MqttConfig, StationConfig
from ganspect.edge.errors import GanspectError
from ganspect.edge.outbox import Outbox, OutboxError, Row
from ganspect.edge.tls import ssl_text, tls_context, tls_failure_of
from ganspect.edge.verdict import Verdict, stamped_for_sending

log = logging.getLogger(__name__)

STATUS_ONLINE = "online"
STATUS_OFFLINE = "offline"
STATUS_STOPPED = "stopped"
# paho's own in-flight limit leaves room for status messages beside max_inflight verdicts.
_STATUS_HEADROOM = 4
# MQTT v5 lets the client cap the packets the broker sends it (Maximum Packet Size); the broker drops
# a larger command instead of making the daemon read it. Commands between mqtt.commands.max_payload_bytes
# and this cap are read and answered 'too_large'.
_V5_MAX_PACKET_BYTES = 256 * 1024
_PROTOCOLS = {"v3.1.1": mqtt.MQTTv311, "v5": mqtt.MQTTv5}
_UNSUPPORTED_PROTOCOL = 132
_COMMAND_TRACEBACK_INTERVAL_S = 10.0
# A command arrives as (name, payload, retained, received_at: time.monotonic()).
CommandSink = Callable[[str, bytes, bool, float], None]
# CONNACK reason codes (MQTT 5 numbering; paho maps 3.1.1's 4 and 5 onto 134 and 135) that mean the
# broker did not accept the credentials.
_AUTH_REFUSALS = frozenset({134, 135, 140})  # Bad user name or password, Not authorized, Bad authentication method


class MqttError(GanspectError):
    """The broker refused or did not answer."""


class _Client(mqtt.Client):
    """paho's client, remembering why the last connection attempt failed (paho itself keeps only that it did)."""

    connect_error: OSError | None = None  # raised by the last TCP connect + TLS handshake
    read_error: str | None = None  # paho's last "failed to receive on socket" line since then

    def reconnect(self) -> mqtt.MQTTErrorCode:
        # Runs on the network thread, as do on_connect_fail and on_disconnect that read these.
        self.connect_error = None
        self.read_error = None
        try:
            return super().reconnect()
        except OSError as exc:  # ssl.SSLError is an OSError
            self.connect_error = exc
            raise


_AnyClient = TypeVar("_AnyClient", bound=mqtt.Client)


def configured_client(
    client_class: type[_AnyClient],
    config: MqttConfig,
    station: StationConfig,
    password: SecretStr | None,
    client_id_suffix: str = "",
) -> _AnyClient:
    """A paho client as the config says (client id, protocol, TLS, credentials): the daemon's and the doctor's.

    Raises ConfigError for TLS files that cannot be loaded.
    """
    client_id = config.client_id or f"ganspect-{station.site}-{station.line}-{station.station}"
    client = client_class(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id + client_id_suffix,
        protocol=_PROTOCOLS[config.protocol],
    )
    if config.tls.enabled:
        client.tls_set_context(tls_context(config.tls))
    if config.username:
        client.username_pw_set(config.username, password.get_secret_value() if password else None)
    return client


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def topic_base(prefix: str, station: StationConfig) -> str:
    return f"{prefix}/{station.site}/{station.line}/{station.station}"


@dataclass(frozen=True)
class DeliveryReport:
    queued: int  # verdicts made in this run and committed to the outbox
    acknowledged: int  # verdicts the broker acknowledged in this run (earlier runs' backlog included)
    replayed: int  # sends marked replayed (waited for a connection or for this start)
    dropped: int  # verdicts discarded by the outbox quota
    backlog: int  # verdicts still on disk, sent at the next start
    backlog_at_start: int  # verdicts an earlier run left on disk
    outbox: Path


class VerdictPublisher:
    """One paho client per daemon: status with a last will, verdicts from the disk outbox at QoS 1."""

    def __init__(
        self, config: MqttConfig, station: StationConfig, outbox: Outbox, password: SecretStr | None = None
    ) -> None:
        self._config = config
        self._outbox = outbox
        base = topic_base(config.prefix, station)
        self.verdict_topic = f"{base}/verdict"
        self.status_topic = f"{base}/status"
        self.command_prefix = f"{base}/cmd/"
        self.result_topic = f"{base}/cmd/result"
        self.metrics_topic = f"{base}/metrics"
        self._client = configured_client(_Client, config, station, password)
        if config.username and not config.tls.enabled and not _is_loopback(config.host):
            log.warning("MQTT: the password for %s travels unencrypted; set mqtt.tls.enabled: true", self.where)
        self._client.will_set(self.status_topic, STATUS_OFFLINE, qos=1, retain=True)
        self._client.reconnect_delay_set(min_delay=1, max_delay=max(1, round(config.reconnect_max_delay_s)))
        self._client.max_inflight_messages_set(config.max_inflight + _STATUS_HEADROOM)
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_log = self._on_log
        self._on_command: CommandSink | None = None  # set by start(); None = not subscribed
        self._last_command_traceback = float("-inf")
        self._lock = threading.Lock()  # guards the fields below; never held while calling paho
        self._connected = threading.Event()  # CONNACK accepted
        self._ready = threading.Event()  # ... and the `online` status acknowledged (see the module docstring)
        self._was_ready = False  # ready at least once in this run
        self._online_mid: int | None = None
        self._status_mids: set[int] = set()
        self._other_mids: set[int] = set()  # status and command answers published by _publish_other, not yet acked
        self._other_publishing = 0  # _publish_other calls under way
        self._held_acks: list[tuple[int, Any]] = []  # acks read meanwhile: theirs, or verdicts' (see the docstring)
        self._answers_dropped = 0
        self._subscribe_mid: int | None = None
        self._refused: str | None = None
        self._refused_code: int | None = None
        self._tls_failure: str | None = None  # a TLS problem that retrying cannot fix (see _tls_failure_of)
        self._last_failure: str | None = None
        self._starting = False  # start() is waiting: it reports a refusal or TLS failure itself, as the error
        self._replay_up_to = 0  # rows with seq <= this waited for a connection: replayed
        self._cursor = 0  # the highest seq handed to paho by this process
        self._replayed = 0
        self._wake = threading.Event()
        self._stop_sender = threading.Event()
        self._sender = threading.Thread(target=self._send_loop, name="ganspect-outbox-sender", daemon=True)

    @property
    def where(self) -> str:
        return f"{self._config.host}:{self._config.port}"

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # -- paho callbacks: they run on the network thread and must never raise ------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        try:
            if reason_code.is_failure:
                self._refused = str(reason_code)
                self._refused_code = reason_code.value
                if not self._starting:
                    log.error("MQTT broker %s refused the connection: %s", self.where, reason_code)
                return
            self._refused = None
            self._tls_failure = None
            info = client.publish(self.status_topic, STATUS_ONLINE, qos=1, retain=True)
            with self._lock:
                # Its ack is read later on this same thread, so the id is known in time.
                self._status_mids.add(info.mid)
                self._online_mid = info.mid
            if self._on_command is not None:
                self._subscribe_commands(client)
            self._connected.set()
        except Exception:
            log.exception("MQTT on_connect failed")

    def _subscribe_commands(self, client: mqtt.Client) -> None:
        # A clean session forgets subscriptions: every (re)connect subscribes again. Under v5 noLocal keeps
        # our own cmd/result answers from coming back; under 3.1.1 _on_message skips them.
        topic = self.command_prefix + "+"
        if self._config.protocol == "v5":
            _, mid = client.subscribe(topic, options=SubscribeOptions(qos=1, noLocal=True))
        else:
            _, mid = client.subscribe(topic, qos=1)
        self._subscribe_mid = mid

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        try:
            failed = [code for code in reason_codes if code.is_failure]
            if mid == self._subscribe_mid and failed:
                log.error(
                    "MQTT broker %s refused the subscription to %s+ (%s): commands do not reach this "
                    "station; check the broker's ACL for this client",
                    self.where,
                    self.command_prefix,
                    failed[0],
                )
        except Exception:
            log.exception("MQTT on_subscribe failed")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        # Untrusted input on the network thread: nothing may escape (paho would end the thread and, with
        # it, the delivery of verdicts).
        try:
            sink = self._on_command
            topic = message.topic
            if sink is None or not topic.startswith(self.command_prefix) or topic == self.result_topic:
                return  # our own answers (3.1.1 has no noLocal), or nothing we subscribed to
            sink(topic[len(self.command_prefix) :], bytes(message.payload), bool(message.retain), time.monotonic())
        except Exception:
            # Whatever fails here, a flood of commands would make fail again: one traceback per interval.
            now = time.monotonic()
            if now - self._last_command_traceback >= _COMMAND_TRACEBACK_INTERVAL_S:
                self._last_command_traceback = now
                log.exception(
                    "MQTT command handling failed; the daemon goes on (logged at most once per %g s)",
                    _COMMAND_TRACEBACK_INTERVAL_S,
                )

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        try:
            with self._lock:
                if mid in self._other_mids:
                    self._other_mids.discard(mid)
                    return
                if self._other_publishing and mid not in self._status_mids:
                    self._held_acks.append((mid, reason_code))
                    return
                is_status = mid in self._status_mids
                self._status_mids.discard(mid)
                became_ready = is_status and mid == self._online_mid and self._connected.is_set()
                if became_ready:
                    self._online_mid = None
                    # Whatever is on disk now waited for this connection.
                    self._replay_up_to = self._outbox.last_seq
            if became_ready:
                backlog = self._outbox.stats().backlog
                log.info(
                    "MQTT connected to %s; verdicts go to %s%s",
                    self.where,
                    self.verdict_topic,
                    f" ({backlog} waiting in the outbox are sent first)" if backlog else "",
                )
                self._ready.set()
                self._was_ready = True
            elif not is_status:
                self._verdict_acked(mid, reason_code)
            self._wake.set()
        except OutboxError as exc:  # the disk (full, read-only): the row stays and is sent again; no traceback
            log.error("MQTT: recording the acknowledgement of message %s failed: %s", mid, exc)
        except Exception:
            log.exception("MQTT on_publish bookkeeping failed for message %s", mid)

    def _verdict_acked(self, mid: int, reason_code: Any) -> None:
        if reason_code is not None and getattr(reason_code, "is_failure", False):
            # An MQTT 5 broker may refuse a message in its PUBACK: the row stays on disk.
            log.error(
                "MQTT broker %s refused a verdict (%s); it stays in the outbox until the next start",
                self.where,
                reason_code,
            )
            self._outbox.release(mid)
        else:
            self._outbox.acked(mid)

    def _publish_other(self, topic: str, payload: str, *, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Publish a status or an answer at QoS 1 from any thread, keeping its ack away from the outbox."""
        with self._lock:
            self._other_publishing += 1
        info: mqtt.MQTTMessageInfo | None = None
        try:
            info = self._client.publish(topic, payload, qos=1, retain=retain)
            return info
        finally:
            with self._lock:
                self._other_publishing -= 1
                if info is not None and info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                    held_mids = [mid for mid, _ in self._held_acks]
                    if info.mid in held_mids:  # acknowledged before publish() returned
                        del self._held_acks[held_mids.index(info.mid)]
                    else:
                        self._other_mids.add(info.mid)
                release = self._held_acks if not self._other_publishing else []
                if release:
                    self._held_acks = []
            for mid, reason_code in release:
                self._verdict_acked(mid, reason_code)
            if release:
                self._wake.set()

    def publish_result(self, text: str) -> bool:
        """Send a command's answer on cmd/result (QoS 1, not retained); False when dropped.

        At most `mqtt.commands.max_pending_results` answers wait for the broker's ack: a flood
        of commands cannot grow paho's queue without bound. The drops are counted and logged.
        """
        with self._lock:
            full = len(self._other_mids) >= self._config.commands.max_pending_results
            if full:
                self._answers_dropped += 1
                dropped = self._answers_dropped
        if full:
            if dropped == 1 or dropped % 1000 == 0:
                log.error(
                    "%d command answer(s) dropped: %d wait for the broker's acknowledgement already "
                    "(mqtt.commands.max_pending_results)",
                    dropped,
                    self._config.commands.max_pending_results,
                )
            return False
        info = self._publish_other(self.result_topic, text)
        return info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        try:
            error = self._client.connect_error
            if not self._note_tls_failure(tls_failure_of(error, None, self._config)):
                self._last_failure = ssl_text(error) if error else "no answer (connection refused or timed out)"
                if self._config.tls.enabled and isinstance(error, ConnectionResetError | ssl.SSLEOFError):
                    # A plain MQTT listener drops a TLS greeting; so may a broker that is going down.
                    self._last_failure += " during the TLS handshake: check that mqtt.port is the broker's TLS listener"
        except Exception:
            log.exception("MQTT on_connect_fail failed")

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, text: str) -> None:
        # paho logs a socket error it caught while reading, then reports a bare disconnect.
        if level == mqtt.MQTT_LOG_ERR and text.startswith("failed to receive on socket"):
            self._client.read_error = text

    def _note_tls_failure(self, failure: str | None) -> bool:
        """Record a TLS failure; log it at ERROR when it is new (paho retries with back-off). True if one."""
        if failure is None:
            return False
        if failure != self._tls_failure and not self._starting:
            log.error("MQTT broker %s: TLS: %s (retrying with back-off)", self.where, failure)
        self._tls_failure = failure
        return True

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        try:
            was_ready = self._ready.is_set()
            if not self._connected.is_set():  # ended before a CONNACK: perhaps the broker rejected our certificate
                self._note_tls_failure(tls_failure_of(None, self._client.read_error, self._config))
            self._ready.clear()
            self._connected.clear()
            if was_ready and reason_code.is_failure:
                log.warning(
                    "MQTT connection to %s lost (%s): verdicts wait in the outbox until it is back",
                    self.where,
                    reason_code,
                )
        except Exception:
            log.exception("MQTT on_disconnect failed")

    # -- the sender thread ---------------------------------------------------------------
    def _send_loop(self) -> None:
        while not self._stop_sender.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                self._send_ready_rows()
            except OutboxError as exc:  # the disk: say what, without a traceback, and try again
                log.error("sending verdicts from the outbox failed: %s; retrying", exc)
                self._stop_sender.wait(1.0)
            except Exception:
                log.exception("sending verdicts from the outbox failed; retrying")
                self._stop_sender.wait(1.0)

    def _send_ready_rows(self) -> None:
        while self._ready.is_set() and not self._stop_sender.is_set():
            room = self._config.max_inflight - self._outbox.inflight()
            if room <= 0:
                return  # an ack wakes us
            rows = self._outbox.pending(self._cursor, room)
            if not rows:
                return
            for row in rows:
                if not self._ready.is_set() or not self._send(row):
                    return

    def _send(self, row: Row) -> bool:
        replayed = row.seq <= self._replay_up_to
        text = stamped_for_sending(row.payload, replayed=replayed)
        info = self._client.publish(self.verdict_topic, text, qos=self._config.qos)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.error(
                "verdict seq %d not handed to MQTT (%s); it stays in the outbox", row.seq, mqtt.error_string(info.rc)
            )
            return False
        # NO_CONN: the connection broke a moment ago; paho keeps the message and sends it on reconnect.
        self._outbox.mark_sent(row.seq, info.mid)
        self._cursor = row.seq
        self._replayed += replayed
        return True

    # -- the daemon's side -----------------------------------------------------------------
    def start(self, on_command: CommandSink | None = None, stop: threading.Event | None = None) -> None:
        """Connect in the background; wait up to connect_timeout_s for the broker (see the module docstring).

        A set `stop` (SIGTERM during start-up) ends the wait at once: the daemon is stopping anyway.

        With `on_command`, every (re)connect subscribes to `cmd/+` and each command is handed
        to it on paho's network thread: it must not block (see `remote.RemoteCommands`).
        """
        self._on_command = on_command
        self._starting = True
        properties: Properties | None = None
        if self._config.protocol == "v5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.MaximumPacketSize = max(_V5_MAX_PACKET_BYTES, 2 * self._config.commands.max_payload_bytes)
        try:
            self._client.connect_async(
                self._config.host, self._config.port, keepalive=self._config.keepalive, properties=properties
            )
        except (OSError, ValueError) as exc:
            raise MqttError(f"MQTT broker {self.where}: {exc}") from exc
        self._client.loop_start()
        self._sender.start()
        deadline = time.monotonic() + self._config.connect_timeout_s
        while not self._ready.wait(0.05):
            if self._refused or self._tls_failure or time.monotonic() > deadline or (stop and stop.is_set()):
                break
        self._starting = False
        if self._ready.is_set() or (stop is not None and stop.is_set()):
            return
        refused, tls_failure = self._refused, self._tls_failure
        if tls_failure:
            # Like a refusal, waiting does not mend a certificate: stop now, whatever require_broker says.
            self._shutdown_threads()
            raise MqttError(f"MQTT broker {self.where}: TLS: {tls_failure}")
        why = (
            f"refused the connection: {refused}"
            if refused
            else (
                f"did not answer within {self._config.connect_timeout_s:g} s"
                + (f" ({self._last_failure})" if self._last_failure else "")
            )
        )
        if self._config.require_broker or refused:
            self._shutdown_threads()
            hint = (
                self._refusal_hint()
                if refused
                else "check mqtt.host/mqtt.port and that the broker runs, or set mqtt.require_broker: false "
                "to inspect without it"
            )
            raise MqttError(f"MQTT broker {self.where} {why}; {hint}")
        log.warning(
            "MQTT broker %s %s: inspecting anyway; verdicts wait in the outbox %s until it answers",
            self.where,
            why,
            self._outbox.path,
        )

    def _refusal_hint(self) -> str:
        """What to check after a refused CONNACK: the credentials (naming where the password comes from)."""
        config = self._config
        if self._refused_code == _UNSUPPORTED_PROTOCOL and config.protocol == "v5":
            return "the broker does not speak MQTT v5: set mqtt.protocol: v3.1.1"
        if self._refused_code not in _AUTH_REFUSALS:
            return "check mqtt.client_id, mqtt.username and the broker's settings"
        if not config.username:
            return "the broker wants credentials: set mqtt.username and mqtt.password_env or mqtt.password_file"
        if config.password_env:
            source = f"the password in the environment variable {config.password_env} (mqtt.password_env)"
        elif config.password_file:
            source = f"the password in {config.password_file} (mqtt.password_file)"
        else:
            source = "the password (none is set: mqtt.password_env or mqtt.password_file)"
        return f"check mqtt.username ({config.username!r}) and {source}"

    def submit(self, seq: int, result_id: str, text: str) -> None:
        """Commit a verdict's `json_text()` to the outbox (durable when this returns); wake the sender."""
        self._outbox.put(seq, result_id, text)
        self._wake.set()

    def publish_unstored(self, verdict: Verdict) -> bool:
        """Send a verdict the outbox had no room for straight to the broker (QoS 1); False when not sent.

        Only while online: offline, paho would hold it in memory for as long as the outage lasts.
        It is not kept anywhere, so it is not resent after a restart, and it may overtake older
        verdicts still waiting in the outbox.
        """
        if not self._ready.is_set():
            return False
        sent = verdict.model_copy(update={"published_at": utc_iso(datetime.now(timezone.utc))})
        info = self._publish_other(self.verdict_topic, sent.json_text())
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    @property
    def online(self) -> bool:
        """Connected and sending (the `online` status acknowledged)."""
        return self._ready.is_set()

    def publish_metrics(self, payload: dict[str, Any]) -> bool:
        """Send one health report on .../metrics (QoS 1, not retained) while connected; False when not sent.

        Like a command's answer, its acknowledgement is kept away from the outbox
        (`_publish_other`). Reports are not spooled: one missed in an outage is replaced by the next.
        """
        if not self._ready.is_set():
            return False
        info = self._publish_other(self.metrics_topic, json.dumps(payload, separators=(",", ":")))
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def report(self) -> DeliveryReport:
        stats = self._outbox.stats()
        return DeliveryReport(
            queued=stats.queued,
            acknowledged=stats.acknowledged,
            replayed=self._replayed,
            dropped=stats.dropped,
            backlog=stats.backlog,
            backlog_at_start=self._outbox.backlog_at_open,
            outbox=self._outbox.path,
        )

    def close(self, stopped: bool = True) -> DeliveryReport:
        """Send what the outbox holds (up to drain_timeout_s, while connected), say `stopped`, disconnect.

        What the broker has not acknowledged stays on disk for the next start.
        """
        deadline = time.monotonic() + self._config.drain_timeout_s
        # A broker that answered in this run and is away for a moment (a restart) gets the rest of the
        # drain time to come back; one that never answered is not waited for.
        while (
            self._outbox.stats().backlog
            and time.monotonic() < deadline
            and (self._ready.is_set() or (self._was_ready and not (self._refused or self._tls_failure)))
        ):
            self._wake.set()
            time.sleep(0.02)
        self._stop_sender.set()
        self._wake.set()
        self._sender.join(timeout=5)
        report = self.report()
        if report.backlog:
            log.warning(
                "%d verdict(s) not yet acknowledged by the MQTT broker %s stay in the outbox %s and are "
                "sent at the next start",
                report.backlog,
                self.where,
                self._outbox.path,
            )
        if stopped and self._connected.is_set():
            info = self._publish_other(self.status_topic, STATUS_STOPPED, retain=True)
            # If the broker went away, its last will says offline, which is true enough.
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=min(2.0, max(0.1, deadline - time.monotonic() + 1.0)))
        # A clean DISCONNECT tells the broker not to send the last will.
        self._client.disconnect()
        self._client.loop_stop()
        return report

    def _shutdown_threads(self) -> None:
        self._stop_sender.set()
        self._wake.set()
        self._sender.join(timeout=5)
        self._client.loop_stop()
