"""The command payloads from the MES and the answers on cmd/result, as pydantic models.

These models are the definition of the command schemas: the files
`edge/schemas/cmd-*.schema.json` are generated from them (`ganspect.edge.schema_files`),
and a test holds the files equal to the models and checks that `jsonschema` on the files
agrees with the daemon on every payload of the hostile-command tests. That keeps the edge
install light (pydantic is there already) with one definition of each payload.

Ids and names from the MES are Unicode text that an MES stores and a log viewer shows as
it is: no control, format, bidi or line-separator characters, no lone surrogates
(`_UNSHOWABLE_RANGES`).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter

RESULT_SCHEMA: Literal["ganspect.cmd_result/1"] = "ganspect.cmd_result/1"
SHOWN_NAME_CHARS = 64
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
UNSHOWABLE_PATTERN = (
    "["
    + "".join(
        _class_member(low) + ("" if low == high else "-" + _class_member(high)) for low, high in _UNSHOWABLE_RANGES
    )
    + "]"
)
UNSHOWABLE = re.compile(UNSHOWABLE_PATTERN)
UTC_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$"

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
    if found := UNSHOWABLE.search(value):
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
    Field(json_schema_extra={"not": {"pattern": UNSHOWABLE_PATTERN}}),
]
TEXT = TypeAdapter(Text)


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
        max_length=SHOWN_NAME_CHARS,
        description="The command name (last topic level), "
        "each character an id may not hold (control, format, bidi, line separator) replaced by "
        f"'?', cut to {SHOWN_NAME_CHARS} characters.",
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
    received_at: str = Field(pattern=UTC_PATTERN, description="UTC time (ISO 8601) the command arrived.")
    answered_at: str = Field(pattern=UTC_PATTERN, description="UTC time (ISO 8601) of this answer.")


def printable(text: str, limit: int) -> str:
    """`text` with every character an id may not hold replaced by '?', cut to `limit` characters."""
    text = UNSHOWABLE.sub("?", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
