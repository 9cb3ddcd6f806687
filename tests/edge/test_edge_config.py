"""Edge config: strict keys, one clear line per mistake, paths relative to the file, secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from ganspect.edge.config import EdgeConfig, load_config, read_password
from ganspect.edge.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

GOOD = """\
station:
  site: plant1
  line: line3
  station: cam1
model:
  bundle: bundle
source:
  uri: parts.avi
mqtt:
  port: 1884
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edge.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_example_config_in_the_repository_validates():
    config = load_config(REPO / "configs" / "edge.yaml")
    assert config.mqtt.qos == 1 and config.mqtt.prefix == "ganspect"
    assert config.model.bundle == REPO / "configs" / ".." / "work" / "demo" / "bundle"
    assert config.source.uri == "0"  # a camera index is not a path


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    config = load_config(_write(tmp_path, GOOD))
    assert config.model.bundle == tmp_path / "bundle"
    assert config.source.uri == str(tmp_path / "parts.avi")
    assert config.mqtt.port == 1884 and config.mqtt.host == "127.0.0.1"


def test_urls_are_left_alone(tmp_path):
    config = load_config(_write(tmp_path, GOOD.replace("parts.avi", "rtsp://cam.local:554/stream1")))
    assert config.source.uri == "rtsp://cam.local:554/stream1"


def test_every_field_has_a_description():
    def walk(model: type) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(f"{model.__name__}.{name}")
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                missing += walk(annotation)
        return missing

    assert walk(EdgeConfig) == []


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD + "  hostname: broker\n", "edge.yaml:11: mqtt.hostname: unknown key"),
        (GOOD.replace("port: 1884", "port: lots"), "edge.yaml:10: mqtt.port: Input should be a valid integer"),
        (
            GOOD.replace("port: 1884", "port: 70000"),
            "edge.yaml:10: mqtt.port: Input should be less than or equal to 65535",
        ),
        (GOOD.replace("  station: cam1\n", ""), "edge.yaml:1: station.station: required key is missing"),
        (GOOD.replace("site: plant1", "site: plant/1"), "edge.yaml:2: station.site: String should match pattern"),
        ("model:\n  bundle: b\nsource:\n  uri: '0'\n", "edge.yaml:1: station: required key is missing"),
        (GOOD + "displayy: {}\n", "edge.yaml:11: displayy: unknown key"),
        (GOOD + "  password_env: X\n", "mqtt: Value error, a password needs a username"),
        ("station: [unclosed\n", "not valid YAML"),
        ("- just\n- a list\n", "expected a mapping with station, model and source sections"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path, text, expected):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message
    assert expected in message


@pytest.mark.parametrize(
    "mistake, key",
    [
        ("  colour: blue\n", "source.colour: unknown key"),
        ("run:\n  max_frames: many\n", "run.max_frames: Input should be a valid integer"),
        ("", "station: required key is missing"),
    ],
)
def test_bad_config_exits_2_from_the_command(tmp_path, ganspect_cli, mistake, key):
    # An empty mistake means: the station section is left out.
    text = GOOD.replace("mqtt:\n  port: 1884\n", "") + mistake if mistake else GOOD[GOOD.index("model:") :]
    path = _write(tmp_path, text)
    proc = ganspect_cli("edge", "--config", str(path), "--check")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"ganspect edge: error: {path}:")
    assert key in lines[0]


def test_check_prints_config_ok(tmp_path, ganspect_cli, make_bundle):
    make_bundle(tmp_path / "bundle")  # --check loads the bundle the config names, as the daemon would
    path = _write(tmp_path, GOOD)
    proc = ganspect_cli("edge", "--config", str(path), "--check")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("config OK")


def test_missing_config_file(tmp_path, ganspect_cli):
    proc = ganspect_cli("edge", "--config", str(tmp_path / "nope.yaml"), "--check")
    assert proc.returncode == 2
    assert "cannot read config" in proc.stderr and "Traceback" not in proc.stderr


def test_password_from_env_and_file_is_never_shown(tmp_path, monkeypatch):
    config = load_config(_write(tmp_path, GOOD + "  username: u\n  password_env: GS_TEST_PW\n"))
    with pytest.raises(ConfigError, match="GS_TEST_PW is not set"):
        read_password(config.mqtt)
    monkeypatch.setenv("GS_TEST_PW", "s3cret-env")
    secret = read_password(config.mqtt)
    assert secret is not None and secret.get_secret_value() == "s3cret-env"
    assert "s3cret" not in repr(secret) and "s3cret" not in str(config)

    (tmp_path / "pw").write_text("s3cret-file\n", encoding="utf-8")
    config = load_config(_write(tmp_path, GOOD + "  username: u\n  password_file: pw\n"))
    assert config.mqtt.password_file == tmp_path / "pw"
    secret = read_password(config.mqtt)
    assert secret is not None and secret.get_secret_value() == "s3cret-file"


