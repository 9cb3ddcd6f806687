"""`ganspect doctor`: every check passes on a good station and fails, with its hint, on a broken one.

All real: the tiny ONNX bundle, a video file read by OpenCV as the camera, a mosquitto on
a free port, the data folder on disk. The "full disk" is the outbox quota set larger than
the free space, which is what the data check compares.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import pytest


def _lines(result: CompletedProcess[str]) -> dict[str, str]:
    """The PASS/FAIL line of each check, by check name (with its hint line, when there is one)."""
    found: dict[str, str] = {}
    name = ""
    for line in result.stdout.splitlines():
        if line.startswith(("PASS", "FAIL")):
            name = line.split()[1]
            found[name] = line
        elif line.strip().startswith("hint:") and name:
            found[name] += "\n" + line
    return found


@pytest.fixture
def station(
    tiny_bundle: Path, tiny_video: Any, mosquitto_broker: Any, make_edge_config: Callable[..., Path], tmp_path: Path
) -> Callable[..., Path]:
    """A good station's config; keyword sections override it, e.g. station(mqtt={"port": 1})."""

    def make(**overrides: dict[str, Any]) -> Path:
        sections: dict[str, dict[str, Any]] = {"data": {"dir": str(tmp_path / "data")}}
        for section, values in overrides.items():
            sections.setdefault(section, {}).update(values)
        return make_edge_config(tiny_bundle, tiny_video.path, mosquitto_broker, **sections)

    return make


def test_good_station_passes_every_check(station: Callable[..., Path], ganspect_cli: Callable[..., Any]) -> None:
    result = ganspect_cli("doctor", "--config", str(station()))
    checks = _lines(result)
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(checks) == {"config", "model", "camera", "broker", "data", "display"}
    assert all(line.startswith("PASS") for line in checks.values()), result.stdout
    assert "tiny-test" in checks["model"] and "64x48" in checks["camera"]
    assert "6/6 checks passed" in result.stdout


def _only_failure(result: CompletedProcess[str], name: str) -> str:
    checks = _lines(result)
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [n for n, line in checks.items() if line.startswith("FAIL")]
    assert failed == [name], result.stdout
    assert "Traceback" not in result.stderr
    assert "hint:" in checks[name]
    return checks[name]


def test_changed_model_file_fails_the_model_check(
    station: Callable[..., Path], tiny_bundle: Path, ganspect_cli: Callable[..., Any]
) -> None:
    model = tiny_bundle / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    line = _only_failure(ganspect_cli("doctor", "--config", str(station())), "model")
    assert "SHA-256" in line or "sha256" in line.lower()


def test_no_broker_fails_the_broker_check(
    station: Callable[..., Path], unused_port: int, ganspect_cli: Callable[..., Any]
) -> None:
    config = station(mqtt={"port": unused_port, "connect_timeout_s": 1})
    line = _only_failure(ganspect_cli("doctor", "--config", str(config)), "broker")
    assert f"127.0.0.1:{unused_port}" in line and "broker runs" in line


def test_wrong_password_fails_the_broker_check(
    start_broker: Callable[..., Any], tmp_path: Path, station: Callable[..., Path], ganspect_cli: Callable[..., Any]
) -> None:
    import subprocess

    passwords = tmp_path / "passwords"
    passwords.write_text("", encoding="utf-8")
    subprocess.run(["mosquitto_passwd", "-b", str(passwords), "inspector", "right"], check=True)
    broker = start_broker(listener_lines=[f"password_file {passwords}"], allow_anonymous=False)
    config = station(mqtt={"port": broker.port, "username": "inspector", "password_env": "DOCTOR_TEST_PW"})
    line = _only_failure(ganspect_cli("doctor", "--config", str(config), env={"DOCTOR_TEST_PW": "wrong"}), "broker")
    assert "refused" in line and "mqtt.username" in line
    good = ganspect_cli("doctor", "--config", str(config), env={"DOCTOR_TEST_PW": "right"})
    assert good.returncode == 0, good.stdout


def test_broker_check_speaks_the_configured_protocol(
    station: Callable[..., Path], mosquitto_broker: Any, tmp_path: Path, ganspect_cli: Callable[..., Any]
) -> None:
    # The doctor builds the daemon's client: with mqtt.protocol v5 it connects as MQTT 5, which mosquitto logs
    # as "p5" (a v5-only broker would refuse a 3.1.1 doctor while the daemon connects).
    result = ganspect_cli("doctor", "--config", str(station(mqtt={"protocol": "v5"})))
    assert result.returncode == 0, result.stdout + result.stderr
    broker_log = (tmp_path / f"mosquitto-{mosquitto_broker.port}.log").read_text(encoding="utf-8")
    connects = [line for line in broker_log.splitlines() if "-doctor (" in line]
    assert connects and all("(p5," in line for line in connects), broker_log


def test_unreadable_camera_fails_the_camera_check(
    station: Callable[..., Path], tmp_path: Path, ganspect_cli: Callable[..., Any]
) -> None:
    not_a_video = tmp_path / "camera.avi"
    not_a_video.write_bytes(os.urandom(4096))
    line = _only_failure(ganspect_cli("doctor", "--config", str(station(source={"uri": str(not_a_video)}))), "camera")
    assert "camera.avi" in line and "group video" in line


def test_outbox_quota_beyond_free_space_fails_the_data_check(
    station: Callable[..., Path], ganspect_cli: Callable[..., Any]
) -> None:
    config = station(mqtt={"outbox": {"max_bytes": 2**60}})
    line = _only_failure(ganspect_cli("doctor", "--config", str(config)), "data")
    assert "mqtt.outbox.max_bytes" in line


def test_unwritable_data_folder_fails_the_data_check(
    station: Callable[..., Path], tmp_path: Path, ganspect_cli: Callable[..., Any]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    line = _only_failure(ganspect_cli("doctor", "--config", str(station(data={"dir": str(blocker / "data")}))), "data")
    assert "not writable" in line


def test_window_on_without_display_fails_the_display_check(
    station: Callable[..., Path], ganspect_cli: Callable[..., Any]
) -> None:
    env = {"DISPLAY": ":250", "WAYLAND_DISPLAY": ""}  # nothing serves display 250 here
    line = _only_failure(ganspect_cli("doctor", "--config", str(station(display={"window": "on"})), env=env), "display")
    assert "display.window is on" in line


def test_invalid_config_is_one_failed_check(tmp_path: Path, ganspect_cli: Callable[..., Any]) -> None:
    config = tmp_path / "edge.yaml"
    config.write_text(
        "station: {site: a, line: b, station: c}\nmodel: {bundle: x}\nsource: {uri: '0'}\nmqtt: {hostname: nowhere}\n",
        encoding="utf-8",
    )
    result = ganspect_cli("doctor", "--config", str(config))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert _lines(result)["config"].startswith("FAIL") and "mqtt.hostname" in result.stdout
