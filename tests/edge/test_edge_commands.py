"""MQTT commands in-process: the validation pipeline, the threshold override and reload, the schema files.

The handler runs here with a real verified bundle (the tiny ONNX model under
onnxruntime), real files in the data folder and the real payload models; its answers
are collected instead of published (the broker side is in test_edge_command_flood.py).
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import yaml

import ganspect.edge
from ganspect.edge.app import EdgeDaemon
from ganspect.edge.config import EdgeConfig, load_config
from ganspect.edge.errors import ConfigError
from ganspect.edge.inspector import Inspection, Inspector
from ganspect.edge.live_model import THRESHOLD_FILE, InForce, LiveModel
from ganspect.edge.payloads import COMMANDS
from ganspect.edge.remote import RemoteCommands
from ganspect.edge.schema_files import schema_text, schemas
from ganspect.edge.scorer import Scorer
from ganspect.edge.triggers import TriggerRequest

SCHEMA_DIR = Path(ganspect.edge.__file__).parent / "schemas"
STATION = {"site": "testsite", "line": "l1", "station": "s1"}


def _config(tmp_path: Path, bundle: Path, **commands: Any) -> EdgeConfig:
    raw = {
        "station": STATION,
        "model": {"bundle": str(bundle), "intra_op_threads": 1},
        "source": {"uri": "0"},
        "data": {"dir": str(tmp_path / "data")},
        "mqtt": {"commands": commands},
    }
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return load_config(path)


class Station:
    """A RemoteCommands with a LiveModel on a real bundle; answers and triggers are recorded."""

    def __init__(
        self, config: EdgeConfig, accept_trigger: Callable[[TriggerRequest], str | None] | None = None
    ) -> None:
        self.config = config
        self.live = LiveModel(Scorer.load(config.model.bundle, intra_op_threads=1), config)
        self.triggers: list[TriggerRequest] = []
        self.answers: list[dict[str, Any]] = []
        self.validator = _validator("cmd-result.schema.json")

        def accept(request: TriggerRequest) -> str | None:
            self.triggers.append(request)
            return None

        self.remote = RemoteCommands(config, self.live, accept_trigger or accept, self._answer)
        self.inspector = Inspector(config.inspection)

    def _answer(self, text: str) -> bool:
        document = json.loads(text)
        self.validator.validate(document)
        self.answers.append(document)
        return True

    def send(self, name: str, payload: bytes | dict[str, Any], retained: bool = False) -> dict[str, Any]:
        before = len(self.answers)
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.remote.handle(name, data, retained, time.monotonic())
        if name == "reload":
            self.remote.close()  # waits for the reload worker, which answers
        assert len(self.answers) == before + 1, "every command gets exactly one answer"
        return self.answers[-1]

    def reload(self, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.send("reload", payload or {})

    def inspect(self, image: np.ndarray) -> tuple[Inspection, InForce]:
        """One frame as the daemon's loop judges it: the model and threshold in force, then the inspector."""
        now = self.live.in_force()
        return self.inspector.inspect(image, now.scorer, now.threshold), now


def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture
def station(tmp_path: Path, tiny_bundle: Path) -> Station:
    return Station(_config(tmp_path, tiny_bundle))


# -- the schema files -----------------------------------------------------------------------


def test_the_schema_files_are_generated_from_the_payload_models():
    for name, schema in schemas().items():
        path = SCHEMA_DIR / name
        assert path.exists(), f"{name} missing: run `python -m ganspect.edge.schema_files`"
        assert path.read_text(encoding="utf-8") == schema_text(schema), (
            f"{name} differs from the model: run `python -m ganspect.edge.schema_files` and review the diff"
        )
        jsonschema.Draft202012Validator.check_schema(schema)


