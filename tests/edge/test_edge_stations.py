"""Several cameras on one PC: two daemons side by side, one broker, and `ganspect doctor` over every station.

Real parts: two `ganspect edge` processes running at once, each with its own config in a
`stations/` folder (as install.sh --multi writes them), its own video, data folder and
station name; one mosquitto on a free port; doctor run without --config over that folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

# Two views of one part stream with different defects, so a verdict under the wrong station shows.
PATTERNS = {
    "top": [False, True, False, False, True, False, False, False, True, False] * 3,
    "side": [False, False, False, True, False, False, True, True, False, False] * 3,
}


def _write_station(folder: Path, name: str, bundle: Path, media: Path, broker: Any, **sections: Any) -> Path:
    config: dict[str, Any] = {
        "station": {"site": "testsite", "line": "l1", "station": name},
        "model": {"bundle": str(bundle), "intra_op_threads": 1},
        "source": {"uri": str(media), "name": name},
        "mqtt": {"host": broker.host, "port": broker.port, "prefix": "gstest", "drain_timeout_s": 5},
        "data": {"dir": str(folder.parent / "data" / name)},
        "display": {"window": "off"},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ganspect.edge", "doctor", *args], capture_output=True, text=True, timeout=120
    )


def test_two_daemons_side_by_side_each_publish_every_verdict_under_their_own_station(
    tmp_path: Path,
    tiny_bundle: Path,
    make_video: Callable[..., Path],
    mosquitto_broker: Any,
    mqtt_subscriber: Callable[..., Any],
    edge_daemon: Any,  # tests/conftest.py's EdgeDaemons
) -> None:
    sub = mqtt_subscriber(mosquitto_broker.host, mosquitto_broker.port, "gstest/#")
    etc = tmp_path / "etc"
    configs = {
        name: _write_station(
            etc / "stations",
            name,
            tiny_bundle,
            make_video(tmp_path / f"{name}.avi", pattern),
            mosquitto_broker,
            source={"max_fps": 10},  # 3 s each: the two runs overlap
        )
        for name, pattern in PATTERNS.items()
    }
    daemons = {name: edge_daemon.start(config) for name, config in configs.items()}
    outputs = {name: edge_daemon.finish(proc, sig=None, timeout=120) for name, proc in daemons.items()}

    for name, proc in daemons.items():
        assert proc.returncode == 0, outputs[name][1]
    n = len(PATTERNS["top"])
    spans = {}
    for name, pattern in PATTERNS.items():
        received = sub.wait_for(f"/{name}/verdict", n)
        payloads = [json.loads(m.payload) for m in received]
        assert {m.topic for m in received} == {f"gstest/testsite/l1/{name}/verdict"}
        assert [p["seq"] for p in payloads] == list(range(1, n + 1))
        assert [p["part_id"] for p in payloads] == [f"{name}:{i}" for i in range(n)]
        assert [p["evaluation"]["state"] for p in payloads] == ["NG" if ng else "OK" for ng in pattern]
        assert {p["station"]["station"] for p in payloads} == {name}
        spans[name] = (payloads[0]["captured_at"], payloads[-1]["captured_at"])
        assert "left in the outbox 0" in outputs[name][0]
        assert [m.payload for m in sub.on(f"/{name}/status")] == [b"online", b"stopped"]
    time.sleep(0.2)  # a duplicate or stray verdict would have arrived by now
    assert len(sub.on("/verdict")) == 2 * n
    # Side by side, not one after the other (same clock, ISO 8601 UTC strings compare in time order).
    assert spans["top"][0] < spans["side"][1] and spans["side"][0] < spans["top"][1]

    doctor = _doctor("--config-dir", str(etc))
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    out = doctor.stdout
    assert "== station side:" in out and "== station top:" in out
    assert out.count("6/6 checks passed") == 2
    for name in ("cameras", "folders", "topics", "clients"):
        assert f"PASS  {name}" in out, out
    assert "2 stations: every check passed" in out


def test_doctor_names_the_configs_that_claim_one_camera_data_folder_and_station_path(
    tmp_path: Path, tiny_bundle: Path, tiny_video: Any, mosquitto_broker: Any
) -> None:
    stations = tmp_path / "etc" / "stations"
    # The camera under two names: the file itself and a link to it (as /dev/ganspect-camera-x -> /dev/video0).
    link = tmp_path / "camera-link.avi"
    link.symlink_to(tiny_video.path)
    data = {"dir": str(tmp_path / "shared-data")}
    first = _write_station(stations, "front", tiny_bundle, tiny_video.path, mosquitto_broker, data=data)
    second = _write_station(
        stations, "front2", tiny_bundle, link, mosquitto_broker, data=data, station={"station": "front"}
    )

    result = _doctor("--config-dir", str(tmp_path / "etc"))

    assert result.returncode == 1, result.stdout + result.stderr
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith(("PASS", "FAIL"))}
    for name, what in (("cameras", "camera"), ("folders", "data folder"), ("topics", "MQTT station path")):
        line = lines[name]
        assert line.startswith("FAIL") and what in line, result.stdout
        assert str(first) in line and str(second) in line
    assert str(tiny_video.path) in lines["cameras"] and f"source.uri {link}" in lines["cameras"]
    assert "gstest/testsite/l1/front" in lines["topics"]
    # The same station path gives the same default client id: one cause, reported once.
    assert lines["clients"].startswith("PASS")
    assert "failed: cameras, folders, topics" in result.stdout
    assert "hint: give each station its own camera" in result.stdout


def test_doctor_finds_an_explicit_client_id_shared_by_two_stations(
    tmp_path: Path, tiny_bundle: Path, make_video: Callable[..., Path], mosquitto_broker: Any
) -> None:
    stations = tmp_path / "etc" / "stations"
    for name in ("a", "b"):
        video = make_video(tmp_path / f"{name}.avi", [False, True])
        _write_station(stations, name, tiny_bundle, video, mosquitto_broker, mqtt={"client_id": "line3-camera"})

    result = _doctor("--config-dir", str(tmp_path / "etc"))

    assert result.returncode == 1
    clients = next(line for line in result.stdout.splitlines() if line.split()[1:2] == ["clients"])
    assert clients.startswith("FAIL") and "line3-camera on 127.0.0.1:" in clients
    assert "failed: clients" in result.stdout


def test_doctor_without_stations_says_where_it_looked(tmp_path: Path) -> None:
    result = _doctor("--config-dir", str(tmp_path))
    assert result.returncode == 2
    assert f"no station config in {tmp_path}" in result.stderr and "--config FILE" in result.stderr
