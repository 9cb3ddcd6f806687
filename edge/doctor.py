"""`ganspect doctor --config FILE`: is this station ready to inspect?

Maintenance staff run it after an install, a camera swap or a model update. Each check
prints one PASS / FAIL line with what it found and, when it fails, a hint that says what
to do. The exit code is 0 only when every check passed.

The checks use the daemon's own code paths (config loader, bundle verification with the
scorer's warm-up, source opening, the TLS context, the outbox quota), so a station that
passes here starts the same way under systemd. The checks never publish anything and
connect to the broker under their own client id, so running doctor next to a live daemon
does not disturb it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ganspect.edge.cli import Command
from ganspect.edge.config import EdgeConfig, read_password
from ganspect.edge.errors import GanspectError

_FRAMES_TO_READ = 3


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str
    hint: str = ""

    def line(self) -> str:
        text = f"{'PASS' if self.passed else 'FAIL'}  {self.name:<8} {self.detail}"
        return text if self.passed or not self.hint else f"{text}\n      hint: {self.hint}"


def check_model(config: EdgeConfig) -> Check:
    from ganspect.edge.scorer import Scorer

    try:
        scorer = Scorer.load(
            config.model.bundle, config.model.precision, config.model.intra_op_threads, config.model.trusted_keys
        )
    except GanspectError as exc:
        return Check(
            "model",
            False,
            str(exc),
            "install a bundle made by `ganspect export` (ganspect edge install-model BUNDLE) or fix "
            "model.bundle; never edit files inside a bundle",
        )
    m = scorer.manifest
    return Check(
        "model",
        True,
        f"{m.name} ({m.kind}, {scorer.model_file.precision}, "
        f"{m.input.width}x{m.input.height}x{m.input.channels}) verified from {config.model.bundle}",
    )


def check_camera(config: EdgeConfig) -> Check:
    from ganspect.edge.source import open_source

    uri = config.source.uri
    hint = (
        "check the camera is plugged in and that the daemon's user may read it (group video; "
        "ls -l /dev/v4l/by-id/), or fix source.uri"
    )
    try:
        source = open_source(config.source)
    except GanspectError as exc:
        return Check("camera", False, str(exc), hint)
    try:
        started = time.monotonic()
        frames = [frame for frame in (source.read() for _ in range(_FRAMES_TO_READ)) if frame is not None]
        elapsed = time.monotonic() - started
    finally:
        source.close()
    if not frames:
        return Check("camera", False, f"{uri} opened but delivered no frame", hint)
    height, width = frames[-1].image.shape[:2]
    return Check(
        "camera", True, f"{uri} delivered {len(frames)} frame(s) of {width}x{height} in {elapsed * 1000:.0f} ms"
    )


def check_broker(config: EdgeConfig) -> Check:
    mqtt_config = config.mqtt
    if not mqtt_config.enabled:
        return Check("broker", True, "mqtt.enabled is false: verdicts are logged, not published")
    import paho.mqtt.client as mqtt

    from ganspect.edge.mqtt import tls_context

    where = f"{mqtt_config.host}:{mqtt_config.port}"
    station = config.station
    client_id = (mqtt_config.client_id or f"ganspect-{station.site}-{station.line}-{station.station}") + "-doctor"
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    try:
        if mqtt_config.tls.enabled:
            client.tls_set_context(tls_context(mqtt_config.tls))
        if mqtt_config.username:
            password = read_password(mqtt_config)
            client.username_pw_set(mqtt_config.username, password.get_secret_value() if password else None)
    except GanspectError as exc:
        return Check("broker", False, str(exc), "fix the mqtt.tls files or the password source")
    answers: list[mqtt.ReasonCode] = []
    client.on_connect = lambda c, userdata, flags, reason_code, properties: answers.append(reason_code)
    try:
        client.connect(mqtt_config.host, mqtt_config.port, keepalive=10)
        deadline = time.monotonic() + mqtt_config.connect_timeout_s
        while not answers and time.monotonic() < deadline:
            if client.loop(timeout=0.1) not in (mqtt.MQTT_ERR_SUCCESS,):
                break
    except ssl.SSLCertVerificationError as exc:
        return Check(
            "broker",
            False,
            f"{where}: the broker's certificate did not verify ({exc.verify_message})",
            "mqtt.tls.ca_file must be the CA that signed the broker's certificate, and mqtt.host a name in it",
        )
    except ssl.SSLError as exc:
        return Check(
            "broker",
            False,
            f"{where}: TLS handshake failed ({exc.reason or exc})",
            "check mqtt.port is the broker's TLS listener and the client certificate settings",
        )
    except OSError as exc:
        return Check(
            "broker",
            False,
            f"{where}: cannot connect ({exc.strerror or exc})",
            "check that the broker runs, mqtt.host / mqtt.port, and the firewall; the daemon inspects "
            "without it (verdicts wait on disk) unless mqtt.require_broker is true",
        )
    finally:
        client.disconnect()
    if not answers:
        return Check(
            "broker",
            False,
            f"{where}: connected but no CONNACK within {mqtt_config.connect_timeout_s:g} s "
            "(the broker closed the session)",
            "a broker that drops the session after the handshake usually rejected the client "
            "certificate: check mqtt.tls.cert_file / key_file against the broker's CA",
        )
    if answers[0].is_failure:
        return Check(
            "broker",
            False,
            f"{where} refused the connection: {answers[0]}",
            "check mqtt.username and the password (mqtt.password_env / mqtt.password_file) and the broker's ACL",
        )
    security = "TLS" if mqtt_config.tls.enabled else "plain TCP"
    user = f", user {mqtt_config.username}" if mqtt_config.username else ""
    return Check("broker", True, f"{where} accepted the connection ({security}{user})")


def check_data_dir(config: EdgeConfig) -> Check:
    folder = config.data.dir
    hint = (
        f"create {folder} and give the daemon's user write access "
        "(deploy/install.sh does: /var/lib/ganspect, owned by ganspect), or fix data.dir"
    )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".doctor-") as probe:
            probe.write(b"ganspect doctor\n")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        return Check("data", False, f"{folder} is not writable ({exc.strerror or exc})", hint)
    free = shutil.disk_usage(folder).free
    # The outbox must be able to fill up to its quota during a broker outage without filling the disk.
    needed = config.mqtt.outbox.max_bytes * 2 if config.mqtt.enabled else 0
    if free < needed:
        return Check(
            "data",
            False,
            f"{folder}: {_mib(free)} free, less than twice the outbox quota "
            f"mqtt.outbox.max_bytes ({_mib(config.mqtt.outbox.max_bytes)})",
            "free disk space, or lower mqtt.outbox.max_bytes (a broker outage could otherwise fill the "
            "disk before the quota takes effect)",
        )
    return Check("data", True, f"{folder} writable, {_mib(free)} free")


def check_display(config: EdgeConfig) -> Check:
    from ganspect.edge.overlay import display_available

    mode = config.display.window
    if mode == "off":
        return Check("display", True, "display.window is off (headless station)")
    shown = display_available()
    where = f"DISPLAY={os.environ.get('DISPLAY', '')!r}"
    if mode == "on" and not shown:
        return Check(
            "display",
            False,
            f"display.window is on but no display answers ({where})",
            "run the daemon in the operator's desktop session (deploy/README.md: the window unit), "
            "or set display.window: auto / off",
        )
    return Check("display", True, f"display.window {mode}: {'a display answers' if shown else 'no display'} ({where})")


CHECKS: tuple[Callable[[EdgeConfig], Check], ...] = (
    check_model,
    check_camera,
    check_broker,
    check_data_dir,
    check_display,
)


def run_checks(config_path: Path) -> list[Check]:
    from ganspect.edge.config import load_config

    try:
        config = load_config(config_path)
    except GanspectError as exc:
        return [Check("config", False, str(exc), "fix the file; `ganspect edge --config FILE --check` validates it")]
    return [Check("config", True, f"{config_path} valid"), *(check(config) for check in CHECKS)]


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="edge config YAML, e.g. /etc/ganspect/edge.yaml")


def _run(args: argparse.Namespace) -> int:
    checks = run_checks(args.config)
    for check in checks:
        print(check.line())
    failed = [c.name for c in checks if not c.passed]
    print(
        f"{len(checks) - len(failed)}/{len(checks)} checks passed"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


DOCTOR = Command("check a station: config, model bundle, camera, broker, data folder and display", _configure, _run)
