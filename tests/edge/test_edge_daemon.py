"""`ganspect edge` as a real subprocess against a real Mosquitto, a real ONNX bundle and real media."""

from __future__ import annotations

import json
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import jsonschema
import pytest

import ganspect.edge

SCHEMA_PATH = Path(ganspect.edge.__file__).parent / "schemas" / "verdict.schema.json"
BASE_TOPIC = "gstest/testsite/l1/s1"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _check_verdicts(
    payloads: list[dict[str, Any]],
    expected: list[str],
    source_name: str,
    validator: jsonschema.Draft202012Validator,
    bundle: Path,
) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    for p in payloads:
        validator.validate(p)
        assert (p["score"] > p["threshold"]["value"]) == (p["evaluation"]["state"] == "NG")
        assert p["threshold"]["source"] == "bundle" and p["evaluation"]["reason"] is None
        assert p["trigger_id"] is None and p["replayed"] is False
        assert datetime.fromisoformat(p["captured_at"].replace("Z", "+00:00")) <= datetime.fromisoformat(
            p["published_at"].replace("Z", "+00:00")
        )
    assert [p["seq"] for p in payloads] == list(range(1, len(expected) + 1))
    assert [p["evaluation"]["state"] for p in payloads] == expected
    assert [p["part_id"] for p in payloads] == [f"{source_name}:{i}" for i in range(len(expected))]
    assert len({p["result_id"] for p in payloads}) == len(payloads)
    assert {p["model"]["sha256"] for p in payloads} == {manifest["files"][0]["sha256"]}
    assert {json.dumps(p["station"], sort_keys=True) for p in payloads} == {
        json.dumps({"line": "l1", "site": "testsite", "station": "s1"})
    }


def test_video_run_publishes_one_valid_verdict_per_frame(
    mosquitto_broker, mqtt_subscriber, tiny_bundle, tiny_video, make_edge_config, ganspect_cli, validator, tmp_path
):
    sub = mqtt_subscriber(mosquitto_broker.host, mosquitto_broker.port, "gstest/#")
    config = make_edge_config(tiny_bundle, tiny_video.path, mosquitto_broker)
    verdict_log = tmp_path / "verdicts.jsonl"

    proc = ganspect_cli("edge", "--config", str(config), "--headless", "--verdict-log", str(verdict_log))

    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    n = len(tiny_video.expected)
    sub.wait_for("/status", 2)
    received = sub.wait_for("/verdict", n)
    time.sleep(0.2)  # anything extra would have arrived by now
    assert len(sub.on("/verdict")) == n
    assert {m.topic for m in received} == {f"{BASE_TOPIC}/verdict"}
    payloads = [json.loads(m.payload) for m in received]
    _check_verdicts(payloads, tiny_video.expected, "parts", validator, tiny_bundle)
    # The verdict log holds the same verdicts, one JSON object per line.
    logged = [json.loads(line) for line in verdict_log.read_text(encoding="utf-8").splitlines()]
    assert [p["result_id"] for p in logged] == [p["result_id"] for p in payloads]
    # Status: online while running, then stopped; a late subscriber gets `stopped` retained.
    assert [m.payload for m in sub.on("/status")] == [b"online", b"stopped"]
    late = mqtt_subscriber(mosquitto_broker.host, mosquitto_broker.port, f"{BASE_TOPIC}/status")
    retained = late.wait_for("/status", 1)
    assert [(m.payload, m.retain) for m in retained] == [(b"stopped", True)]
    # The summary counts what happened.
    n_ng = tiny_video.expected.count("NG")
    assert f"frames {n}: OK {n - n_ng}, NG {n_ng}" in proc.stdout
    assert (
        f"verdicts queued {n}, acknowledged {n} (replayed 0), dropped when full 0, left in the outbox 0" in proc.stdout
    )
    assert "p95" in proc.stdout
    # One concise log line per verdict (rate-limited at INFO; this video is too short to hit the limit for NG).
    assert "#3 parts:2 NG score" in proc.stderr


