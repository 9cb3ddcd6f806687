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

The payload models below are the definition of the command schemas: the files
`edge/schemas/cmd-*.schema.json` are generated from them (`write_schemas`), and a test
holds the files equal to the models and checks that `jsonschema` on the files agrees
with the daemon on every payload of the hostile-command tests. That keeps the edge
install light (pydantic is there already) with one definition of each payload.

Threads: `RemoteCommands.handle` runs on paho's network thread and never blocks; a
reload loads and verifies the bundle on a worker thread and swaps it into `LiveModel`,
which the scoring loop reads once per frame, so a model change falls between frames.
Rejections are logged at WARNING at most once per `_REJECTION_LOG_INTERVAL_S` with a
count of the rest, so a flood cannot fill the journal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError

from ganspect.edge.config import EdgeConfig, StationConfig
from ganspect.edge.errors import GanspectError
from ganspect.edge.scorer import Score, Scorer
from ganspect.edge.triggers import TriggerRequest

log = logging.getLogger(__name__)

RESULT_SCHEMA: Literal["ganspect.cmd_result/1"] = "ganspect.cmd_result/1"
THRESHOLD_FILE = "threshold-override.json"
_REJECTION_LOG_INTERVAL_S = 10.0
_SHOWN_NAME_CHARS = 64
_REASON_CHARS = 300
# What an id (or a name) from the MES may hold: Unicode text that an MES stores and a log viewer shows as it
# is. Refused, by Unicode category: Cc (C0 and C1 controls: line breaks such as NEL U+0085, terminal escapes
# such as CSI U+009B), Cf (format characters: bidi controls such as U+202E that reorder what a viewer shows,
# zero-width characters such as U+200B that make two ids look alike, the BOM), Zl and Zp (U+2028, U+2029: line
# breaks) and Cs (lone UTF-16 surrogates: not UTF-8, an answer or log line holding one fails to encode).
# Listed by hand (Unicode 15.1) so that the rule and the schema files do not change with the Python a station
# runs; a test holds the list to Python's unicodedata.
_UNSHOWABLE_RANGES: tuple[tuple[int, int], ...] = (
    (0x0000, 0x001F),
    (0x007F, 0x009F),
    (0x00AD, 0x00AD),
    (0x0600, 0x0605),
    (0x061C, 0x061C),
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x180E, 0x180E),
    (0x200B, 0x200F),
    (0x2028, 0x202E),
    (0x2060, 0x2064),
    (0x2066, 0x206F),
    (0xD800, 0xDFFF),
    (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
)


def _class_member(code: int) -> str:
    # Escapes for the BMP (ASCII in the schema files; Python's re and ECMA read \uXXXX alike, a lone surrogate
    # included); the code point itself beyond it (the files carry it as a JSON surrogate pair, which ECMA
    # reads as one code point with the u flag that JSON Schema 2020-12 asks for).
    return f"\\u{code:04x}" if code <= 0xFFFF else chr(code)


# One pattern for the daemon and the schema files (searched, not anchored).
_UNSHOWABLE_PATTERN = (
    "["
    + "".join(
        _class_member(low) + ("" if low == high else "-" + _class_member(high)) for low, high in _UNSHOWABLE_RANGES
    )
    + "]"
)
_UNSHOWABLE = re.compile(_UNSHOWABLE_PATTERN)
_UTC_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$"

RejectCode = Literal[
    "unknown_command",
    "not_allowed",
    "retained",
    "too_large",
    "malformed",
    "invalid",
    "wrong_station",
    "rate_limited",
    "busy",
    "not_accepted",
    "out_of_bounds",
    "bundle_refused",
    "internal_error",
]


def _showable(value: str) -> str:
    if found := _UNSHOWABLE.search(value):
        raise ValueError(
            f"must not contain control characters (U+{ord(found.group()):04X} at index "
            f"{found.start()}; ids take no control, format, bidi or line-separator characters)"
        )
    return value


# An id or name from the MES: it reaches verdicts and logs, so only characters they can show as they are.
Text = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128),
    AfterValidator(_showable),
    Field(json_schema_extra={"not": {"pattern": _UNSHOWABLE_PATTERN}}),
]
_TEXT = TypeAdapter(Text)


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class StationRef(_Payload):
    """A station of the plant hierarchy, as in the topic."""

    site: Text = Field(description="Plant or site name.")
    line: Text = Field(description="Production line name.")
    station: Text = Field(description="Inspection station name.")