# Payloads that are JSON (RFC 8259: no NaN) and test one rule of a command's schema each.
SCHEMA_CASES: list[tuple[str, Any, str | None]] = [
    ("trigger", {"part_id": "P-1"}, None),
    ("trigger", {"part_id": "P-1", "trigger_id": "T-1", "station": STATION}, None),
    ("trigger", {"part_id": "P-1", "trigger_id": None, "station": None}, None),
    ("trigger", {"part_id": "é-部品-1"}, None),
    ("trigger", {}, "part_id: is required"),
    ("trigger", {"part_id": ""}, "part_id: string should have at least 1 character"),
    ("trigger", {"part_id": "x" * 129}, "part_id: string should have at most 128 characters"),
    ("trigger", {"part_id": "a\nb"}, "part_id: must not contain control characters"),
    ("trigger", {"part_id": "a\u007fb"}, "part_id: must not contain control characters"),
    ("trigger", {"part_id": "ok\n"}, "part_id: must not contain control characters"),
    # What an MES and a log viewer show as it is: no C1 controls, bidi or format characters, line separators.
    ("trigger", {"part_id": "P\u0085FAKE\u009b31m"}, "part_id: must not contain control characters (U+0085 at index 1"),
    ("trigger", {"part_id": "P-1\u202e7-X"}, "part_id: must not contain control characters (U+202E at index 3"),
    ("trigger", {"part_id": "P-1\u2028P-2"}, "(U+2028 at index 3"),
    ("trigger", {"part_id": "P\u200b-1"}, "(U+200B at index 1"),
    ("trigger", {"part_id": "\ufeffP-1"}, "(U+FEFF at index 0"),
    ("trigger", {"part_id": "P-1", "trigger_id": "T\u2066-1"}, "trigger_id: must not contain control characters"),
    ("trigger", {"part_id": "P-\U000e0041"}, "(U+E0041 at index 2"),  # a tag character, beyond the BMP
    (
        "trigger",
        {"part_id": "P", "station": {"site": "testsite", "line": "l1", "station": "s1\u200d"}},
        "station.station: must not contain control characters (U+200D",
    ),
    ("trigger", {"part_id": "P-\U0001f600 \u00a0x\u0301"}, None),  # an emoji, spaces, a combining accent
    ("reload", {"command_id": "R\u009b1"}, "command_id: must not contain control characters (U+009B"),
    ("threshold", {"value": 0.2, "command_id": "C\u2029"}, "command_id: must not contain control characters"),
    ("trigger", {"part_id": 17}, "part_id: input should be a valid string"),
    ("trigger", {"part_id": "P", "partid": "P"}, "partid: is not a field of this command"),
    ("trigger", {"part_id": "P", "station": {"site": "testsite", "line": "l1"}}, "station.station: is required"),
    ("trigger", {"part_id": "P", "station": "testsite/l1/s1"}, "station: input should be an object"),
    ("trigger", [], "the payload: must be a JSON object"),
    ("trigger", "P-1", "the payload: must be a JSON object"),
    ("trigger", None, "the payload: must be a JSON object"),
    ("reload", {}, None),
    ("reload", {"command_id": "R-1"}, None),
    ("reload", {"path": "/tmp/evil-bundle"}, "path: is not a field of this command"),
    ("reload", {"command_id": 5}, "command_id: input should be a valid string"),
    ("threshold", {"value": 0.2}, None),
    ("threshold", {"value": 1}, None),
    ("threshold", {"value": None, "command_id": "C"}, None),
    ("threshold", {}, "value: is required"),
    ("threshold", {"value": "0.2"}, "value: input should be a valid number"),
    ("threshold", {"value": True}, "value: input should be a valid number"),
    ("threshold", {"value": [0.2]}, "value: input should be a valid number"),
    ("threshold", {"value": 0.2, "unit": "score"}, "unit: is not a field of this command"),
]


@pytest.mark.parametrize("name, document, reason", SCHEMA_CASES)
def test_the_daemon_and_the_schema_file_agree_on_each_payload(station, name, document, reason):
    schema_says_valid = _validator(f"cmd-{name}.schema.json").is_valid(document)
    assert schema_says_valid == (reason is None)
    answer = station.send(name, json.dumps(document, ensure_ascii=False).encode())
    if reason is None:
        assert answer["code"] != "invalid", answer
    else:
        assert (answer["outcome"], answer["code"]) == ("rejected", "invalid")
        assert reason in answer["reason"], answer["reason"]


