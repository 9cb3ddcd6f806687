"""TLS and credentials against a real mosquitto with certificates this module makes.

The PKI (a CA, a server certificate for localhost/127.0.0.1, a client certificate, an
unrelated "rogue" CA, and a server certificate for another host name) is generated with
the `openssl` command line into a temporary folder; the password file with
`mosquitto_passwd`. The broker requires TLS, a client certificate signed by the CA and
a user name with its password.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

import ganspect.edge
from ganspect.edge.config import EdgeConfig, load_config, read_password
from ganspect.edge.errors import ConfigError
from ganspect.edge.mqtt import MqttError, VerdictPublisher
from ganspect.edge.outbox import Outbox
from ganspect.edge.tls import tls_context

SCHEMA_PATH = Path(ganspect.edge.__file__).parent / "schemas" / "verdict.schema.json"
BASE_TOPIC = "gstest/testsite/l1/s1"
USER = "inspector"
PASSWORD = "s3cret-Pa55-7q"  # the test looks for this string in everything the daemon prints
WRONG_PASSWORD = "wr0ng-Pa55-9z"

pytestmark = pytest.mark.needs_tools("openssl", "mosquitto_passwd")


@dataclass(frozen=True)
class Pki:
    folder: Path
    ca: Path
    rogue_ca: Path
    server_cert: Path
    server_key: Path
    other_name_cert: Path  # signed by the CA, but for broker.example only
    other_name_key: Path
    client_cert: Path
    client_key: Path
    rogue_client_cert: Path  # signed by the rogue CA, which the broker does not trust
    rogue_client_key: Path


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)


def _leaf(folder: Path, name: str, extensions: str, ca: str = "ca") -> None:
    """name.key + name.crt signed by `ca`.crt, with the given X.509 v3 extensions."""
    _openssl(
        folder,
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
    )
    (folder / f"{name}.ext").write_text(
        extensions + "\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n",
        encoding="utf-8",
    )
    _openssl(
        folder,
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.crt",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        f"{name}.crt",
        "-extfile",
        f"{name}.ext",
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue"):
        _openssl(
            folder,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.crt",
            "-subj",
            f"/CN=ganspect test {ca} CA",
            "-days",
            "2",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        )
    _leaf(folder, "server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    _leaf(folder, "other", "subjectAltName=DNS:broker.example\nextendedKeyUsage=serverAuth")
    _leaf(folder, "client", "extendedKeyUsage=clientAuth")
    _leaf(folder, "rogue_client", "extendedKeyUsage=clientAuth", ca="rogue")
    return Pki(
        folder,
        folder / "ca.crt",
        folder / "rogue.crt",
        folder / "server.crt",
        folder / "server.key",
        folder / "other.crt",
        folder / "other.key",
        folder / "client.crt",
        folder / "client.key",
        folder / "rogue_client.crt",
        folder / "rogue_client.key",
    )


def _secure_broker(
    start_broker: Callable[..., Any], tmp_path: Path, pki: Pki, *, server: str = "server", port: int | None = None
) -> Any:
    """A mosquitto that wants TLS, a client certificate from the CA, and USER's password."""
    passwords = tmp_path / "mosquitto-passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), USER, PASSWORD], check=True, capture_output=True)
    return start_broker(
        port,
        listener_lines=[
            f"cafile {pki.ca}",
            f"certfile {pki.folder / f'{server}.crt'}",
            f"keyfile {pki.folder / f'{server}.key'}",
            "require_certificate true",
            f"password_file {passwords}",
        ],
        allow_anonymous=False,
    )


@pytest.fixture
def secure_broker(start_broker: Callable[..., Any], tmp_path: Path, pki: Pki) -> Any:
    return _secure_broker(start_broker, tmp_path, pki)


def _tls_setup(pki: Pki) -> Callable[[Any], None]:
    """The test subscriber's own TLS client and credentials (the broker accepts nothing less)."""

    def setup(client: Any) -> None:
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        client.tls_set_context(context)
        client.username_pw_set(USER, PASSWORD)

    return setup


def _tls_section(pki: Pki, **changes: Any) -> dict[str, Any]:
    section = {
        "enabled": True,
        "ca_file": str(pki.ca),
        "cert_file": str(pki.client_cert),
        "key_file": str(pki.client_key),
    }
    section.update(changes)
    return {key: value for key, value in section.items() if value is not None}


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ganspect edge: error:")]


# -- the daemon, end to end ---------------------------------------------------------------------