def test_image_folder_source_with_flag_overrides(
    mosquitto_broker,
    mqtt_subscriber,
    tiny_bundle,
    tiny_video,
    make_edge_config,
    make_part_image,
    ganspect_cli,
    validator,
    tmp_path,
):
    pattern = [True, False, False, True, False, True]
    folder = tmp_path / "station_images"
    folder.mkdir()
    for i, ng in enumerate(pattern):
        assert cv2.imwrite(str(folder / f"part_{i:03d}.png"), make_part_image(ng, i, (80, 60)))
    (folder / "notes.txt").write_text("not an image", encoding="utf-8")
    sub = mqtt_subscriber(mosquitto_broker.host, mosquitto_broker.port, "gstest/#")
    # The config names the video; --source and --max-frames override it.
    config = make_edge_config(tiny_bundle, tiny_video.path, mosquitto_broker)

    proc = ganspect_cli("edge", "--config", str(config), "--headless", "--source", str(folder), "--max-frames", "4")

    assert proc.returncode == 0, proc.stderr
    expected = ["NG" if ng else "OK" for ng in pattern[:4]]
    received = sub.wait_for("/verdict", 4)
    time.sleep(0.2)
    assert len(sub.on("/verdict")) == 4
    _check_verdicts([json.loads(m.payload) for m in received], expected, "station_images", validator, tiny_bundle)
    assert "stopped by max_frames 4" in proc.stdout
    assert "verdicts queued 4, acknowledged 4 (replayed 0), dropped when full 0, left in the outbox 0" in proc.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_after_every_verdict_is_acknowledged(
    sig, mosquitto_broker, mqtt_subscriber, tiny_bundle, tiny_video, make_edge_config, tmp_path, edge_daemon
):
    sub = mqtt_subscriber(mosquitto_broker.host, mosquitto_broker.port, "gstest/#")
    config = make_edge_config(tiny_bundle, tiny_video.path, mosquitto_broker, source={"loop": True, "max_fps": 40})
    proc = edge_daemon.start(config)
    # Past the end of the 8-frame video: looping works and part ids keep counting.
    assert len(sub.wait_for("/verdict", 12, timeout=30)) >= 12, "daemon published too few verdicts"
    stdout, stderr = edge_daemon.finish(proc, sig)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "stopped by signal" in stdout
    line = next(out for out in stdout.splitlines() if "verdicts queued" in out)
    published = int(line.split("queued ")[1].split(",")[0])
    assert f"acknowledged {published} (replayed 0), dropped when full 0, left in the outbox 0" in line
    received = sub.wait_for("/verdict", published)
    payloads = [json.loads(m.payload) for m in received]
    assert [p["seq"] for p in payloads] == list(range(1, published + 1))
    assert [p["part_id"] for p in payloads] == [f"parts:{i}" for i in range(published)]
    cycle = tiny_video.expected
    assert [p["evaluation"]["state"] for p in payloads] == [cycle[i % len(cycle)] for i in range(published)]
    assert [m.payload for m in sub.wait_for("/status", 2)] == [b"online", b"stopped"]


def test_required_broker_not_answering_is_one_clear_line(
    tiny_bundle, tiny_video, make_edge_config, ganspect_cli, unused_port
):
    config = make_edge_config(
        tiny_bundle,
        tiny_video.path,
        ("127.0.0.1", unused_port),
        mqtt={"enabled": True, "connect_timeout_s": 1.5, "require_broker": True},
    )
    proc = ganspect_cli("edge", "--config", str(config), "--headless")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [err for err in proc.stderr.splitlines() if err.startswith("ganspect edge: error:")]
    assert len(errors) == 1, proc.stderr
    assert f"127.0.0.1:{unused_port} did not answer within 1.5 s" in errors[0]
    assert "require_broker" in errors[0]