def test_ids_refuse_exactly_the_control_format_separator_and_surrogate_characters():
    # The rule is a hand-kept list (stable across Pythons); this Python's Unicode database checks it.
    import sys
    import unicodedata

    from ganspect.edge.payloads import UNSHOWABLE

    refused_categories = {"Cc", "Cf", "Cs", "Zl", "Zp"}
    wrong = [
        f"U+{code:04X} {unicodedata.category(chr(code))}"
        for code in range(sys.maxunicode + 1)
        if (unicodedata.category(chr(code)) in refused_categories) != bool(UNSHOWABLE.search(chr(code)))
        and unicodedata.category(chr(code)) != "Cn"
    ]  # an older database may not know a listed one yet
    assert wrong == [], f"edge/payloads.py _UNSHOWABLE_RANGES disagrees with Unicode {unicodedata.unidata_version}"
    # The schema files hold the same pattern, and jsonschema reads it as the daemon does, beyond the BMP too.
    validator = _validator("cmd-trigger.schema.json")
    for text in ["P-1", "é-部品-1", "P-\U0001f600", "P-\U000e0100", "P-\U000e0041", "P\udbff", "P\x85", "P\u2028"]:
        assert validator.is_valid({"part_id": text}) == (not UNSHOWABLE.search(text)), ascii(text)


# -- the pipeline, check by check -------------------------------------------------------------


@pytest.mark.parametrize(
    "name, payload, retained, code, words",
    [
        ("shutdown", b'{"command_id": "X-1"}', False, "unknown_command", "unknown command 'shutdown'"),
        ("Trigger", b'{"part_id": "P"}', False, "unknown_command", "unknown command 'Trigger'"),
        ("", b"{}", False, "unknown_command", "unknown command ''"),
        ("tri\x00gger", b"{}", False, "unknown_command", "unknown command 'tri?gger'"),
        ("trigger", b'{"part_id": "P", "trigger_id": "T"}', True, "retained", "a retained message is not a command"),
        (
            "trigger",
            b'{"part_id": "' + b"x" * 5000 + b'"}',
            False,
            "too_large",
            "5015 bytes, more than mqtt.commands.max_payload_bytes (4096)",
        ),
        ("threshold", b"", False, "malformed", "not JSON"),
        ("threshold", b"\xff\xfe{}", False, "malformed", "not JSON"),
        ("threshold", b'{"value": 0.2', False, "malformed", "not JSON"),
        ("threshold", b"[" * 4000, False, "malformed", "not JSON: recursion limit exceeded"),
        ("threshold", b'{"value": NaN}', False, "invalid", "value: input should be a finite number"),
        ("threshold", b'{"value": 1e999}', False, "invalid", "value: input should be a finite number"),
        (
            "threshold",
            b'{"value": 0.2, "station": {"site": "testsite", "line": "l1", "station": "s2"}}',
            False,
            "wrong_station",
            "the command is for testsite/l1/s2; this is testsite/l1/s1",
        ),
    ],
)
def test_each_rejection_names_its_reason(station, name, payload, retained, code, words):
    answer = station.send(name, payload, retained)
    assert (answer["outcome"], answer["code"]) == ("rejected", code)
    assert words in answer["reason"], answer["reason"]
    assert answer["station"] == STATION
    assert station.live.threshold_state().source == "bundle", "a rejected command changes nothing"
    assert station.triggers == []


def test_the_answer_carries_the_commands_id_when_it_had_a_readable_one(station):
    assert station.send("shutdown", {"command_id": "X-9"})["command_id"] == "X-9"
    assert station.send("reload", {"command_id": "R-9", "path": "/x"})["command_id"] == "R-9"
    assert station.send("trigger", {"trigger_id": "T-9"})["command_id"] == "T-9"  # part_id missing
    assert station.send("trigger", {"command_id": "C-9", "part_id": "P"})["command_id"] is None  # trigger_id is its id
    assert station.send("threshold", {"command_id": "bad\nid", "value": 0.2})["command_id"] is None
    assert station.send("threshold", b"{" + b" " * 5000 + b"}")["command_id"] is None  # too large: not read