def test_daemon_over_tls_with_client_certificate_and_password_file_delivers_every_verdict(
    secure_broker, pki, tmp_path, tiny_bundle, tiny_video, make_edge_config, mqtt_subscriber, ganspect_cli
):
    # Certificates and password file next to the config, named relative to it.
    certs = tmp_path / "certs"
    certs.mkdir()
    for file in (pki.ca, pki.client_cert, pki.client_key):
        shutil.copy(file, certs / file.name)
    (tmp_path / "mqtt-password").write_text(PASSWORD + "\n", encoding="utf-8")
    config = make_edge_config(
        tiny_bundle,
        tiny_video.path,
        secure_broker,
        mqtt={
            "username": USER,
            "password_file": "mqtt-password",
            "require_broker": True,
            "tls": {
                "enabled": True,
                "ca_file": "certs/ca.crt",
                "cert_file": "certs/client.crt",
                "key_file": "certs/client.key",
            },
        },
    )
    sub = mqtt_subscriber(*secure_broker, f"{BASE_TOPIC}/#", setup=_tls_setup(pki))

    verdict_log = tmp_path / "verdicts.jsonl"
    proc = ganspect_cli("--verbose", "edge", "--config", str(config), "--headless", "--verdict-log", str(verdict_log))
    assert proc.returncode == 0, proc.stderr
    made = [json.loads(line) for line in verdict_log.read_text(encoding="utf-8").splitlines()]
    assert [v["evaluation"]["state"] for v in made] == tiny_video.expected

    received = sub.wait_for("/verdict", len(made))
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))
    payloads = [json.loads(m.payload) for m in received]
    for payload in payloads:
        validator.validate(payload)
    assert [p["result_id"] for p in payloads] == [v["result_id"] for v in made]
    assert [m.payload for m in sub.wait_for("/status", 2)][-1] == b"stopped"
    assert PASSWORD not in proc.stdout + proc.stderr  # DEBUG logging included


def test_wrong_password_is_a_refusal_that_names_the_password_source_but_never_shows_it(
    secure_broker, pki, tiny_bundle, tiny_video, make_edge_config, ganspect_cli
):
    config = make_edge_config(
        tiny_bundle,
        tiny_video.path,
        secure_broker,
        mqtt={
            "username": USER,
            "password_env": "GS_TEST_MQTT_PASSWORD",
            "connect_timeout_s": 20,
            "tls": _tls_section(pki),
        },
    )  # require_broker stays false: a refusal is fatal anyway
    started = time.monotonic()
    proc = ganspect_cli(
        "--verbose", "edge", "--config", str(config), "--headless", env={"GS_TEST_MQTT_PASSWORD": WRONG_PASSWORD}
    )
    assert time.monotonic() - started < 15  # told at once, not after connect_timeout_s
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr
    assert f"127.0.0.1:{secure_broker.port} refused the connection: Not authorized" in errors[0]
    assert "mqtt.username ('inspector')" in errors[0] and "GS_TEST_MQTT_PASSWORD" in errors[0]
    assert WRONG_PASSWORD not in proc.stdout + proc.stderr
    assert proc.stdout == ""


def test_missing_client_certificate_stops_the_daemon_naming_tls(
    secure_broker, pki, tiny_bundle, tiny_video, make_edge_config, ganspect_cli
):
    config = make_edge_config(
        tiny_bundle,
        tiny_video.path,
        secure_broker,
        mqtt={
            "username": USER,
            "password_env": "GS_TEST_MQTT_PASSWORD",
            "connect_timeout_s": 20,
            "tls": _tls_section(pki, cert_file=None, key_file=None),
        },
    )
    started = time.monotonic()
    proc = ganspect_cli("edge", "--config", str(config), "--headless", env={"GS_TEST_MQTT_PASSWORD": PASSWORD})
    assert time.monotonic() - started < 15
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr
    assert "TLS: the broker requires a client certificate" in errors[0]
    assert "set mqtt.tls.cert_file and mqtt.tls.key_file" in errors[0]
    assert PASSWORD not in proc.stdout + proc.stderr


# -- the publisher against the broker, in this process ------------------------------------------


def _config(tmp_path: Path, broker: Any, mqtt: dict[str, Any]) -> EdgeConfig:
    raw = {
        "station": {"site": "testsite", "line": "l1", "station": "s1"},
        "model": {"bundle": "bundle"},
        "source": {"uri": "parts.avi"},
        "mqtt": {
            "host": broker.host,
            "port": broker.port,
            "prefix": "gstest",
            "connect_timeout_s": 20,
            "drain_timeout_s": 2,
            **mqtt,
        },
    }
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return load_config(path)