def test_no_broker_keeps_inspecting_and_keeps_the_verdicts_on_disk(
    tiny_bundle, tiny_video, make_edge_config, ganspect_cli, unused_port, tmp_path
):
    # require_broker is false by default: the daemon inspects and its verdicts wait in the outbox.
    config = make_edge_config(
        tiny_bundle,
        tiny_video.path,
        ("127.0.0.1", unused_port),
        mqtt={"enabled": True, "connect_timeout_s": 0.5, "drain_timeout_s": 0.5},
    )
    verdict_log = tmp_path / "v.jsonl"
    proc = ganspect_cli("edge", "--config", str(config), "--headless", "--verdict-log", str(verdict_log))
    n = len(tiny_video.expected)
    assert proc.returncode == 0, proc.stderr
    assert "did not answer within 0.5 s" in proc.stderr and "verdicts wait in the outbox" in proc.stderr
    assert (
        f"verdicts queued {n}, acknowledged 0 (replayed 0), dropped when full 0, left in the outbox {n}" in proc.stdout
    )
    assert f"outbox {tmp_path / 'edge-data' / 'outbox.sqlite3'}: 0 waiting at start, {n} at exit" in proc.stdout
    assert len(verdict_log.read_text(encoding="utf-8").splitlines()) == n


def test_verdicts_made_before_a_late_broker_are_delivered_when_it_starts(
    tiny_bundle, tiny_video, make_edge_config, start_broker, mqtt_subscriber, unused_port, edge_daemon
):
    config = make_edge_config(
        tiny_bundle,
        tiny_video.path,
        ("127.0.0.1", unused_port),
        mqtt={"enabled": True, "connect_timeout_s": 0.3, "reconnect_max_delay_s": 1},
        source={"loop": True, "max_fps": 10},
        run={"max_frames": 20},
    )
    proc = edge_daemon.start(config)
    # Start the broker only once the daemon has given up waiting for it (a loaded machine starts slowly).
    early = []
    while not early or "verdicts wait in the outbox" not in early[-1]:
        line = proc.stderr.readline()
        assert line, "".join(early)
        early.append(line)
    time.sleep(1.0)  # several verdicts are made while nothing listens
    broker = start_broker(unused_port)
    sub = mqtt_subscriber(broker.host, broker.port, "gstest/#")
    stdout, stderr = edge_daemon.finish(proc, sig=None)
    assert proc.returncode == 0, stderr
    line = next(out for out in stdout.splitlines() if "verdicts queued" in out)
    replayed = int(line.split("(replayed ")[1].split(")")[0])
    assert line == (
        f"  verdicts queued 20, acknowledged 20 (replayed {replayed}), dropped when full 0, left in the outbox 0"
    )
    assert replayed >= 5  # about 10 verdicts were made in the second before the broker started
    # The broker acknowledged all 20 (above), including those made while it was down. The
    # subscriber may join a moment after the daemon's reconnect, so it sees an in-order tail.
    sub.wait_for("/verdict", 20, timeout=3)
    payloads = [json.loads(m.payload) for m in sub.on("/verdict")]
    seqs = [p["seq"] for p in payloads]
    assert seqs and seqs == list(range(seqs[0], 21))
    # Those that waited for the broker are marked, the rest not, and the marked ones come first.
    flags = [p["replayed"] for p in payloads]
    assert flags == sorted(flags, reverse=True) and sum(flags) <= replayed


def test_mqtt_disabled_runs_and_logs(tiny_bundle, tiny_video, make_edge_config, ganspect_cli, tmp_path):
    config = make_edge_config(tiny_bundle, tiny_video.path, None)
    verdict_log = tmp_path / "v.jsonl"
    proc = ganspect_cli("edge", "--config", str(config), "--headless", "--verdict-log", str(verdict_log))
    assert proc.returncode == 0, proc.stderr
    assert "verdicts published: none (mqtt.enabled is false)" in proc.stdout
    logged = [json.loads(line) for line in verdict_log.read_text(encoding="utf-8").splitlines()]
    assert [p["evaluation"]["state"] for p in logged] == tiny_video.expected
    # The station's seq is kept on disk even without MQTT: a second run continues it.
    proc = ganspect_cli(
        "edge", "--config", str(config), "--headless", "--verdict-log", str(verdict_log), "--max-frames", "2"
    )
    assert proc.returncode == 0, proc.stderr
    seqs = [json.loads(line)["seq"] for line in verdict_log.read_text(encoding="utf-8").splitlines()]
    assert seqs == list(range(1, len(tiny_video.expected) + 3))