_STATION_FIELD = Field(
    None,
    description="Optional: the station the sender means. The topic already names it; when the payload "
    "names it too, it must match this station exactly or the command is rejected (wrong_station).",
)


class TriggerCommand(_Payload):
    """cmd/trigger: inspect one part now. The first frame captured after the command arrives is scored and
    published as a verdict carrying this part_id and trigger_id. Answered on cmd/result: accepted, or rejected
    with the reason (e.g. the station inspects continuously)."""

    station: StationRef | None = _STATION_FIELD
    part_id: Text = Field(description="The part's id, copied into the verdict's part_id.")
    trigger_id: Text | None = Field(
        None,
        description="The sender's id of this trigger, copied into the verdict's "
        "trigger_id and into the command_id of the answer.",
    )


class ReloadCommand(_Payload):
    """cmd/reload: read and verify the configured model bundle (model.bundle) again and score with it from the
    next frame on. A bundle that fails verification is refused with its reason and the running model keeps
    scoring. The bundle path is never taken from the command."""

    station: StationRef | None = _STATION_FIELD
    command_id: Text | None = Field(None, description="The sender's id of this command, echoed in the answer.")


class ThresholdCommand(_Payload):
    """cmd/threshold: set (a number) or clear (null) the runtime threshold override. The value must lie within
    mqtt.commands.threshold_min_ratio .. threshold_max_ratio times the bundle's threshold. The override is kept
    in the data folder across restarts until cleared or until a reload brings another model; every verdict
    reports it (threshold.source = override)."""

    station: StationRef | None = _STATION_FIELD
    command_id: Text | None = Field(None, description="The sender's id of this command, echoed in the answer.")
    value: float | None = Field(
        description="The new decision threshold (NG when score > value), or null to go "
        "back to the bundle's threshold. Required: an empty command clears nothing."
    )


COMMANDS: dict[str, type[_Payload]] = {
    "trigger": TriggerCommand,
    "reload": ReloadCommand,
    "threshold": ThresholdCommand,
}


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ThresholdState(_Out):
    """The decision threshold in force after the command."""

    value: float = Field(description="NG when score > value.")
    source: Literal["bundle", "override"] = Field(description="bundle: manifest.json; override: cmd/threshold.")
    bundle_value: float = Field(description="The running bundle's own threshold.")


class ModelState(_Out):
    """The model scoring after the command."""

    name: str
    kind: Literal["efficient_gan", "anogan"]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the ONNX file that runs.")
    precision: Literal["fp32", "int8"]


class CommandResult(_Out):
    """The answer to one message on cmd/+, published on <prefix>/<site>/<line>/<station>/cmd/result (QoS 1, not
    retained). Every message gets exactly one answer, in the order the messages arrived (a reload's answer comes
    when the reload is over). All fields are always present."""

    schema_: Literal["ganspect.cmd_result/1"] = Field(alias="schema", description="Payload format and version.")
    command: str = Field(
        max_length=_SHOWN_NAME_CHARS,
        description="The command name (last topic level), "
        "each character an id may not hold (control, format, bidi, line separator) replaced by "
        f"'?', cut to {_SHOWN_NAME_CHARS} characters.",
    )
    command_id: Text | None = Field(
        description="The command's id (trigger_id for cmd/trigger, else command_id) "
        "when the payload had a valid one; null otherwise."
    )
    station: StationRef = Field(description="The station that answers.")
    outcome: Literal["accepted", "done", "rejected"] = Field(
        description="accepted: a trigger is queued, its verdict follows; done: a threshold or reload took effect; "
        "rejected: nothing was done (code and reason say why)."
    )
    code: RejectCode | None = Field(description="Why it was rejected, for machines; null unless rejected.")
    reason: str | None = Field(description="Why it was rejected, in words; null unless rejected.")
    part_id: Text | None = Field(description="cmd/trigger: the part that will be inspected; null otherwise.")
    threshold: ThresholdState | None = Field(
        description="cmd/threshold and cmd/reload: the threshold in force after the command; null otherwise."
    )
    model: ModelState | None = Field(description="cmd/reload: the model scoring after the command; null otherwise.")
    received_at: str = Field(pattern=_UTC_PATTERN, description="UTC time (ISO 8601) the command arrived.")
    answered_at: str = Field(pattern=_UTC_PATTERN, description="UTC time (ISO 8601) of this answer.")


# -- the schema files ----------------------------------------------------------------------

