"""Commands from the MES over MQTT: untrusted input, validated, bounded, and always answered.

Under `<prefix>/<site>/<line>/<station>/` the daemon takes `cmd/trigger`, `cmd/reload` and
`cmd/threshold` and answers every message on `cmd/result` (`docs/mqtt.md` has the contract).
A message goes through these checks in order, and the first that fails is its answer
(`code`, and a `reason` in words):

1. the command name, the last topic level: an allow-list (`unknown_command`), then
   `mqtt.commands.allow` (`not_allowed`);
2. not retained (`retained`): a retained command would run again at every reconnect;
3. the size, before reading it (`too_large`);
4. JSON (`malformed`) that fits the command's model (`invalid`): strict types, no unknown
   fields, ids of text an MES and a log viewer show as it is (no control, format, bidi or
   line-separator characters, no lone surrogates: `_UNSHOWABLE_RANGES`);
5. the station: the topic names it; a payload may name it too (`station`), and then it
   must be this one (`wrong_station`);
6. the rate of valid commands, a token bucket (`rate_limited`);
7. the command itself (`not_accepted`, `out_of_bounds`, `busy`, `bundle_refused`).

The payloads are pydantic models (`ganspect.edge.payloads`), the model and threshold in
force live in `ganspect.edge.live_model`; this module checks, dispatches and answers.

Threads: `RemoteCommands.handle` runs on paho's network thread and never blocks; a
reload loads and verifies the bundle on a worker thread and swaps it into `LiveModel`,
which the scoring loop reads once per frame, so a model change falls between frames.
Rejections are logged at WARNING at most once per `_REJECTION_LOG_INTERVAL_S` with a
count of the rest, so a flood cannot fill the journal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import ValidationError

from ganspect.edge.common import utc_iso
from ganspect.edge.config import EdgeConfig, StationConfig
from ganspect.edge.live_model import LiveModel
from ganspect.edge.payloads import (
    COMMANDS,
    RESULT_SCHEMA,
    SHOWN_NAME_CHARS,
    TEXT,
    CommandResult,
    ModelState,
    RejectCode,
    ReloadCommand,
    StationRef,
    ThresholdCommand,
    ThresholdState,
    TriggerCommand,
    printable,
)
from ganspect.edge.triggers import TriggerRequest

log = logging.getLogger(__name__)

_REJECTION_LOG_INTERVAL_S = 10.0
_REASON_CHARS = 300


class _TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; used from one thread (paho's network thread)."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def _id_of(payload: bytes, keys: tuple[str, ...]) -> str | None:
    """The command's id when the payload is a JSON object with a usable one; never raises."""
    try:
        document = json.loads(payload)
    except Exception:
        return None
    if not isinstance(document, dict):
        return None
    for key in keys:
        try:
            return TEXT.validate_python(document.get(key), strict=True)
        except ValidationError:
            continue
    return None


def _describe(exc: ValidationError) -> tuple[RejectCode, str]:
    error = exc.errors()[0]
    if error["type"] in ("json_invalid", "json_type"):
        message = error["msg"].removeprefix("Invalid JSON: ")
        if "hex escape" in message or "unicode code point" in message:
            # pydantic's words for a lone UTF-16 surrogate (\ud800, or its UTF-8-style bytes ED A0 80).
            message += " (a string holds a lone UTF-16 surrogate: not Unicode text)"
        return "malformed", f"not JSON: {message}"
    where = ".".join(printable(str(part), 40) for part in error["loc"]) or "the payload"
    if error["type"] == "extra_forbidden":
        what = "is not a field of this command"
    elif error["type"] == "missing":
        what = "is required"
    elif error["type"] in ("model_type", "model_attributes_type") and not error["loc"]:
        what = "must be a JSON object"
    else:
        message = error["msg"].removeprefix("Value error, ")
        what = message[0].lower() + message[1:]
    more = len(exc.errors()) - 1
    return "invalid", f"{where}: {what}" + (f" (and {more} more problem(s))" if more else "")


@dataclass
class _Context:
    name: str  # as shown: printable, cut
    received_at: str
    command_id: str | None = None
    answered: bool = False  # an answer was handed to the publisher: the command gets no other