def test_unopenable_source_is_one_clear_line(tiny_bundle, make_edge_config, ganspect_cli, tmp_path):
    broken = tmp_path / "broken.avi"
    broken.write_bytes(b"this is not a video")
    for source, words in [(tmp_path / "missing.avi", "does not exist"), (broken, "cannot open video source")]:
        config = make_edge_config(tiny_bundle, source, None)
        proc = ganspect_cli("edge", "--config", str(config), "--headless")
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert words in proc.stderr


def test_a_non_finite_score_is_an_undefined_result_that_still_validates(tiny_bundle, validator):
    from datetime import timezone

    import numpy as np

    from ganspect.edge.common import utc_iso
    from ganspect.edge.manifest import load_bundle
    from ganspect.edge.scorer import Score
    from ganspect.edge.verdict import (
        HeatmapPeak,
        ModelUsed,
        StationName,
        ThresholdUsed,
        Timings,
        Verdict,
        finite_or_none,
        judge,
    )

    bundle = load_bundle(tiny_bundle)
    now = utc_iso(datetime.now(timezone.utc))
    for value in (float("nan"), float("inf")):
        score = Score(
            score=value,
            threshold=0.15,
            heatmap=np.zeros((2, 2), np.float32),
            peak_x=1,
            peak_y=0,
            peak_value=value,
            preprocess_ms=0.1,
            inference_ms=0.2,
        )
        verdict = Verdict(
            seq=7,
            result_id="0b6f1a52-1d7e-4c3e-9a57-3f0c2a6f5e11",
            part_id="cam:3",
            trigger_id=None,
            station=StationName(site="testsite", line="l1", station="s1"),
            captured_at=now,
            published_at=now,
            evaluation=judge(score.score, 0.15),
            score=finite_or_none(score.score),
            threshold=ThresholdUsed(value=0.15, source="bundle"),
            model=ModelUsed.of(bundle.manifest, bundle.manifest.model_file()),
            processing_ms=Timings(capture_age=0.0, preprocess=0.1, inference=0.2, overlay=None, total=0.5),
            heatmap_peak=HeatmapPeak.of(score),
            image_path=None,
        )
        payload = json.loads(verdict.json_text())
        validator.validate(payload)
        assert payload["evaluation"]["state"] == "UNDEFINED" and "non-finite" in payload["evaluation"]["reason"]
        assert payload["score"] is None and payload["heatmap_peak"]["value"] is None


def test_window_on_with_a_display_that_does_not_answer_is_one_clear_line(
    tiny_bundle, tiny_video, make_edge_config, ganspect_cli
):
    # Without the check, OpenCV's Qt backend would abort the process on this display.
    config = make_edge_config(tiny_bundle, tiny_video.path, None, display={"window": "on"})
    proc = ganspect_cli("edge", "--config", str(config), env={"DISPLAY": "127.0.0.1:59", "WAYLAND_DISPLAY": ""})

    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "display.window is on but no display answers (DISPLAY='127.0.0.1:59')" in proc.stderr


def test_sigterm_while_starting_is_a_clean_stop(
    tiny_bundle, tiny_video, make_edge_config, unused_port, tmp_path, edge_daemon
):
    # Start-up waits for a broker that never answers (connect_timeout_s); systemd may stop the unit meanwhile.
    config = make_edge_config(
        tiny_bundle, tiny_video.path, ("127.0.0.1", unused_port), mqtt={"connect_timeout_s": 20}, source={"loop": True}
    )
    proc = edge_daemon.start(config)
    time.sleep(2.0)  # past the imports and the model load, inside the broker wait
    _stdout, stderr = edge_daemon.finish(proc, timeout=15)  # not the 20 s broker wait: a stop ends it
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