def test_not_allowed_commands_are_rejected_before_they_are_read(tmp_path, tiny_bundle):
    station = Station(_config(tmp_path, tiny_bundle, allow=["trigger"]))
    answer = station.send("threshold", {"value": 0.2, "command_id": "C-1"})
    assert (answer["code"], answer["command_id"]) == ("not_allowed", "C-1")
    assert "mqtt.commands.allow: [trigger]" in answer["reason"]
    assert station.send("trigger", {"part_id": "P"})["outcome"] == "accepted"


def test_valid_commands_beyond_the_rate_are_rejected_until_the_bucket_refills(tmp_path, tiny_bundle):
    station = Station(_config(tmp_path, tiny_bundle, max_per_s=5, burst=3))
    outcomes = [station.send("trigger", {"part_id": f"P{i}"})["code"] for i in range(6)]
    assert outcomes == [None, None, None, "rate_limited", "rate_limited", "rate_limited"]
    assert "more than 5 commands per second (burst 3" in station.answers[-1]["reason"]
    # Invalid commands do not use up the bucket: a flood of garbage cannot lock out the MES.
    assert station.send("trigger", {"part_id": 1})["code"] == "invalid"
    time.sleep(0.25)  # 5/s: one token back
    assert station.send("trigger", {"part_id": "P6"})["outcome"] == "accepted"
    assert [t.part_id for t in station.triggers] == ["P0", "P1", "P2", "P6"]


# -- cmd/trigger --------------------------------------------------------------------------------


def test_a_valid_trigger_reaches_the_scoring_loop_as_a_trigger_request(station):
    before = time.monotonic()
    answer = station.send("trigger", {"part_id": "P-42", "trigger_id": "T-42", "station": STATION})
    assert (answer["outcome"], answer["code"], answer["part_id"], answer["command_id"]) == (
        "accepted",
        None,
        "P-42",
        "T-42",
    )
    [request] = station.triggers
    assert (request.part_id, request.trigger_id) == ("P-42", "T-42")
    assert before <= request.received_at <= time.monotonic()


def test_a_continuous_station_refuses_triggers_saying_why(tmp_path, tiny_bundle):
    config = _config(tmp_path, tiny_bundle)
    assert config.trigger.mode == "continuous"
    station = Station(config, accept_trigger=EdgeDaemon(config).accept_trigger)
    answer = station.send("trigger", {"part_id": "P-1", "trigger_id": "T-1"})
    assert (answer["outcome"], answer["code"], answer["command_id"]) == ("rejected", "not_accepted", "T-1")
    assert "inspects continuously" in answer["reason"]


def test_an_exception_in_the_trigger_handler_is_answered_and_contained(tmp_path, tiny_bundle, caplog):
    def broken(request: TriggerRequest) -> str | None:
        raise RuntimeError("queue exploded")

    station = Station(_config(tmp_path, tiny_bundle), accept_trigger=broken)
    answer = station.send("trigger", {"part_id": "P", "trigger_id": "T"})
    assert (answer["code"], answer["command_id"]) == ("internal_error", "T")
    assert "queue exploded" in caplog.text


# -- cmd/threshold ------------------------------------------------------------------------------


def _image(value: int) -> np.ndarray:
    return np.full((48, 64, 3), value, np.uint8)


def test_a_threshold_override_judges_every_frame_and_is_reported(station, tmp_path):
    # The tiny model scores mean |x/255 - 0.5|: a uniform grey of 180 scores 0.206.
    frame = _image(180)
    judged, now = station.inspect(frame)
    assert (judged.score.result, now.threshold_source, judged.score.threshold) == ("NG", "bundle", 0.15)

    answer = station.send("threshold", {"value": 0.25, "command_id": "C-1"})
    assert (answer["outcome"], answer["command_id"]) == ("done", "C-1")
    assert answer["threshold"] == {"value": 0.25, "source": "override", "bundle_value": 0.15}
    judged, now = station.inspect(frame)
    assert (judged.score.result, now.threshold_source, judged.score.threshold) == ("OK", "override", 0.25)

    answer = station.send("threshold", {"value": None})
    assert answer["threshold"] == {"value": 0.15, "source": "bundle", "bundle_value": 0.15}
    assert station.inspect(frame)[0].score.result == "NG"
    assert not (tmp_path / "data" / THRESHOLD_FILE).exists()