class _RejectionLog:
    """Each rejection at DEBUG; at WARNING the first of each interval, then a count of the others."""

    def __init__(self, interval_s: float = _REJECTION_LOG_INTERVAL_S) -> None:
        self._interval = interval_s
        self._lock = threading.Lock()
        self._window_start = float("-inf")
        self._unlogged: Counter[str] = Counter()

    def note(self, context: _Context, code: str, reason: str) -> None:
        now = time.monotonic()
        with self._lock:
            new_window = now - self._window_start >= self._interval
            if new_window:
                self._window_start = now
                summary = self._take_summary()
            else:
                self._unlogged[code] += 1
        if new_window:
            if summary:
                log.warning("%s", summary)
            log.warning(
                "command cmd/%s%s rejected (%s): %s",
                context.name,
                f" {context.command_id!r}" if context.command_id else "",
                code,
                reason,
            )
        else:
            log.debug("command cmd/%s rejected (%s): %s", context.name, code, reason)

    def _take_summary(self) -> str | None:
        if not self._unlogged:
            return None
        total = sum(self._unlogged.values())
        kinds = ", ".join(f"{code} {n}" for code, n in self._unlogged.most_common())
        self._unlogged.clear()
        return f"{total} more command(s) rejected within {self._interval:g} s of the last one logged ({kinds})"

    def flush(self) -> None:
        with self._lock:
            summary = self._take_summary()
        if summary:
            log.warning("%s", summary)


