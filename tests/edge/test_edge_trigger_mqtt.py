"""Trigger mode end to end: a cmd/trigger over a real mosquitto reaches the daemon (a subprocess), which scores
the first frame captured after it and publishes that part's verdict with the command's part_id and trigger_id."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import jsonschema
import paho.mqtt.client as mqtt

import ganspect.edge

VERDICT_SCHEMA = json.loads((Path(ganspect.edge.__file__).parent / "schemas" / "verdict.schema.json").read_text())
BASE = "gstest/testsite/l1/s1"


def _captured_after(verdict: dict, sent_at: datetime) -> bool:
    # captured_at carries milliseconds, so a frame read 0.3 ms after its trigger reads as the same millisecond.
    captured = datetime.fromisoformat(verdict["captured_at"].replace("Z", "+00:00"))
    return captured >= sent_at.replace(microsecond=sent_at.microsecond // 1000 * 1000)


def test_a_trigger_over_mqtt_gives_that_parts_verdict_with_its_ids(
    mosquitto_broker, mqtt_subscriber, tiny_bundle, make_video, make_edge_config, tmp_path, edge_daemon
):
    pattern = [False] * 9 + [True]  # the looping "camera": mostly good parts, one defective frame in ten
    video = make_video(tmp_path / "line.avi", pattern, fps=20.0)
    sub = mqtt_subscriber(mosquitto_broker.host, mosquitto_broker.port, f"{BASE}/#")
    config = make_edge_config(
        tiny_bundle,
        video,
        mosquitto_broker,
        source={"loop": True},
        trigger={"mode": "mqtt"},
        health={"interval_s": 0.5},
    )
    proc = edge_daemon.start(config)
    plc = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-plc-{os.getpid()}")
    plc.connect(mosquitto_broker.host, mosquitto_broker.port)
    plc.loop_start()
    sent: list[tuple[str, str | None, datetime]] = []
    try:
        assert sub.wait_for("/status", 1, timeout=30), "the daemon did not come online"
        time.sleep(0.5)  # its subscription to cmd/+ follows the online status
        for _i, (part, trigger_id) in enumerate([("SN-0001", "T-1"), ("SN-0002", None), ("SN-0003", "T-3")]):
            payload = {"part_id": part, **({"trigger_id": trigger_id} if trigger_id else {})}
            sent.append((part, trigger_id, datetime.now(timezone.utc)))
            plc.publish(f"{BASE}/cmd/trigger", json.dumps(payload), qos=1).wait_for_publish(10)
            time.sleep(0.3)
        verdicts = [json.loads(m.payload) for m in sub.wait_for("/verdict", 3, timeout=20)]
        answers = [json.loads(m.payload) for m in sub.wait_for("/cmd/result", 3, timeout=20)]
        assert sub.wait_for("/metrics", 1, timeout=10)
    finally:
        plc.loop_stop()
        plc.disconnect()
        _stdout, stderr = edge_daemon.finish(proc)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    # No verdict without a trigger: trigger mode publishes one per trigger, in order, with its ids.
    assert [(v["part_id"], v["trigger_id"]) for v in verdicts] == [(p, t) for p, t, _ in sent]
    for verdict, (_, _, sent_at) in zip(verdicts, sent):
        jsonschema.validate(verdict, VERDICT_SCHEMA)
        assert verdict["evaluation"]["state"] in ("OK", "NG") and verdict["score"] is not None
        # The frame was captured after the command was sent, not before.
        assert _captured_after(verdict, sent_at)
    assert [(a["outcome"], a["part_id"]) for a in answers] == [("accepted", p) for p, _, _ in sent]
    metrics = json.loads(sub.on("/metrics")[-1].payload)
    assert metrics["trigger"]["mode"] == "mqtt" and metrics["results"]["UNDEFINED"] == 0


def test_a_reloaded_model_the_tiles_do_not_suit_is_refused_and_the_running_one_goes_on(
    mosquitto_broker, mqtt_subscriber, make_bundle, make_video, make_edge_config, tmp_path, edge_daemon
):
    bundle = make_bundle(tmp_path / "bundle")  # 32x32
    video = make_video(tmp_path / "line.avi", [False] * 10, fps=20.0)
    sub = mqtt_subscriber(mosquitto_broker.host, mosquitto_broker.port, f"{BASE}/#")
    config = make_edge_config(
        bundle,
        video,
        mosquitto_broker,
        source={"loop": True, "max_fps": 10},
        inspection={"tiling": "tiles", "roi": {"x": 0, "y": 0, "width": 40, "height": 40}, "tile_overlap": 8},
    )
    proc = edge_daemon.start(config)
    plc = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-mes-{os.getpid()}")
    plc.connect(mosquitto_broker.host, mosquitto_broker.port)
    plc.loop_start()
    try:
        assert len(sub.wait_for("/verdict", 3, timeout=30)) >= 3
        make_bundle(bundle, height=64, width=64)  # the line's engineer copies a model with larger tiles
        plc.publish(f"{BASE}/cmd/reload", json.dumps({"command_id": "R-1"}), qos=1).wait_for_publish(10)
        answers = [json.loads(m.payload) for m in sub.wait_for("/cmd/result", 1, timeout=30)]
        n = len(sub.on("/verdict"))
        assert len(sub.wait_for("/verdict", n + 3, timeout=20)) >= n + 3  # it goes on with the old model
    finally:
        plc.loop_stop()
        plc.disconnect()
        _stdout, stderr = edge_daemon.finish(proc)
    assert proc.returncode == 0, stderr
    assert answers[0]["outcome"] == "rejected", answers
    assert "inspection.roi 40x40 is smaller than the model's 64x64 tiles" in answers[0]["reason"]
    verdicts = [json.loads(m.payload) for m in sub.on("/verdict")]
    assert {v["model"]["sha256"] for v in verdicts} == {verdicts[0]["model"]["sha256"]}
    assert all(v["evaluation"]["state"] == "OK" for v in verdicts)


def test_ids_with_c1_bidi_or_invisible_characters_never_reach_a_verdict_or_the_log_raw(
    mosquitto_broker, mqtt_subscriber, tiny_bundle, make_video, make_edge_config, tmp_path, edge_daemon
):
    # NEL (U+0085) breaks a log line, CSI (U+009B) starts a terminal escape, U+202E reverses what a viewer shows,
    # U+2028 is a line break, U+200B makes two ids look alike.
    hostile = ["P\u0085FAKE\u009b31m", "SN-1\u202e9-X", "SN-1\u20282026-01-01 forged", "SN\u200b-1"]
    video = make_video(tmp_path / "line.avi", [False] * 10, fps=20.0)
    sub = mqtt_subscriber(mosquitto_broker.host, mosquitto_broker.port, f"{BASE}/#")
    config = make_edge_config(tiny_bundle, video, mosquitto_broker, source={"loop": True}, trigger={"mode": "mqtt"})
    proc = edge_daemon.start(config)
    plc = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-plc-{os.getpid()}")
    plc.connect(mosquitto_broker.host, mosquitto_broker.port)
    plc.loop_start()
    try:
        assert sub.wait_for("/status", 1, timeout=30), "the daemon did not come online"
        time.sleep(0.5)  # its subscription to cmd/+ follows the online status
        for i, part in enumerate(hostile):
            plc.publish(
                f"{BASE}/cmd/trigger", json.dumps({"part_id": part, "trigger_id": f"T-{i}"}, ensure_ascii=False), qos=1
            ).wait_for_publish(10)
        plc.publish(
            f"{BASE}/cmd/trigger",
            json.dumps({"part_id": "é-部品-1", "trigger_id": "T\u0085X"}, ensure_ascii=False),
            qos=1,
        ).wait_for_publish(10)
        plc.publish(
            f"{BASE}/cmd/trigger", json.dumps({"part_id": "é-部品-2", "trigger_id": "T-ok"}, ensure_ascii=False), qos=1
        ).wait_for_publish(10)
        answers = [json.loads(m.payload) for m in sub.wait_for("/cmd/result", 6, timeout=20)]
        verdicts = [json.loads(m.payload) for m in sub.wait_for("/verdict", 1, timeout=20)]
        time.sleep(0.5)
    finally:
        plc.loop_stop()
        plc.disconnect()
        stdout, stderr = edge_daemon.finish(proc)
    assert proc.returncode == 0, stderr
    assert [(a["outcome"], a["code"], a["command_id"]) for a in answers] == [
        ("rejected", "invalid", f"T-{i}") for i in range(len(hostile))
    ] + [("rejected", "invalid", None), ("accepted", None, "T-ok")]
    assert all(f"U+{ord(c):04X} at index" in a["reason"] for a, c in zip(answers, "\u0085\u202e\u2028\u200b"))
    assert [(v["part_id"], v["trigger_id"]) for v in verdicts] == [("é-部品-2", "T-ok")]
    # The log holds none of these characters raw: not in a verdict line, not in a rejection.
    unshowable = "\u0085\u009b\u202e\u2028\u200b"
    assert not any(c in stderr + stdout for c in unshowable), ascii(stderr)
    assert "é-部品-2" in stderr + stdout


def test_triggers_at_twice_the_frame_rate_each_get_exactly_one_verdict_none_refused(
    mosquitto_broker, mqtt_subscriber, tiny_bundle, make_video, make_edge_config, tmp_path, edge_daemon
):
    # A 20 fps "camera" and a PLC sending a trigger every 25 ms: two parts per frame interval. Each trigger is
    # bound to the first frame captured after it, and triggers sharing a frame share its inspection, so none
    # has to wait for a frame of its own (with one frame per trigger the queue overflowed and triggers were
    # refused). The configured defaults otherwise: the command rate limit must let a camera-rate line through.
    n = 80
    video = make_video(tmp_path / "line.avi", [False] * 9 + [True], fps=20.0)
    sub = mqtt_subscriber(mosquitto_broker.host, mosquitto_broker.port, f"{BASE}/#")
    config = make_edge_config(tiny_bundle, video, mosquitto_broker, source={"loop": True}, trigger={"mode": "mqtt"})
    proc = edge_daemon.start(config)
    plc = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-plc-{os.getpid()}")
    plc.connect(mosquitto_broker.host, mosquitto_broker.port)
    plc.loop_start()
    sent: dict[str, datetime] = {}
    try:
        assert sub.wait_for("/status", 1, timeout=30), "the daemon did not come online"
        time.sleep(0.5)  # its subscription to cmd/+ follows the online status
        start = time.monotonic()
        for i in range(n):
            time.sleep(max(0.0, start + i * 0.025 - time.monotonic()))
            trigger_id = f"T-{i}"
            sent[trigger_id] = datetime.now(timezone.utc)
            plc.publish(f"{BASE}/cmd/trigger", json.dumps({"part_id": f"SN-{i:04d}", "trigger_id": trigger_id}), qos=1)
        sub.wait_for("/verdict", n, timeout=60)
        time.sleep(0.5)  # a second verdict for any trigger would arrive meanwhile
    finally:
        plc.loop_stop()
        plc.disconnect()
        _, stderr = edge_daemon.finish(proc)
    assert proc.returncode == 0, stderr
    answers = [json.loads(m.payload) for m in sub.on("/cmd/result")]
    refused = [a for a in answers if a["outcome"] != "accepted"]
    assert not refused, [(a["command_id"], a.get("code"), a.get("reason")) for a in refused[:3]]
    assert sorted(a["command_id"] for a in answers) == sorted(sent)
    verdicts = [json.loads(m.payload) for m in sub.on("/verdict")]
    # Exactly one verdict per trigger (deduplicated by result_id, as a QoS 1 subscriber does), in trigger order.
    unique = list({v["result_id"]: v for v in verdicts}.values())
    assert [v["trigger_id"] for v in unique] == [f"T-{i}" for i in range(n)]
    assert [v["seq"] for v in unique] == sorted(v["seq"] for v in unique)
    for verdict in unique:
        assert verdict["part_id"] == f"SN-{int(verdict['trigger_id'][2:]):04d}"
        assert verdict["evaluation"]["state"] in ("OK", "NG"), verdict["evaluation"]
        assert _captured_after(verdict, sent[verdict["trigger_id"]]), "scored a frame captured before its trigger"