STATUS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://ganspect.example/schemas/status/1",
    "title": "ganspect status",
    "description": "The retained payload of <prefix>/<site>/<line>/<station>/status: the bare UTF-8 word, not "
    "JSON-quoted (validate the decoded text as a string). online: connected; stopped: ended cleanly; "
    "offline: the last will, published by the broker when the daemon vanished.",
    "type": "string",
    "enum": ["online", "offline", "stopped"],
}


def _one_line_descriptions(node: Any) -> Any:
    # Docstrings become descriptions with their line breaks; a schema reads better without them.
    if isinstance(node, dict):
        return {
            key: " ".join(value.split())
            if key == "description" and isinstance(value, str)
            else _one_line_descriptions(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_one_line_descriptions(item) for item in node]
    return node


def _schema_of(model: type[BaseModel], name: str, title: str) -> dict[str, Any]:
    # Commands are read (validation); answers are written (serialization: every field is always there).
    schema = model.model_json_schema(
        by_alias=True, mode="validation" if model in COMMANDS.values() else "serialization"
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://ganspect.example/schemas/{name}/1",
        **_one_line_descriptions(schema),
        "title": title,
    }


def schemas() -> dict[str, dict[str, Any]]:
    """Every JSON Schema this module defines, by file name in `edge/schemas/`."""
    return {
        "cmd-trigger.schema.json": _schema_of(TriggerCommand, "cmd-trigger", "ganspect cmd/trigger"),
        "cmd-reload.schema.json": _schema_of(ReloadCommand, "cmd-reload", "ganspect cmd/reload"),
        "cmd-threshold.schema.json": _schema_of(ThresholdCommand, "cmd-threshold", "ganspect cmd/threshold"),
        "cmd-result.schema.json": _schema_of(CommandResult, "cmd-result", "ganspect cmd/result"),
        "status.schema.json": STATUS_SCHEMA,
    }


def schema_text(schema: dict[str, Any]) -> str:
    # ASCII: the id pattern's code points beyond the BMP are written as JSON surrogate pairs, not as invisible text.
    return json.dumps(schema, indent=2, ensure_ascii=True) + "\n"


def write_schemas(folder: Path | None = None) -> list[Path]:
    """Regenerate the schema files (after changing a model): `python -m ganspect.edge.remote`."""
    folder = folder or Path(__file__).parent / "schemas"
    written = []
    for name, schema in schemas().items():
        path = folder / name
        path.write_text(schema_text(schema), encoding="utf-8")
        written.append(path)
    return written


# -- the model and threshold in force ---------------------------------------------------------


def utc_iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class InForce:
    """The model and the decision threshold for one frame (NG when score > threshold)."""

    scorer: Scorer
    threshold: float
    threshold_source: Literal["bundle", "override"]


@dataclass(frozen=True)
class Judged:
    """One frame's score, judged by the threshold in force, with the scorer that produced it."""

    score: Score  # score.threshold is the threshold applied (the override when one is set)
    scorer: Scorer
    threshold_source: Literal["bundle", "override"]


@dataclass(frozen=True)
class _Override:
    value: float
    model_sha256: str  # an override belongs to the model it was set for
    set_at: str
    command_id: str | None


class LiveModel:
    """The scorer and the threshold the loop judges by; commands change them between frames.

    The threshold override is saved in `<data.dir>/threshold-override.json` (written
    atomically before it takes effect) so a restart or power cut does not change how
    parts are judged; every verdict says `threshold.source: override` while it holds.
    It is tied to the model's SHA-256: a reload that brings another model clears it, as
    does a start with another model (a new model has its own score scale).
    """

    def __init__(self, scorer: Scorer, config: EdgeConfig, check_model: Callable[[Scorer], None] | None = None) -> None:
        """`check_model(scorer)` may refuse a reloaded model by raising GanspectError (e.g. its input
        size does not suit the configured inspection); the running model then keeps scoring."""
        self._config = config
        self._check_model = check_model
        self._lock = threading.Lock()
        self._scorer = scorer
        self._override: _Override | None = None
        self._state_file = config.data.dir / THRESHOLD_FILE
        # Held briefly (a file write) to change the model or the override; never while a bundle loads.
        self._change_lock = threading.Lock()
        self._reloading = threading.Lock()
        self._restore_override()

    @property
    def bundle_path(self) -> Path:
        """The configured bundle: the only one a reload reads."""
        return self._config.model.bundle

    @property
    def scorer(self) -> Scorer:
        with self._lock:
            return self._scorer

    def in_force(self) -> InForce:
        """The model and threshold to judge the next frame by: take it once per frame."""
        with self._lock:  # one consistent (model, threshold) pair
            scorer, override = self._scorer, self._override
        if override is None:
            return InForce(scorer, scorer.manifest.threshold.value, "bundle")
        return InForce(scorer, override.value, "override")

    def score(self, image: np.ndarray) -> Judged:
        """Score one frame with the model in force and judge it by the threshold in force."""
        now = self.in_force()
        score = now.scorer.score(image)
        return Judged(dataclasses.replace(score, threshold=now.threshold), now.scorer, now.threshold_source)

    def threshold_state(self) -> ThresholdState:
        with self._lock:
            return self._threshold_state(self._scorer, self._override)

    @staticmethod
    def _threshold_state(scorer: Scorer, override: _Override | None) -> ThresholdState:
        bundle = scorer.manifest.threshold.value
        if override is None:
            return ThresholdState(value=bundle, source="bundle", bundle_value=bundle)
        return ThresholdState(value=override.value, source="override", bundle_value=bundle)

    def bounds(self, scorer: Scorer | None = None) -> tuple[float, float]:
        commands = self._config.mqtt.commands
        bundle = (scorer or self.scorer).manifest.threshold.value
        ends = (bundle * commands.threshold_min_ratio, bundle * commands.threshold_max_ratio)
        return min(ends), max(ends)

    def set_threshold(self, value: float | None, command_id: str | None) -> tuple[RejectCode, str] | None:
        """Set (or clear, None) the override; None when done, else (code, why not): nothing changed then."""
        with self._change_lock:  # the bounds refer to the model in force: no swap meanwhile
            scorer = self.scorer
            if value is not None:
                low, high = self.bounds(scorer)
                if not low <= value <= high:
                    commands = self._config.mqtt.commands
                    return "out_of_bounds", (
                        f"{_outside(value, low, high)} ({commands.threshold_min_ratio:g} .. "
                        f"{commands.threshold_max_ratio:g} x the bundle's threshold "
                        f"{scorer.manifest.threshold.value:g}; mqtt.commands.threshold_min_ratio/max_ratio)"
                    )
                override: _Override | None = _Override(
                    value, scorer.model_file.sha256, utc_iso(datetime.now(timezone.utc)), command_id
                )
            else:
                override = None
            problem = self._save(override)
            if problem:
                return "internal_error", f"{problem}; the threshold is unchanged"
            with self._lock:
                self._override = override
        if override is None:
            log.warning(
                "threshold override cleared by cmd/threshold: judging by the bundle's threshold %.6g again",
                scorer.manifest.threshold.value,
            )
        else:
            log.warning(
                "threshold override %.6g set by cmd/threshold (bundle %.6g); kept across restarts until cleared",
                override.value,
                scorer.manifest.threshold.value,
            )
        return None

    def reload(self) -> tuple[str | None, bool]:
        """Load and verify the configured bundle, then swap it in; (why not or None, override cleared)."""
        model = self._config.model
        if not self._reloading.acquire(blocking=False):
            return "a reload is under way", False
        try:
            try:
                # Verified and warmed up here, on the caller's thread, while the loop scores with the old one.
                new = Scorer.load(model.bundle, model.precision, model.intra_op_threads, model.trusted_keys)
                if self._check_model is not None:
                    self._check_model(new)
            except GanspectError as exc:
                return str(exc), False
            except Exception as exc:
                return f"{model.bundle} could not be loaded: {type(exc).__name__}: {exc}", False
            with self._change_lock:
                cleared = False
                with self._lock:
                    old, override = self._scorer, self._override
                if override is not None and override.model_sha256 != new.model_file.sha256:
                    problem = self._save(None)
                    if problem:
                        return f"{problem}; the running model keeps scoring", False
                    cleared = True
                with self._lock:  # the next frame scores with the new model
                    self._scorer = new
                    if cleared:
                        self._override = None
        finally:
            self._reloading.release()
        log.warning(
            "model reloaded by cmd/reload: %s %s (%s) replaces %s %s%s",
            new.manifest.name,
            new.model_file.sha256[:12],
            new.model_file.precision,
            old.manifest.name,
            old.model_file.sha256[:12],
            "; the threshold override is cleared (it was set for the previous model)" if cleared else "",
        )
        return None, cleared

    # -- the saved override ----------------------------------------------------------------
    def _save(self, override: _Override | None) -> str | None:
        """Write (or remove) the override file durably; a message when that failed."""
        path = self._state_file
        try:
            if override is None:
                path.unlink(missing_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                temporary = path.with_suffix(".tmp")
                with open(temporary, "w", encoding="utf-8") as handle:
                    json.dump(dataclasses.asdict(override), handle)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temporary, path)
            _fsync_folder(path.parent)
        except OSError as exc:
            return f"cannot save the threshold override in {path}: {exc.strerror or exc}"
        return None

    def _restore_override(self) -> None:
        path = self._state_file
        if not path.exists():
            return
        scorer = self._scorer
        try:
            saved = _Override(**json.loads(path.read_text(encoding="utf-8")))
            value = float(saved.value)
        except (OSError, ValueError, TypeError) as exc:
            log.error("threshold override %s is unreadable (%s): ignored; judging by the bundle's threshold", path, exc)
            return
        low, high = self.bounds(scorer)
        if saved.model_sha256 != scorer.model_file.sha256:
            why = "it was set for another model"
        elif not low <= value <= high:
            why = f"{_outside(value, low, high)} (mqtt.commands.threshold_min_ratio/max_ratio)"
        else:
            self._override = dataclasses.replace(saved, value=value)
            log.warning(
                "threshold override %.6g (bundle %.6g) set by cmd/threshold at %s is in force; "
                'cmd/threshold {"value": null} clears it',
                value,
                scorer.manifest.threshold.value,
                saved.set_at,
            )
            return
        log.warning("threshold override %.6g from %s is dropped: %s", value, path, why)
        self._save(None)


def _outside(value: float, low: float, high: float) -> str:
    """'value is outside low .. high' with as many digits as it takes to see which bound it crosses."""
    crossed = low if value < low else high
    digits = next((n for n in range(6, 17) if f"{value:.{n}g}" != f"{crossed:.{n}g}"), None)
    if digits is None:  # neighbouring doubles: the shortest text that reads back as each
        return f"{value!r} is outside {low!r} .. {high!r}"
    return f"{value:.{digits}g} is outside {low:.{digits}g} .. {high:.{digits}g}"


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not on every platform
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def refuse_triggers_in_continuous_mode(request: TriggerRequest) -> str:
    """The trigger handler of a station that scores every frame: it has nothing to trigger."""
    return (
        "this station inspects continuously (every frame is scored and published); it has no trigger mode "
        "to take cmd/trigger"
    )


# -- the commands ----------------------------------------------------------------------------


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


def _printable(text: str, limit: int) -> str:
    text = _UNSHOWABLE.sub("?", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
            return _TEXT.validate_python(document.get(key), strict=True)
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
    where = ".".join(_printable(str(part), 40) for part in error["loc"]) or "the payload"
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

    # Runs on paho's network thread.
    def handle(self, name: str, payload: bytes, retained: bool, received_at: float) -> None:
        """Answer one message exactly once, whatever it holds; never raises."""
        context = _Context(_printable(name, _SHOWN_NAME_CHARS), utc_iso(datetime.now(timezone.utc)))
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
        if isinstance(command, TriggerCommand):
            self._trigger(command, received_at, context)
        elif isinstance(command, ThresholdCommand):
            self._threshold(command, context)
        elif isinstance(command, ReloadCommand):
            self._start_reload(context)

    def _trigger(self, command: TriggerCommand, received_at: float, context: _Context) -> None:
        why = self._accept_trigger(TriggerRequest(command.part_id, command.trigger_id, received_at))
        if why is not None:
            return self._reject(context, "not_accepted", why)
        log.debug("cmd/trigger %r for part %r accepted", command.trigger_id, command.part_id)
        self._send(context, "accepted", part_id=command.part_id)

    def _threshold(self, command: ThresholdCommand, context: _Context) -> None:
        refused = self._live.set_threshold(command.value, command.command_id)
        if refused is not None:
            return self._reject(context, *refused)
        self._send(context, "done", threshold=self._live.threshold_state())

    def _start_reload(self, context: _Context) -> None:
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
        reason = _printable(reason, _REASON_CHARS)
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
            schema=RESULT_SCHEMA,
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
    path = f"{_printable(station.site, 40)}/{_printable(station.line, 40)}/{_printable(station.station, 40)}"
    # Station names in the config are ASCII (topic levels): anything else in a sender's names is what differs,
    # and may look like what it imitates (a Cyrillic 's', an invisible Hangul filler). Escaped, it shows.
    return path if path.isascii() else f"{ascii(path)[1:-1]} (as written: {path})"


if __name__ == "__main__":
    for written in write_schemas():
        print(written)
