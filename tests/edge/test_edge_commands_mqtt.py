"""MQTT commands end to end: the daemon as a real process, a real mosquitto, a real MES-side paho client.

Every message the daemon publishes here (verdicts, status, command answers) is checked
against its JSON Schema in edge/schemas/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

BASE_TOPIC = "gstest/testsite/l1/s1"
CMD = f"{BASE_TOPIC}/cmd"
PATTERN = [False, True, False, False, True, False, False, False, True, False]
DAEMON_TOPICS = ("/verdict", "/status", "/cmd/result")


def _logged(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n")[:-1]]


def _wait(condition: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _utc(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@pytest.fixture
def mes(mosquitto_broker: Any) -> Iterator[Callable[..., mqtt.Client]]:
    """Factory: mes(broker=mosquitto_broker) -> a connected paho client playing the MES, publishing commands."""
    clients: list[mqtt.Client] = []

    def connect(broker: Any = mosquitto_broker) -> mqtt.Client:
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-mes-{len(clients)}-{os.getpid()}"
        )
        client.max_inflight_messages_set(100)
        client.connect(broker.host, broker.port)
        client.loop_start()
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.disconnect()
        client.loop_stop()


def _send(client: mqtt.Client, name: str, payload: bytes | dict[str, Any], retain: bool = False) -> None:
    data = payload if isinstance(payload, bytes) else json.dumps(payload, ensure_ascii=False).encode()
    client.publish(f"{CMD}/{name}", data, qos=1, retain=retain).wait_for_publish(10)


def _from_daemon(sub: Any, validate_published: Callable[[str, bytes], Any]) -> dict[str, list[Any]]:
    """Every message the daemon published, validated against its schema, by topic suffix."""
    out: dict[str, list[Any]] = {suffix: [] for suffix in DAEMON_TOPICS}
    with sub.lock:
        messages = list(sub.messages)
    for m in messages:
        for suffix in DAEMON_TOPICS:
            if m.topic == BASE_TOPIC + suffix:
                out[suffix].append(validate_published(m.topic, m.payload))
    return out


# -- 1,000 hostile commands --------------------------------------------------------------------

OTHER_STATIONS = [
    {"site": "testsite", "line": "l1", "station": "s2"},
    {"site": "testsite", "line": "l2", "station": "s1"},
    {"site": "othersite", "line": "l1", "station": "s1"},
    {"site": "testsite", "line": "l1", "station": "S1"},
    {"site": "testsite", "line": "l1", "station": "s1 "},
]
UNKNOWN_NAMES = ["shutdown", "TRIGGER", "trigger2", "reboot", "", "exec", "触发", "x" * 200, "reload.now", "Threshold"]


def _hostile_commands() -> list[tuple[str, bytes, str, str | None]]:  # noqa: C901 — one branch per kind of bad command
    """(name, payload, expected code, id the answer must carry): 250 each malformed, oversized, wrong-station,
    unknown."""
    commands: list[tuple[str, bytes, str, str | None]] = []

    def add(name: str, payload: bytes | dict[str, Any], code: str, ident: str | None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload, ensure_ascii=False).encode()
        commands.append((name, data, code, ident))

    for i in range(250):  # malformed: not JSON, or JSON that breaks the command's schema
        ident = f"M-{i}"
        kind = i % 13
        if kind == 0:
            add("threshold", b"", "malformed", None)
        elif kind == 1:
            add("threshold", b'{"value": 0.2, "command_id": "' + ident.encode(), "malformed", None)
        elif kind == 2:
            add("trigger", b"\xff\xfe\x00garbage", "malformed", None)
        elif kind == 3:
            add("reload", b"[" * 3000, "malformed", None)
        elif kind == 4:
            add("trigger", b'{"part_id": "P"} trailing', "malformed", None)
        elif kind == 5:
            add("trigger", b"null", "invalid", None)
        elif kind == 6:
            add("trigger", {"part_id": 5, "trigger_id": ident}, "invalid", ident)
        elif kind == 7:
            add(
                "trigger",
                {"part_id": "P\r\n2026-01-01 ganspect: forged log line", "trigger_id": ident},
                "invalid",
                ident,
            )
        elif kind == 8:
            add("threshold", {"value": "0.2", "command_id": ident}, "invalid", ident)
        elif kind == 9:
            add("threshold", b'{"value": NaN, "command_id": "' + ident.encode() + b'"}', "invalid", ident)
        elif kind == 10:
            add("threshold", {"command_id": ident}, "invalid", ident)
        elif kind == 11:
            add("reload", {"path": "/etc/evil-bundle", "command_id": ident}, "invalid", ident)
        else:
            add("threshold", {"value": 0.2, "command_id": ident, "station": "s1"}, "invalid", ident)
    for i in range(250):  # oversized: over mqtt.commands.max_payload_bytes (4096), some far over
        size = 4097 + i * 37 if i % 10 else 100_000 + i * 400
        name = ("trigger", "threshold", "reload")[i % 3]
        add(name, b'{"part_id": "' + b"x" * (size - 15) + b'"}', "too_large", None)
    for i in range(250):  # wrong station: valid commands for someone else
        ident = f"W-{i}"
        station = OTHER_STATIONS[i % len(OTHER_STATIONS)]
        name = ("trigger", "threshold", "reload")[i % 3]
        payload: dict[str, Any] = {"station": station}
        if name == "trigger":
            payload.update(part_id=f"P-{i}", trigger_id=ident)
        else:
            payload.update(command_id=ident, **({"value": 0.3} if name == "threshold" else {}))
        add(name, payload, "wrong_station", ident)
    for i in range(250):  # unknown commands
        ident = f"U-{i}"
        add(UNKNOWN_NAMES[i % len(UNKNOWN_NAMES)], {"command_id": ident, "value": 0.3}, "unknown_command", ident)
    # Interleave the kinds, as a confused or hostile client would.
    return [commands[(i % 4) * 250 + i // 4] for i in range(1000)]


_NOT_JSON = object()


def _rfc_json(payload: bytes) -> Any:
    """The document, or _NOT_JSON for what RFC 8259 does not allow (bad UTF-8, NaN, too deep, ...)."""

    def no_constants(name: str) -> Any:
        raise ValueError(name)

    try:
        return json.loads(payload, parse_constant=no_constants)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _command_validator(name: str) -> Any:
    import jsonschema

    import ganspect.edge

    path = Path(ganspect.edge.__file__).parent / "schemas" / f"cmd-{name}.schema.json"
    return jsonschema.Draft202012Validator(json.loads(path.read_text(encoding="utf-8")))


def test_a_thousand_hostile_commands_are_each_rejected_with_a_reason_while_inspection_goes_on(  # noqa: PLR0915 — one daemon's life, start to stop, then every answer checked
    mosquitto_broker,
    mqtt_subscriber,
    mes,
    tiny_bundle,
    make_video,
    make_edge_config,
    validate_published,
    tmp_path,
    edge_daemon,
):
    sub = mqtt_subscriber(mosquitto_broker.host, mosquitto_broker.port, "gstest/#")
    client = mes()
    # A retained command left on the broker reaches the daemon when it subscribes: refused, not run.
    _send(client, "threshold", {"value": 0.2, "command_id": "retained-1"}, retain=True)
    video = make_video(tmp_path / "parts.avi", PATTERN)
    config = make_edge_config(tiny_bundle, video, mosquitto_broker, source={"loop": True, "max_fps": 25})
    verdict_log = tmp_path / "verdicts.jsonl"
    commands = _hostile_commands()
    proc = edge_daemon.start(config, verdict_log=verdict_log)
    _wait(
        lambda: len(sub.on("/verdict")) >= 10 and len(sub.on("/cmd/result")) >= 1,
        30,
        "the daemon inspecting, and its answer to the retained command",
    )
    flood_started = time.time()
    for name, payload, _, _ in commands:
        client.publish(f"{CMD}/{name}", payload, qos=1)
    _wait(lambda: len(sub.on("/cmd/result")) >= 1 + len(commands), 60, "an answer to every command")
    flood_answered = time.time()
    time.sleep(1.0)  # inspection goes on after the flood too
    stdout, stderr = edge_daemon.finish(proc)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "left in the outbox 0" in stdout, stdout

    published = _from_daemon(sub, validate_published)
    answers = published["/cmd/result"]
    assert len(answers) == 1 + len(commands), "exactly one answer per command"
    retained, flood = answers[0], answers[1:]
    assert (retained["outcome"], retained["code"], retained["command_id"]) == ("rejected", "retained", "retained-1")

    assert all(a["outcome"] == "rejected" and a["reason"] for a in flood)
    assert Counter(a["code"] for a in flood) == Counter(code for _, _, code, _ in commands)
    by_id = {a["command_id"]: a for a in flood if a["command_id"] is not None}
    expected_ids = {ident: code for _, _, code, ident in commands if ident is not None}
    assert {ident: by_id[ident]["code"] for ident in expected_ids} == expected_ids
    assert set(by_id) == set(expected_ids)
    assert "unknown command 'shutdown'" in by_id["U-0"]["reason"]
    assert by_id["U-7"]["command"] == "x" * 63 + "…"
    assert "the command is for testsite/l1/s2; this is testsite/l1/s1" in by_id["W-0"]["reason"]
    assert "path: is not a field of this command" in by_id["M-11"]["reason"]
    assert "part_id: must not contain control characters" in by_id["M-7"]["reason"]
    assert all(
        "more than mqtt.commands.max_payload_bytes (4096)" in a["reason"] for a in flood if a["code"] == "too_large"
    )
    # Where the payload was read, the schema files and the daemon agree on what is valid.
    checked = 0
    for name, payload, code, _ in commands:
        document = _rfc_json(payload)
        if name in ("trigger", "reload", "threshold") and len(payload) <= 4096 and document is not _NOT_JSON:
            valid = _command_validator(name).is_valid(document)
            assert valid == (code not in ("invalid", "malformed")), (name, payload, code)
            checked += 1
    assert checked >= 350  # the wrong-station ones and the readable malformed ones

    # Inspection went on during the flood, every verdict arrived, and nothing the flood said was carried out.
    produced = _logged(verdict_log)
    verdicts = published["/verdict"]
    assert [v["result_id"] for v in verdicts] == [p["result_id"] for p in produced]
    during = [v for v in produced if flood_started <= _utc(v["captured_at"]) <= flood_answered]
    assert len(during) >= 5, f"{len(during)} verdicts during a {flood_answered - flood_started:.1f} s flood"
    assert {v["threshold"]["source"] for v in verdicts} == {"bundle"}
    assert {v["model"]["sha256"] for v in verdicts} == {produced[0]["model"]["sha256"]}
    assert published["/status"][-1] == "stopped"

    # The journal gets a handful of lines, not a thousand, and none of the forged text raw.
    rejection_lines = [line for line in stderr.splitlines() if "rejected" in line]
    assert 1 <= len(rejection_lines) <= 6, rejection_lines
    assert re.search(r"\d+ more command\(s\) rejected within 10 s of the last one logged \(", stderr), stderr
    assert "\n2026-01-01 ganspect: forged log line" not in stderr
    seconds = flood_answered - flood_started
    print(
        f"\n1000 hostile commands answered in {seconds:.2f} s ({1000 / seconds:.0f}/s); "
        f"{len(during)} verdicts made meanwhile ({len(during) / seconds:.1f}/s, source paced at 25/s)"
    )


# -- trigger, threshold, reload ---------------------------------------------------------------


def _answer(sub: Any, command_id: str, timeout: float = 30) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        for m in sub.on("/cmd/result"):
            document = json.loads(m.payload)
            if document["command_id"] == command_id:
                return document
        return None

    _wait(lambda: find() is not None, timeout, f"the answer to {command_id}")
    answer = find()
    assert answer is not None
    return answer


def _verdicts_after(sub: Any, count: int, after: int, timeout: float = 30) -> list[dict[str, Any]]:
    _wait(lambda: len(sub.on("/verdict")) >= after + count, timeout, f"{count} more verdicts")
    return [json.loads(m.payload) for m in sub.on("/verdict")[after:]]


@pytest.mark.parametrize("protocol", ["v3.1.1", "v5"])
def test_threshold_reload_and_trigger_commands_over_mqtt(  # noqa: PLR0915 — one story across two daemon lives: what the first set, the restart keeps
    protocol,
    mosquitto_broker,
    mqtt_subscriber,
    mes,
    make_bundle,
    make_video,
    make_edge_config,
    validate_published,
    tmp_path,
    edge_daemon,
):
    bundle = make_bundle(tmp_path / "bundle")  # threshold 0.15; NG frames score about 0.28
    first_sha = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))["files"][0]["sha256"]
    sub = mqtt_subscriber(mosquitto_broker.host, mosquitto_broker.port, "gstest/#")
    client = mes()
    video = make_video(tmp_path / "parts.avi", PATTERN)
    config = make_edge_config(
        bundle, video, mosquitto_broker, source={"loop": True, "max_fps": 25}, mqtt={"protocol": protocol}
    )
    logs = [tmp_path / "run1.jsonl", tmp_path / "run2.jsonl"]

    proc = edge_daemon.start(config, verdict_log=logs[0])
    _wait(lambda: len(sub.on("/verdict")) >= 5, 30, "the daemon inspecting")
    _send(client, "trigger", {"part_id": "P-1", "trigger_id": "T-1"})
    trigger = _answer(sub, "T-1")
    assert (trigger["outcome"], trigger["code"]) == ("rejected", "not_accepted")
    assert "inspects continuously" in trigger["reason"]

    _send(
        client,
        "threshold",
        {"value": 0.3, "command_id": "C-1", "station": {"site": "testsite", "line": "l1", "station": "s1"}},
    )
    answer = _answer(sub, "C-1")
    assert (answer["outcome"], answer["threshold"]) == (
        "done",
        {"value": 0.3, "source": "override", "bundle_value": 0.15},
    )
    seen = len(sub.on("/verdict"))
    after = _verdicts_after(sub, 12, seen)
    # Verdicts made before the answer may still be on their way; from the first override on, all are.
    overridden = after[[v["threshold"]["source"] for v in after].index("override") :]
    assert len(overridden) >= 10
    assert all(v["threshold"] == {"value": 0.3, "source": "override"} for v in overridden)
    assert any(0.15 < v["score"] <= 0.3 and v["evaluation"]["state"] == "OK" for v in overridden), (
        "a part the bundle's threshold calls NG passes under the override"
    )
    stdout, stderr = edge_daemon.finish(proc)
    assert proc.returncode == 0, stderr

    # A restart keeps the override: how parts are judged does not change behind the MES's back.
    proc = edge_daemon.start(config, verdict_log=logs[1])
    seen = len(sub.on("/verdict"))
    assert all(v["threshold"]["source"] == "override" for v in _verdicts_after(sub, 3, seen))
    assert "threshold override 0.3 (bundle 0.15)" in _stderr_so_far(proc, "threshold override")

    # A new bundle in the configured folder; the reload brings its model and clears the old model's override.
    shutil.rmtree(bundle)
    make_bundle(bundle, height=24, width=24, threshold=0.2)
    second_sha = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))["files"][0]["sha256"]
    _send(client, "reload", {"command_id": "R-1"})
    answer = _answer(sub, "R-1")
    assert answer["outcome"] == "done", answer
    assert answer["model"]["sha256"] == second_sha != first_sha
    assert answer["threshold"] == {"value": 0.2, "source": "bundle", "bundle_value": 0.2}
    seen = len(sub.on("/verdict"))
    after = _verdicts_after(sub, 8, seen)
    swapped = after[[v["model"]["sha256"] for v in after].index(second_sha) :]
    assert len(swapped) >= 5
    assert all(
        v["model"]["sha256"] == second_sha and v["threshold"] == {"value": 0.2, "source": "bundle"} for v in swapped
    )

    # A damaged bundle is refused with its reason; the running model keeps scoring.
    with open(bundle / "model.onnx", "r+b") as handle:
        handle.seek(64)
        handle.write(b"\xde\xad\xbe\xef")
    _send(client, "reload", {"command_id": "R-2"})
    answer = _answer(sub, "R-2")
    assert (answer["outcome"], answer["code"]) == ("rejected", "bundle_refused")
    assert "does not match its manifest" in answer["reason"]
    seen = len(sub.on("/verdict"))
    assert {v["model"]["sha256"] for v in _verdicts_after(sub, 5, seen)} == {second_sha}
    stdout, stderr = edge_daemon.finish(proc)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "left in the outbox 0" in stdout

    published = _from_daemon(sub, validate_published)  # every message against its schema
    produced = _logged(logs[0]) + _logged(logs[1])
    assert {v["result_id"] for v in published["/verdict"]} == {p["result_id"] for p in produced}
    assert all(
        (v["score"] > v["threshold"]["value"]) == (v["evaluation"]["state"] == "NG") for v in published["/verdict"]
    )
    assert [a["command_id"] for a in published["/cmd/result"]] == ["T-1", "C-1", "R-1", "R-2"], (
        "one answer per command, and the daemon does not answer its own answers"
    )
    assert published["/status"] == ["online", "stopped", "online", "stopped"]
    # The broker's log names the protocol of each connection: p2 is MQTT 3.1.1, p5 is MQTT 5.
    broker_log = (tmp_path / f"mosquitto-{mosquitto_broker.port}.log").read_text(encoding="utf-8")
    levels = re.findall(r"as ganspect-testsite-l1-s1 \(p(\d)", broker_log)
    assert levels == ["5" if protocol == "v5" else "2"] * 2, broker_log


_stderr_seen: dict[int, str] = {}


def _stderr_so_far(proc: subprocess.Popen[str], needle: str, timeout: float = 10) -> str:
    """Read the daemon's stderr line by line until `needle` shows up (the daemon keeps running)."""
    assert proc.stderr is not None
    text = _stderr_seen.get(proc.pid, "")
    deadline = time.monotonic() + timeout
    while needle not in text and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        text += line
    _stderr_seen[proc.pid] = text
    return text