@pytest.mark.parametrize("value", [0.0749, 0.3001, -1.0, 1e300])
def test_a_threshold_outside_the_bounds_is_refused(station, value):
    answer = station.send("threshold", {"value": value})
    assert answer["code"] == "out_of_bounds"
    assert "is outside 0.075 .. 0.3 (0.5 .. 2 x the bundle's threshold 0.15" in answer["reason"]
    assert station.live.threshold_state().source == "bundle"


@pytest.mark.parametrize(
    "value, words",
    [
        (0.07499999, "0.07499999 is outside 0.075 .. 0.3 ("),  # rounded to 6 digits, it read 0.075 is outside 0.075
        (0.30000001, "0.30000001 is outside 0.075 .. 0.3 ("),
        (math.nextafter(0.075, 0), f"{math.nextafter(0.075, 0)!r} is outside 0.075 .. 0.3 ("),  # the double below
    ],
)
def test_a_threshold_just_outside_the_bounds_is_shown_with_the_digits_that_differ(station, value, words):
    answer = station.send("threshold", {"value": value})
    assert answer["code"] == "out_of_bounds"
    assert words in answer["reason"], answer["reason"]


@pytest.mark.parametrize(
    "name, shown",
    [
        ("\u04551", "testsite/l1/\\u04551 (as written: testsite/l1/\u04551)"),  # a Cyrillic dze where the s is
        (
            "s1\u3164",
            "testsite/l1/s1\\u3164 (as written: testsite/l1/s1\u3164)",
        ),  # an invisible Hangul filler (a letter)
    ],
)
def test_a_wrong_station_that_looks_like_this_one_is_shown_escaped(station, name, shown):
    answer = station.send("threshold", {"value": 0.2, "station": {**STATION, "station": name}})
    assert answer["code"] == "wrong_station"
    assert answer["reason"] == f"the command is for {shown}; this is testsite/l1/s1", answer["reason"]


def test_a_station_name_with_a_zero_width_character_is_refused_naming_it(station):
    answer = station.send("threshold", {"value": 0.2, "station": {**STATION, "station": "s\u200b1"}})
    assert answer["code"] == "invalid"
    assert answer["reason"].startswith("station.station: must not contain control characters (U+200B at index 1")


def test_the_override_survives_a_restart_but_not_a_different_model(tmp_path, tiny_bundle, make_bundle, caplog):
    config = _config(tmp_path, tiny_bundle)
    Station(config).send("threshold", {"value": 0.3, "command_id": "C-1"})
    saved = json.loads((tmp_path / "data" / THRESHOLD_FILE).read_text(encoding="utf-8"))
    assert saved["value"] == 0.3 and saved["command_id"] == "C-1"

    restarted = Station(config)  # a new process would do the same: read data.dir
    assert restarted.live.threshold_state().value == 0.3
    assert "threshold override 0.3 (bundle 0.15) set by cmd/threshold" in caplog.text

    # The same config pointing at another model: its score scale is its own.
    other = make_bundle(tmp_path / "other", height=24, width=24)
    restarted_other = Station(_config(tmp_path, other))
    assert restarted_other.live.threshold_state().source == "bundle"
    assert "dropped: it was set for another model" in caplog.text
    assert not (tmp_path / "data" / THRESHOLD_FILE).exists()


def test_an_override_that_cannot_be_saved_is_not_applied(station, tmp_path):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / THRESHOLD_FILE).mkdir()  # a folder where the file should go: the write fails
    answer = station.send("threshold", {"value": 0.2})
    assert answer["code"] == "internal_error"
    assert "cannot save the threshold override" in answer["reason"] and "unchanged" in answer["reason"]
    assert station.live.threshold_state().source == "bundle"