def _start_publisher(config: EdgeConfig, tmp_path: Path) -> tuple[VerdictPublisher, Outbox]:
    outbox = Outbox(tmp_path / "outbox.sqlite3", max_messages=100, max_bytes=1 << 20)
    publisher = VerdictPublisher(config.mqtt, config.station, outbox, read_password(config.mqtt))
    try:
        publisher.start()
    except BaseException:
        outbox.close()
        raise
    return publisher, outbox


def test_password_from_the_environment_is_accepted(secure_broker, pki, tmp_path, monkeypatch, mqtt_subscriber):
    monkeypatch.setenv("GS_TEST_MQTT_PASSWORD", PASSWORD)
    config = _config(
        tmp_path, secure_broker, {"username": USER, "password_env": "GS_TEST_MQTT_PASSWORD", "tls": _tls_section(pki)}
    )
    publisher, outbox = _start_publisher(config, tmp_path)
    try:
        assert publisher.connected
        sub = mqtt_subscriber(*secure_broker, f"{BASE_TOPIC}/status", setup=_tls_setup(pki))
        assert [m.payload for m in sub.wait_for("/status", 1)] == [b"online"]  # retained, from the daemon
    finally:
        publisher.close()
        outbox.close()


@pytest.mark.parametrize(
    "case, words",
    [
        ("untrusted CA", "the broker's certificate did not verify (self-signed certificate in certificate chain)"),
        (
            "host name mismatch",
            "the broker's certificate did not verify (IP address mismatch, certificate is not valid for '127.0.0.1'",
        ),
        (
            "client certificate from another CA",
            "the broker rejected the TLS session (tlsv1 alert unknown ca); check that the client certificate",
        ),
    ],
)
def test_tls_failures_stop_start_up_at_once_with_the_reason(case, words, start_broker, pki, tmp_path, caplog):
    # require_broker is false: an untrusted certificate is fatal at start-up all the same, like a refusal.
    broker = _secure_broker(start_broker, tmp_path, pki, server="other" if case == "host name mismatch" else "server")
    tls = _tls_section(pki, ca_file=str(pki.rogue_ca) if case == "untrusted CA" else str(pki.ca))
    if case == "client certificate from another CA":
        tls.update(cert_file=str(pki.rogue_client_cert), key_file=str(pki.rogue_client_key))
    (tmp_path / "pw").write_text(PASSWORD, encoding="utf-8")
    config = _config(tmp_path, broker, {"username": USER, "password_file": "pw", "tls": tls})
    started = time.monotonic()
    with pytest.raises(MqttError) as caught:
        _start_publisher(config, tmp_path)
    assert time.monotonic() - started < 5  # not connect_timeout_s (20 s): the reason is known at once
    message = str(caught.value)
    assert message.startswith(f"MQTT broker 127.0.0.1:{broker.port}: TLS: ")
    assert words in message
    assert PASSWORD not in message + caplog.text


def test_tls_to_a_plain_listener_says_so(start_broker, pki, tmp_path):
    broker = start_broker()  # mosquitto drops the TLS greeting on a plain MQTT listener: indistinguishable
    config = _config(
        tmp_path,
        broker,
        {
            "tls": _tls_section(pki),
            "connect_timeout_s": 1,  # from a broker going
            "require_broker": True,
        },
    )  # down, so it is not fatal by itself
    with pytest.raises(
        MqttError,
        match=r"did not answer within 1 s \(.* during the TLS handshake: check that "
        r"mqtt.port is the broker's TLS listener\)",
    ):
        _start_publisher(config, tmp_path)


def test_with_tls_to_a_plain_listener_the_daemon_warns_and_keeps_inspecting(
    start_broker, pki, tiny_bundle, tiny_video, make_edge_config, ganspect_cli, tmp_path
):
    # What docs/mqtt.md and docs/security.md say: not fatal unless require_broker (the default is false).
    broker = start_broker()
    config = make_edge_config(
        tiny_bundle,
        tiny_video.path,
        broker,
        mqtt={"tls": _tls_section(pki), "connect_timeout_s": 1, "drain_timeout_s": 1},
    )
    verdict_log = tmp_path / "verdicts.jsonl"
    proc = ganspect_cli("edge", "--config", str(config), "--headless", "--verdict-log", str(verdict_log))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warning = [line for line in proc.stderr.splitlines() if "inspecting anyway" in line]
    assert (
        len(warning) == 1
        and "during the TLS handshake: check that mqtt.port is the broker's TLS listener" in warning[0]
    ), proc.stderr
    assert len(verdict_log.read_text(encoding="utf-8").splitlines()) == len(tiny_video.expected)
    assert f"left in the outbox {len(tiny_video.expected)}" in proc.stdout, proc.stdout