def test_both_password_sources_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="set password_env or password_file, not both"):
        load_config(_write(tmp_path, GOOD + "  username: u\n  password_env: A\n  password_file: pw\n"))


@pytest.mark.parametrize(
    ("written", "meant"), [("on", "on"), ("off", "off"), ("'on'", "on"), ("yes", "on"), ("auto", "auto")]
)
def test_unquoted_on_and_off_mean_what_an_operator_wrote(tmp_path, written, meant):
    # YAML 1.1 turns an unquoted on/off/yes into a boolean before the config sees it.
    config = load_config(_write(tmp_path, GOOD + f"display:\n  window: {written}\n"))
    assert config.display.window == meant


@pytest.mark.parametrize(
    ("mistake", "expected"),
    [
        (
            "inspection:\n  roi: {x: 0, y: 0, width: 64, heigth: 48}\n",
            "edge.yaml:12: inspection.roi.heigth: unknown key",
        ),
        ("trigger:\n  mode: plc\n", "edge.yaml:12: trigger.mode: Input should be 'continuous' or 'mqtt'"),
        ("images:\n  max_count: lots\n", "edge.yaml:12: images.max_count: Input should be a valid integer"),
        (
            "source:\n  uri: x\n  stale_after_s: -1\n",
            "edge.yaml:11: source.stale_after_s: Input should be greater than 0",
        ),
        ("health:\n  interval_s: 0\n", "edge.yaml:12: health.interval_s: Input should be greater than 0"),
    ],
)
def test_new_sections_are_strict_too(tmp_path, mistake, expected):
    text = GOOD.replace("source:\n  uri: parts.avi\n", "") if mistake.startswith("source:") else GOOD
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text + mistake))
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("flags", [["--check"], []])
def test_a_model_path_that_cannot_be_read_is_one_clear_line(tmp_path, ganspect_cli, flags):
    # GOOD names bundle/ next to the config: there is none.
    path = _write(tmp_path, GOOD.replace("port: 1884", "enabled: false"))
    proc = ganspect_cli("edge", "--config", str(path), "--headless", *flags)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("ganspect edge: error:") and "Traceback" not in proc.stderr
    assert f"model bundle {tmp_path / 'bundle'} is not a folder" in lines[-1]
    if flags:
        assert len(lines) == 1 and f"{path}: model.bundle: " in lines[0]


def test_check_config_loads_the_bundle_and_fits_the_tiles_to_it(tmp_path, ganspect_cli, make_bundle):
    make_bundle(tmp_path / "bundle")  # 32x32
    path = _write(tmp_path, GOOD)
    proc = ganspect_cli("edge", "--check-config", str(path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"config OK: {path}"
    path = _write(tmp_path, GOOD + "inspection:\n  tiling: tiles\n  roi: {x: 0, y: 0, width: 16, height: 64}\n")
    proc = ganspect_cli("edge", "--check-config", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ganspect edge: error:")]
    assert errors == [
        "ganspect edge: error: inspection.roi 16x64 is smaller than the model's 32x32 "
        "tiles; enlarge it or use inspection.tiling: resize"
    ]


def test_no_config_at_all_is_one_clear_line(ganspect_cli):
    proc = ganspect_cli("edge", "--headless")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "ganspect edge: error: give the config file: --config FILE (or --check-config FILE to only check it)"
    )


def test_trigger_mode_without_mqtt_is_refused_at_start_up(tmp_path):
    text = GOOD.replace("  port: 1884\n", "  enabled: false\n") + "trigger:\n  mode: mqtt\n"
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    assert "edge.yaml:12: trigger.mode: mqtt needs mqtt.enabled: true" in str(info.value)
    text = GOOD + "  commands:\n    allow: [threshold]\ntrigger:\n  mode: mqtt\n"
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    assert "edge.yaml:14: trigger.mode: mqtt needs mqtt.commands.enabled: true with trigger in" in str(info.value)


# Found by tests/fuzz: both ended in a traceback or a two-line message before.
def test_a_character_yaml_forbids_is_one_line_with_its_line_number(tmp_path):
    path = _write(tmp_path, GOOD + "  host: a\x1fb\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}:11: not valid YAML")


def test_a_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "edge.yaml"
    path.write_bytes(GOOD.encode() + "  host: M\xfcnchen\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"edge.yaml:11: not UTF-8 text \(byte 0xfc"):
        load_config(path)