# -- cmd/reload ---------------------------------------------------------------------------------


def _replace_bundle(path: Path, make_bundle: Callable[..., Path], **kwargs: Any) -> None:
    shutil.rmtree(path)
    make_bundle(path, **kwargs)


def test_reload_swaps_in_the_configured_bundle_and_clears_an_override_for_the_old_model(tmp_path, make_bundle, caplog):
    bundle = make_bundle(tmp_path / "bundle")
    station = Station(_config(tmp_path, bundle))
    old_sha = station.live.scorer.model_file.sha256
    station.send("threshold", {"value": 0.2})
    _replace_bundle(bundle, make_bundle, height=24, width=24, threshold=0.1)

    answer = station.reload({"command_id": "R-1"})
    assert (answer["outcome"], answer["command_id"]) == ("done", "R-1")
    new_sha = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))["files"][0]["sha256"]
    assert new_sha != old_sha
    assert answer["model"] == {"name": "tiny-test", "kind": "efficient_gan", "sha256": new_sha, "precision": "fp32"}
    assert answer["threshold"] == {"value": 0.1, "source": "bundle", "bundle_value": 0.1}
    _, now = station.inspect(_image(128))
    assert now.scorer.model_file.sha256 == new_sha and now.threshold_source == "bundle"
    assert "the threshold override is cleared" in caplog.text


def test_reload_of_the_same_model_keeps_the_override(station):
    station.send("threshold", {"value": 0.2})
    answer = station.reload()
    assert answer["outcome"] == "done"
    assert answer["threshold"]["source"] == "override"


@pytest.mark.parametrize(
    "damage, words",
    [
        ("corrupt model", "does not match its manifest (SHA-256"),
        ("no manifest", "manifest.json"),
        ("wrong shape", "the manifest does not belong to this model"),
    ],
)
def test_a_bad_bundle_is_refused_and_the_old_model_keeps_scoring(tmp_path, make_bundle, damage, words, caplog):
    bundle = make_bundle(tmp_path / "bundle")
    station = Station(_config(tmp_path, bundle))
    old_sha = station.live.scorer.model_file.sha256
    if damage == "corrupt model":
        with open(bundle / "model.onnx", "r+b") as handle:
            handle.seek(100)
            handle.write(b"\x00\x01\x02\x03")
    elif damage == "no manifest":
        (bundle / "manifest.json").unlink()
    else:
        _replace_bundle(bundle, make_bundle, graph_shape=(16, 16, 1))

    answer = station.reload({"command_id": "R-2"})
    assert (answer["outcome"], answer["code"], answer["command_id"]) == ("rejected", "bundle_refused", "R-2")
    assert words in answer["reason"], answer["reason"]
    assert station.inspect(_image(128))[1].scorer.model_file.sha256 == old_sha
    assert "cmd/reload refused" in caplog.text and "still scoring with tiny-test" in caplog.text


def test_a_second_reload_while_one_loads_is_answered_busy(station, monkeypatch):
    release = threading.Event()
    original = Scorer.load

    def slow_load(*args: Any, **kwargs: Any) -> Scorer:
        release.wait(10)  # holds the first reload in the loading step, as a big model would
        return original(*args, **kwargs)

    monkeypatch.setattr(Scorer, "load", slow_load)
    station.remote.handle("reload", b'{"command_id": "R-1"}', False, time.monotonic())
    station.remote.handle("reload", b'{"command_id": "R-2"}', False, time.monotonic())
    [busy] = station.answers
    assert (busy["code"], busy["command_id"]) == ("busy", "R-2")
    # The scoring loop is not held up meanwhile, nor are other commands.
    assert station.inspect(_image(128))[0].score.result == "OK"
    assert station.send("threshold", {"value": 0.2})["outcome"] == "done"
    release.set()
    station.remote.close()
    assert station.answers[-1]["command_id"] == "R-1" and station.answers[-1]["outcome"] == "done"


