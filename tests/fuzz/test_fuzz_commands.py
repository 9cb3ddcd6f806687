"""Property-based fuzzing of MQTT commands with hostile Unicode in every id field.

The command handler runs in-process with a real verified bundle (the tiny ONNX model
under onnxruntime), real files in the data folder and the real payload models; its
answers are collected where the daemon would publish them. Each command, whatever its
ids hold (lone UTF-16 surrogates, C0/C1 controls, bidi controls, line separators,
zero-width characters), gets exactly one answer that is UTF-8 and valid against
edge/schemas/cmd-result.schema.json, and the log stays bounded (rate-limited), however
many such commands arrive. GANSPECT_FUZZ_EXAMPLES raises the number of examples.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ganspect.edge
from ganspect.edge.config import load_config
from ganspect.edge.live_model import LiveModel
from ganspect.edge.payloads import COMMANDS, UNSHOWABLE
from ganspect.edge.remote import RemoteCommands
from ganspect.edge.scorer import Scorer
from ganspect.edge.triggers import TriggerRequest

EXAMPLES = int(os.environ.get("GANSPECT_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SCHEMAS = Path(ganspect.edge.__file__).parent / "schemas"
STATION = {"site": "testsite", "line": "l1", "station": "s1"}
# The characters an audit sends on purpose; arbitrary code points rarely hit them by chance.
HOSTILE = [
    "\ud800",
    "\udbff",
    "\udc00",
    "\udfff",
    "\x00",
    "\n",
    "\r",
    "\x1b",
    "\x7f",
    "\x85",
    "\x9b",
    "\xad",
    "\u061c",
    "\u200b",
    "\u200d",
    "\u200e",
    "\u2028",
    "\u2029",
    "\u202a",
    "\u202e",
    "\u2066",
    "\u2069",
    "\ufeff",
    "\U000e0001",
    "\U000e0041",
    "é",
    "部",
    "\U0001f600",
    " ",
    "\xa0",
]
# Every code point: surrogates included (hypothesis leaves them out unless told).
characters = st.one_of(st.characters(exclude_categories=()), st.sampled_from(HOSTILE))
ids = st.one_of(
    st.text(characters, min_size=1, max_size=12),
    st.builds(
        lambda a, b, c: a + b + c,
        st.sampled_from(["P-", "", "T"]),
        st.sampled_from(HOSTILE),
        st.text(characters, max_size=4),
    ),
)
plain = st.sampled_from(["P-1", "T-1", "é-部品-1"])
names = st.one_of(
    st.sampled_from(["trigger", "reload", "threshold", "shutdown"]),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=10),
)
ID_FIELDS = {"trigger": ["part_id", "trigger_id"], "reload": ["command_id"], "threshold": ["command_id"]}


@st.composite
def commands(draw: st.DrawFn) -> tuple[str, bytes]:
    """(command name, payload bytes) with hostile text in one or more of its id fields."""
    name = draw(names)
    fields = ID_FIELDS.get(name, ["command_id", "trigger_id"])
    document: dict[str, Any] = {field: draw(st.one_of(ids, plain)) for field in fields}
    if name == "threshold":
        document["value"] = draw(st.sampled_from([None, 0.16]))
    if draw(st.booleans()):
        document["station"] = {key: draw(st.one_of(ids, st.just(value))) for key, value in STATION.items()}
    how = draw(st.sampled_from(["escaped", "raw"]))
    if how == "escaped":  # a surrogate as the JSON escape \ud800
        payload = json.dumps(document).encode("ascii")
    else:  # ... or as the raw bytes ED A0 80 that a careless sender writes
        payload = json.dumps(document, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return name, payload


class LogLines(logging.Handler):
    """Every line the daemon's loggers would write (a traceback counts as its lines), at INFO and above."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.extend(self.format(record).splitlines())


@dataclass
class Station:
    remote: RemoteCommands
    answers: list[str]
    log: LogLines
    started: float  # the fixture is shared by all examples of a test: the log is bounded over all of them


@pytest.fixture
def station(tmp_path: Path, tiny_bundle: Path) -> Iterator[Station]:
    raw = {
        "station": STATION,
        "model": {"bundle": str(tiny_bundle), "intra_op_threads": 1},
        "source": {"uri": "0"},
        "data": {"dir": str(tmp_path / "data")},
        # No rate limit here: every valid command runs its handler.
        "mqtt": {"commands": {"max_per_s": 1000, "burst": 1000}},
    }
    (tmp_path / "edge.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    config = load_config(tmp_path / "edge.yaml")
    answers: list[str] = []

    def accept(request: TriggerRequest) -> str | None:
        return None

    def answer(text: str) -> bool:
        answers.append(text)
        return True

    remote = RemoteCommands(config, LiveModel(Scorer.load(tiny_bundle, intra_op_threads=1), config), accept, answer)
    lines = LogLines()
    logger = logging.getLogger("ganspect")
    logger.addHandler(lines)
    try:
        yield Station(remote, answers, lines, time.monotonic())
    finally:
        logger.removeHandler(lines)
        remote.close()


def _validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8")))


RESULT = _validator("cmd-result")
_COMMAND_VALIDATORS = {name: _validator(f"cmd-{name}") for name in COMMANDS}
command_validator = _COMMAND_VALIDATORS.__getitem__


@FUZZ
@given(command=commands())
def test_every_command_with_hostile_ids_gets_one_schema_valid_answer_and_the_log_stays_bounded(station, command):
    name, payload = command
    before = len(station.answers)
    station.remote.handle(name, payload, False, time.monotonic())
    deadline = time.monotonic() + 10
    while len(station.answers) == before and time.monotonic() < deadline:
        time.sleep(0.002)  # a reload is answered by its worker thread
    time.sleep(0.002)  # room for a second answer, were there one
    assert len(station.answers) == before + 1, "exactly one answer per command"
    text = station.answers[-1]
    text.encode("utf-8")  # what the publisher sends: a surrogate would raise here
    document = json.loads(text)
    RESULT.validate(document)
    assert document["code"] != "internal_error", document
    # Nothing the id rule refuses reaches the answer, raw or decoded; a valid id is echoed.
    assert not UNSHOWABLE.search(text) and not any(UNSHOWABLE.search(str(value)) for value in document.values())
    sent = json.loads(payload.decode("utf-8", "surrogatepass"))
    key = "trigger_id" if name == "trigger" else "command_id" if name in COMMANDS else None
    if key is not None:
        ident = sent.get(key)
        valid_id = isinstance(ident, str) and not UNSHOWABLE.search(ident) and 0 < len(ident) <= 128
        assert document["command_id"] == (ident if valid_id else None)
    # The schema files and the daemon agree on what is a valid command.
    if name in COMMANDS:
        schema_says_valid = command_validator(name).is_valid(sent)
        assert schema_says_valid == (document["code"] not in ("invalid", "malformed")), (sent, document)

    # Rate-limited: per 10 s interval the rejection log writes its first rejection and a count of the others. A
    # command carried out writes a line or two of its own (a threshold set or cleared, a reload), by design.
    lines = station.log.lines
    windows = 1 + (time.monotonic() - station.started) // 10
    carried_out = sum(json.loads(a)["outcome"] != "rejected" for a in station.answers)
    assert not any("Traceback" in line for line in lines), lines[:40]
    assert not any(UNSHOWABLE.search(line) for line in lines), [ascii(line) for line in lines]
    assert len([line for line in lines if "rejected" in line]) <= 2 * windows, lines
    assert len(lines) <= 2 * windows + 2 * carried_out, lines