def test_a_tls_failure_after_start_up_is_logged_once_and_retried_with_back_off(
    secure_broker, start_broker, pki, tmp_path, caplog
):
    # The broker is down at start-up (inspecting without it), then comes back with a certificate we do not trust.
    port = secure_broker.port
    secure_broker.stop()
    config = _config(
        tmp_path,
        secure_broker,
        {
            "username": USER,
            "password_file": "pw",
            "connect_timeout_s": 0.5,
            "tls": _tls_section(pki, ca_file=str(pki.rogue_ca)),
        },
    )
    (tmp_path / "pw").write_text(PASSWORD, encoding="utf-8")
    publisher, outbox = _start_publisher(config, tmp_path)
    try:
        assert not publisher.connected
        _secure_broker(start_broker, tmp_path, pki, port=port)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "did not verify" not in caplog.text:
            time.sleep(0.1)
        time.sleep(3)  # further attempts back off (1 s, 2 s, ...) and repeat nothing
        tls_errors = [r for r in caplog.records if "did not verify" in r.getMessage()]
        assert len(tls_errors) == 1, caplog.text
        assert tls_errors[0].levelname == "ERROR"
        assert not publisher.connected
    finally:
        publisher.close()
        outbox.close()


# -- the tls section of the config --------------------------------------------------------------

_CONFIG_HEAD = """station: {site: s, line: l, station: c}
model: {bundle: b}
source: {uri: "0"}
mqtt:
  port: 8883
  tls:
"""


def _load(tmp_path: Path, tls_lines: str) -> EdgeConfig:
    path = tmp_path / "edge.yaml"
    path.write_text(_CONFIG_HEAD + tls_lines, encoding="utf-8")
    return load_config(path)


def test_certificate_paths_are_relative_to_the_config_folder(tmp_path, pki):
    for file in (pki.ca, pki.client_cert, pki.client_key):
        shutil.copy(file, tmp_path / file.name)
    config = _load(
        tmp_path, "    enabled: true\n    ca_file: ca.crt\n    cert_file: client.crt\n    key_file: client.key\n"
    )
    assert config.mqtt.tls.files() == {
        "ca_file": tmp_path / "ca.crt",
        "cert_file": tmp_path / "client.crt",
        "key_file": tmp_path / "client.key",
    }
    assert tls_context(config.mqtt.tls).verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    "tls_lines, message",
    [
        (
            "    enabled: true\n    cert_file: c.crt\n",
            "mqtt.tls: Value error, set both cert_file and key_file (the client certificate and its private key), "
            "or neither",
        ),
        ("    ca_file: ca.crt\n", "mqtt.tls: Value error, certificate files are set but enabled is false"),
        ("    enabled: true\n    insecure: true\n", "mqtt.tls.insecure: unknown key"),
        (
            "    enabled: true\n    ca_file: missing.crt\n",
            "edge.yaml:8: mqtt.tls.ca_file: cannot read {tmp}/missing.crt: No such file or directory",
        ),
    ],
)
def test_tls_config_mistakes_are_one_line_errors_naming_the_key(tmp_path, tls_lines, message):
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, tls_lines)
    assert message.format(tmp=tmp_path) in str(caught.value)


def test_unusable_certificate_files_are_config_errors_naming_the_key(tmp_path, pki):
    (tmp_path / "ca.crt").write_text("not a certificate\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^mqtt.tls.ca_file: cannot load CA certificates from .*ca.crt"):
        tls_context(_load(tmp_path, "    enabled: true\n    ca_file: ca.crt\n").mqtt.tls)

    # A key that does not belong to the certificate.
    config = _load(tmp_path, f"    enabled: true\n    cert_file: {pki.client_cert}\n    key_file: {pki.server_key}\n")
    with pytest.raises(
        ConfigError,
        match=r"^mqtt.tls.cert_file / mqtt.tls.key_file: cannot load the client "
        r"certificate .*key values mismatch",
    ):
        tls_context(config.mqtt.tls)

    # An encrypted key: an error, never a pass phrase prompt on a terminal the daemon does not have.
    _openssl(tmp_path, "pkey", "-in", str(pki.client_key), "-aes256", "-passout", "pass:phrase", "-out", "locked.key")
    config = _load(tmp_path, f"    enabled: true\n    cert_file: {pki.client_cert}\n    key_file: locked.key\n")
    with pytest.raises(ConfigError, match=r"^mqtt.tls.key_file: .*locked.key is encrypted with a pass phrase"):
        tls_context(config.mqtt.tls)