class RemoteCommands:
    """Validates and carries out the commands; answers each one on cmd/result through `answer`.

    `accept_trigger(request)` hands a validated trigger to the scoring loop: None when it
    is taken, else the reason it is not. It is called on paho's network thread and must
    not block (a bounded queue's put_nowait, for instance).
    """

    def __init__(
        self,
        config: EdgeConfig,
        live: LiveModel,
        accept_trigger: Callable[[TriggerRequest], str | None],
        answer: Callable[[str], bool],
    ) -> None:
        self._config = config.mqtt.commands
        self._station_ref = StationRef(
            site=config.station.site, line=config.station.line, station=config.station.station
        )
        self._live = live
        self._accept_trigger = accept_trigger
        self._answer = answer
        self._bucket = _TokenBucket(self._config.max_per_s, self._config.burst)
        self._rejections = _RejectionLog()
        self._reload: threading.Thread | None = None
        self._counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        self._last_traceback = float("-inf")
        self._failures_unlogged = 0
        # Command name -> handler: with COMMANDS (name -> payload model) the whole dispatch.
        self._handlers: dict[str, Callable[[Any, float, _Context], None]] = {
            "trigger": self._trigger,
            "reload": self._start_reload,
            "threshold": self._threshold,
        }

    # Runs on paho's network thread.
    def handle(self, name: str, payload: bytes, retained: bool, received_at: float) -> None:
        """Answer one message exactly once, whatever it holds; never raises."""
        context = _Context(printable(name, SHOWN_NAME_CHARS), utc_iso(datetime.now(timezone.utc)))
        try:
            self._handle(name, payload, retained, received_at, context)
        except Exception as exc:
            self._failed(context, exc)

    def _failed(self, context: _Context, exc: Exception) -> None:
        # A bug one payload triggers, a flood of such payloads triggers in each: one traceback per interval.
        now = time.monotonic()
        if now - self._last_traceback >= _REJECTION_LOG_INTERVAL_S:
            self._last_traceback = now
            more = self._failures_unlogged
            self._failures_unlogged = 0
            log.error(
                "command cmd/%s failed%s",
                context.name,
                f" ({more} more failure(s) since the last one logged)" if more else "",
                exc_info=exc,
            )
        else:
            self._failures_unlogged += 1
        if context.answered:
            return
        try:
            self._reject(
                context,
                "internal_error",
                f"the daemon failed to handle it ({type(exc).__name__}: {exc}); see its log",
                log_it=False,
            )
        except Exception:
            context.command_id = None
            with contextlib.suppress(Exception):
                self._reject(context, "internal_error", "the daemon failed to handle it; see its log", log_it=False)

    def _handle(self, name: str, payload: bytes, retained: bool, received_at: float, context: _Context) -> None:
        limit = self._config.max_payload_bytes
        if len(payload) <= limit:
            context.command_id = _id_of(
                payload,
                ("trigger_id",)
                if name == "trigger"
                else ("command_id",)
                if name in COMMANDS
                else ("command_id", "trigger_id"),
            )
        if name not in COMMANDS:
            return self._reject(
                context,
                "unknown_command",
                f"unknown command {context.name!r}: the commands are cmd/trigger, cmd/reload and cmd/threshold",
            )
        if name not in self._config.allow:
            return self._reject(
                context,
                "not_allowed",
                f"cmd/{name} is not allowed on this station (mqtt.commands.allow: [{', '.join(self._config.allow)}])",
            )
        if retained:
            return self._reject(
                context,
                "retained",
                "a retained message is not a command (it would run again at "
                "every reconnect): publish commands with retain false, and clear the retained one",
            )
        if len(payload) > limit:
            return self._reject(
                context,
                "too_large",
                f"{len(payload)} bytes, more than mqtt.commands.max_payload_bytes ({limit}); not read",
            )
        try:
            command = COMMANDS[name].model_validate_json(payload)
        except ValidationError as exc:
            code, reason = _describe(exc)
            return self._reject(context, code, reason)
        station = getattr(command, "station", None)
        if station is not None and station != self._station_ref:
            return self._reject(
                context, "wrong_station", f"the command is for {_path(station)}; this is {_path(self._station_ref)}"
            )
        if not self._bucket.take():
            return self._reject(
                context,
                "rate_limited",
                f"more than {self._config.max_per_s:g} commands per "
                f"second (burst {self._config.burst}; mqtt.commands.max_per_s)",
            )
        self._handlers[name](command, received_at, context)

    def _trigger(self, command: TriggerCommand, received_at: float, context: _Context) -> None:
        why = self._accept_trigger(TriggerRequest(command.part_id, command.trigger_id, received_at))
        if why is not None:
            return self._reject(context, "not_accepted", why)
        log.debug("cmd/trigger %r for part %r accepted", command.trigger_id, command.part_id)
        self._send(context, "accepted", part_id=command.part_id)

    def _threshold(self, command: ThresholdCommand, received_at: float, context: _Context) -> None:
        refused = self._live.set_threshold(command.value, command.command_id)
        if refused is not None:
            return self._reject(context, *refused)
        self._send(context, "done", threshold=self._live.threshold_state())

    def _start_reload(self, command: ReloadCommand, received_at: float, context: _Context) -> None:
        if self._reload is not None and self._reload.is_alive():
            return self._reject(context, "busy", "a reload is under way; send cmd/reload again when it is answered")
        log.info("cmd/reload: loading %s", self._live.bundle_path)
        self._reload = threading.Thread(target=self._run_reload, args=(context,), name="ganspect-reload", daemon=True)
        self._reload.start()

    def _run_reload(self, context: _Context) -> None:
        try:
            why, _ = self._live.reload()
            if why is not None:
                log.error(
                    "cmd/reload refused: %s; still scoring with %s %s",
                    why,
                    self._live.scorer.manifest.name,
                    self._live.scorer.model_file.sha256[:12],
                )
                return self._reject(context, "bundle_refused", why, log_it=False)
            scorer = self._live.scorer
            model = ModelState(
                name=scorer.manifest.name,
                kind=scorer.manifest.kind,
                sha256=scorer.model_file.sha256,
                precision=scorer.model_file.precision,
            )
            self._send(context, "done", threshold=self._live.threshold_state(), model=model)
        except Exception:
            log.exception("cmd/reload failed")
            self._reject(context, "internal_error", "the reload failed unexpectedly; see the daemon's log")

    # -- answers ---------------------------------------------------------------------------
    def _reject(self, context: _Context, code: RejectCode, reason: str, *, log_it: bool = True) -> None:
        reason = printable(reason, _REASON_CHARS)
        if log_it:
            self._rejections.note(context, code, reason)
        self._send(context, "rejected", code=code, reason=reason)

    def _send(
        self,
        context: _Context,
        outcome: Literal["accepted", "done", "rejected"],
        *,
        code: RejectCode | None = None,
        reason: str | None = None,
        part_id: str | None = None,
        threshold: ThresholdState | None = None,
        model: ModelState | None = None,
    ) -> None:
        result = CommandResult(
            schema_=RESULT_SCHEMA,
            command=context.name,
            command_id=context.command_id,
            station=self._station_ref,
            outcome=outcome,
            code=code,
            reason=reason,
            part_id=part_id,
            threshold=threshold,
            model=model,
            received_at=context.received_at,
            answered_at=utc_iso(datetime.now(timezone.utc)),
        )
        text = result.model_dump_json(by_alias=True)
        context.answered = True  # counted once it is made: the tally says what was answered, not attempted
        with self._counts_lock:
            self._counts[code or outcome] += 1
        self._answer(text)

    def counts(self) -> dict[str, int]:
        """Answers so far by outcome (accepted, done) or rejection code."""
        with self._counts_lock:
            return dict(self._counts)

    def close(self, timeout_s: float = 30.0) -> None:
        """Wait for a reload under way (its answer goes out), log the last rejection count and a tally."""
        if self._reload is not None:
            self._reload.join(timeout_s)
        self._rejections.flush()
        counts = self.counts()
        if counts:
            log.info("commands answered: %s", ", ".join(f"{key} {n}" for key, n in sorted(counts.items())))


def _path(station: StationRef | StationConfig) -> str:
    path = f"{printable(station.site, 40)}/{printable(station.line, 40)}/{printable(station.station, 40)}"
    # Station names in the config are ASCII (topic levels): anything else in a sender's names is what differs,
    # and may look like what it imitates (a Cyrillic 's', an invisible Hangul filler). Escaped, it shows.
    return path if path.isascii() else f"{ascii(path)[1:-1]} (as written: {path})"