# -- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "section, message",
    [
        (
            {"commands": {"allow": ["trigger", "shutdown"]}},
            "mqtt.commands.allow.1: Input should be 'trigger', 'reload' or 'threshold'",
        ),
        ({"commands": {"max_payload_bytes": 10}}, "mqtt.commands.max_payload_bytes: Input should be greater than"),
        ({"commands": {"threshold_max_ratio": 0.5}}, "mqtt.commands.threshold_max_ratio: Input should be greater"),
        ({"commands": {"enable": True}}, "mqtt.commands.enable: unknown key"),
        ({"protocol": "5"}, "mqtt.protocol: Input should be 'v3.1.1' or 'v5' (got '5')"),
    ],
)
def test_command_and_protocol_config_mistakes_name_the_key(tmp_path, section, message):
    raw = {"station": STATION, "model": {"bundle": "b"}, "source": {"uri": "0"}, "mqtt": section}
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert message in str(caught.value)


def test_every_command_has_a_schema_file_and_a_model():
    assert set(COMMANDS) == {"trigger", "reload", "threshold"}
    for name in COMMANDS:
        assert (SCHEMA_DIR / f"cmd-{name}.schema.json").exists()


def test_the_daemon_can_refuse_a_reloaded_model_that_does_not_suit_its_inspection(tmp_path, make_bundle):
    from ganspect.edge.errors import BundleError

    bundle = make_bundle(tmp_path / "bundle")
    config = _config(tmp_path, bundle)

    def only_32_pixels(scorer: Scorer) -> None:
        if scorer.manifest.input.height != 32:
            raise BundleError(f"the model takes {scorer.manifest.input.height} px, the configured tiles 32 px")

    station = Station(config)
    station.live = LiveModel(station.live.scorer, config, check_model=only_32_pixels)
    station.remote = RemoteCommands(config, station.live, lambda request: None, station._answer)
    old_sha = station.live.scorer.model_file.sha256
    _replace_bundle(bundle, make_bundle, height=24, width=24)
    answer = station.reload({"command_id": "R-3"})
    assert (answer["code"], answer["reason"]) == ("bundle_refused", "the model takes 24 px, the configured tiles 32 px")
    now = station.live.in_force()
    assert (now.scorer.model_file.sha256, now.threshold, now.threshold_source) == (old_sha, 0.15, "bundle")


# -- fuzzing (docs/reliability.md): whatever arrives, one schema-valid answer and no internal error ----
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_FUZZ = settings(
    max_examples=int(__import__("os").environ.get("GANSPECT_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
_json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=20,
)
_names = st.one_of(st.sampled_from(["trigger", "threshold", "reload"]), st.text(max_size=20))
_VALID = {
    "trigger": {"part_id": "P-1", "trigger_id": "T-1"},
    "threshold": {"value": 0.16},
    "reload": {"command_id": "R-1"},
}


def _fuzz_answer(station: Station, name: str, payload: bytes) -> dict[str, Any]:
    answer = station.send(name, payload)  # asserts exactly one answer, validated against cmd-result.schema.json
    assert answer["code"] != "internal_error", answer
    return answer


@_FUZZ
@given(name=_names, payload=st.binary(max_size=600))
def test_fuzz_random_bytes(station, name, payload):
    _fuzz_answer(station, name, payload)


@_FUZZ
@given(name=_names, document=_json_values)
def test_fuzz_random_json(station, name, document):
    _fuzz_answer(station, name, json.dumps(document).encode())


@_FUZZ
@given(
    name=st.sampled_from(sorted(_VALID)),
    key=st.sampled_from(["part_id", "trigger_id", "value", "command_id", "station", "extra"]),
    value=st.one_of(_json_values, st.text(min_size=200, max_size=6000), st.just("\x00\n\x1b[31m")),
    depth=st.integers(0, 3000),
)
def test_fuzz_mutated_valid_commands(station, name, key, value, depth):
    document = dict(_VALID[name])
    document[key] = value
    text = json.dumps(document)
    if depth:  # deep nesting around the payload
        text = "[" * depth + text + "]" * depth
    _fuzz_answer(station, name, text.encode())