# -- answers and verdicts share paho's message ids ----------------------------------------------


def test_answers_published_from_other_threads_never_acknowledge_a_verdict(mosquitto_broker, tmp_path):
    # paho numbers answers and verdicts from one counter, and an answer's ack can be read before publish()
    # returns its id to the thread that sent it. Were such an ack taken for a verdict's, the outbox would keep
    # it and later delete, unsent, the verdict that gets the same id when the counter comes round (65535 ids).
    import threading
    import uuid

    import yaml

    from ganspect.edge.config import load_config
    from ganspect.edge.mqtt import VerdictPublisher
    from ganspect.edge.outbox import Outbox

    raw = {
        "station": {"site": "testsite", "line": "l1", "station": "s1"},
        "model": {"bundle": "b"},
        "source": {"uri": "0"},
        "mqtt": {
            "host": mosquitto_broker.host,
            "port": mosquitto_broker.port,
            "prefix": "gstest",
            "max_inflight": 50,
            "commands": {"max_pending_results": 100_000},
        },
    }
    (tmp_path / "edge.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    config = load_config(tmp_path / "edge.yaml")
    outbox = Outbox(tmp_path / "outbox.sqlite3", max_messages=100_000, max_bytes=1 << 26)
    publisher = VerdictPublisher(config.mqtt, config.station, outbox)
    real_publish = publisher._client.publish

    def publish_then_linger(*args: Any, **kwargs: Any) -> Any:
        # The broker's ack usually comes after publish() has returned; holding the return back a moment (a
        # busy 2-core line PC does it by chance) lets the network thread read the ack first, every time.
        info = real_publish(*args, **kwargs)
        time.sleep(0.002)
        return info

    publisher._client.publish = publish_then_linger  # type: ignore[method-assign]
    publisher.start()
    try:

        def answer_many() -> None:
            for _ in range(300):
                assert publisher.publish_result('{"answer": "test"}')

        threads = [threading.Thread(target=answer_many) for _ in range(3)]
        for thread in threads:
            thread.start()
        for seq in range(1, 201):
            payload = {"seq": seq, "result_id": str(uuid.uuid4())}
            publisher.submit(seq, payload["result_id"], json.dumps(payload))
        for thread in threads:
            thread.join()
        _wait(
            lambda: outbox.stats().backlog == 0 and not publisher._other_mids,
            30,
            "every verdict and answer acknowledged",
        )
        assert outbox.stats().acknowledged == 200
        assert outbox._early == set(), "an answer's ack reached the outbox"
        assert publisher._held_acks == []
    finally:
        publisher.close()
        outbox.close()


# -- the subscription -------------------------------------------------------------------------


def _publisher_with_commands(tmp_path: Path, broker: Any, **commands: Any) -> tuple[Any, Any, Any]:
    import yaml

    from ganspect.edge.app import EdgeDaemon
    from ganspect.edge.config import load_config
    from ganspect.edge.live_model import LiveModel
    from ganspect.edge.mqtt import VerdictPublisher
    from ganspect.edge.outbox import Outbox
    from ganspect.edge.remote import RemoteCommands
    from ganspect.edge.scorer import Scorer

    raw = {
        "station": {"site": "testsite", "line": "l1", "station": "s1"},
        "model": {"bundle": "bundle"},
        "source": {"uri": "0"},
        "mqtt": {
            "host": broker.host,
            "port": broker.port,
            "prefix": "gstest",
            "reconnect_max_delay_s": 1,
            "commands": commands,
        },
    }
    (tmp_path / "edge.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    config = load_config(tmp_path / "edge.yaml")
    outbox = Outbox(tmp_path / "outbox.sqlite3", max_messages=1000, max_bytes=1 << 20)
    publisher = VerdictPublisher(config.mqtt, config.station, outbox)
    live = LiveModel(Scorer.load(config.model.bundle, intra_op_threads=1), config)
    # The daemon's own trigger handler: this station is continuous, so it refuses triggers as the daemon would.
    remote = RemoteCommands(config, live, EdgeDaemon(config).accept_trigger, publisher.publish_result)
    publisher.start(on_command=remote.handle if config.mqtt.commands.enabled else None)
    return publisher, outbox, remote


def test_commands_are_heard_again_after_the_broker_restarts_and_only_on_the_stations_own_topic(
    start_broker, mqtt_subscriber, mes, tiny_bundle, tmp_path
):
    broker = start_broker()  # not persistent: a restarted broker has forgotten every subscription
    publisher, outbox, remote = _publisher_with_commands(tmp_path, broker)
    try:
        sub = mqtt_subscriber(broker.host, broker.port, f"{CMD}/result")
        client = mes(broker)
        _send(client, "threshold", {"value": 0.2, "command_id": "before"})
        assert _answer(sub, "before")["outcome"] == "done"

        broker.stop()
        broker = start_broker(broker.port)
        _wait(lambda: publisher.connected, 15, "the daemon connected again")
        sub = mqtt_subscriber(broker.host, broker.port, f"{CMD}/result")
        client = mes(broker)
        _send(client, "threshold", {"value": None, "command_id": "after"})
        assert _answer(sub, "after")["threshold"]["source"] == "bundle"

        # Another station's command topic is not this station's business: no answer, no effect.
        client.publish(
            "gstest/testsite/l1/s2/cmd/threshold", json.dumps({"value": 0.2, "command_id": "other"}), qos=1
        ).wait_for_publish(5)
        _send(client, "reload", {"command_id": "last"})
        _answer(sub, "last")
        assert [json.loads(m.payload)["command_id"] for m in sub.on("/cmd/result")] == ["after", "last"]
        assert remote.counts() == {"done": 3}
    finally:
        remote.close()
        publisher.close()
        outbox.close()


def test_with_commands_disabled_the_daemon_does_not_subscribe(
    mosquitto_broker, mqtt_subscriber, mes, tiny_bundle, tmp_path
):
    publisher, outbox, remote = _publisher_with_commands(tmp_path, mosquitto_broker, enabled=False)
    try:
        sub = mqtt_subscriber(mosquitto_broker.host, mosquitto_broker.port, f"{CMD}/result")
        _send(mes(), "threshold", {"value": 0.2, "command_id": "C-1"})
        time.sleep(1.0)
        assert sub.on("/cmd/result") == [] and remote.counts() == {}
    finally:
        remote.close()
        publisher.close()
        outbox.close()


# -- ids that are not Unicode text ---------------------------------------------------------------


def _surrogate_commands() -> list[tuple[str, bytes, str]]:
    """(name, payload, expected code): lone UTF-16 surrogates in every id field, escaped and as raw bytes.

    The answer carries the id of the command (trigger_id for cmd/trigger) only where it is text."""
    kinds = [
        ("threshold", b'{"value": null, "command_id": "\\ud800"}', "malformed"),
        ("threshold", b'{"value": 0.2, "command_id": "C-\xed\xa0\x80"}', "malformed"),  # the raw bytes of U+D800
        ("trigger", b'{"part_id": "P-1", "trigger_id": "\\udfff"}', "malformed"),
        ("trigger", b'{"part_id": "P-\\ud83d", "trigger_id": "T-1"}', "malformed"),
        ("reload", b'{"command_id": "R-\\udc00"}', "malformed"),
        ("reload", b'{"command_id": "\xed\xbf\xbf"}', "malformed"),
        ("shutdown", b'{"command_id": "\\ud800"}', "unknown_command"),
        ("shutdown", b'{"trigger_id": "\xed\xa0\x80"}', "unknown_command"),
    ]
    return [kinds[i % len(kinds)] for i in range(296)]


@pytest.mark.parametrize("protocol", ["v3.1.1", "v5"])
def test_commands_whose_ids_hold_lone_surrogates_are_each_answered_once_and_logged_a_few_times(
    protocol,
    mosquitto_broker,
    mqtt_subscriber,
    mes,
    tiny_bundle,
    make_video,
    make_edge_config,
    validate_published,
    tmp_path,
    edge_daemon,
):
    sub = mqtt_subscriber(mosquitto_broker.host, mosquitto_broker.port, "gstest/#")
    client = mes()
    video = make_video(tmp_path / "parts.avi", PATTERN)
    config = make_edge_config(
        tiny_bundle, video, mosquitto_broker, source={"loop": True, "max_fps": 25}, mqtt={"protocol": protocol}
    )
    commands = _surrogate_commands()
    proc = edge_daemon.start(config, verdict_log=tmp_path / "verdicts.jsonl")
    _wait(lambda: len(sub.on("/verdict")) >= 3, 30, "the daemon inspecting")
    for name, payload, _ in commands:
        client.publish(f"{CMD}/{name}", payload, qos=1)
    _wait(lambda: len(sub.on("/cmd/result")) >= len(commands), 30, "an answer to every command")
    _send(client, "threshold", {"value": None, "command_id": "after"})  # the station still takes commands
    _wait(lambda: len(sub.on("/cmd/result")) >= len(commands) + 1, 10, "the answer to a good command")
    time.sleep(0.5)
    stdout, stderr = edge_daemon.finish(proc)
    assert proc.returncode == 0, stderr
    answers = _from_daemon(sub, validate_published)["/cmd/result"]
    assert len(answers) == len(commands) + 1, "exactly one answer per command"
    assert [a["code"] for a in answers[:-1]] == [code for _, _, code in commands]
    assert [a["command_id"] for a in answers[:-1]] == [
        "T-1" if b'"T-1"' in payload else None for _, payload, _ in commands
    ], "an id that is not text is not echoed"
    assert (answers[-1]["command_id"], answers[-1]["outcome"]) == ("after", "done")
    assert "Traceback" not in stderr and "internal_error" not in stderr + stdout
    # Apart from the verdict lines (one per NG part), a handful: start-up, one rejection, a count, the tally.
    lines = [line for line in stderr.splitlines() if "ganspect.edge.app: #" not in line]
    assert len(lines) <= 12, "\n".join(lines)
    print(f"\n{len(commands)} commands with surrogate ids ({protocol}): {len(lines)} log lines besides verdicts")
