"""`ganspect doctor [--config FILE ...]`: are the stations on this PC ready to inspect?

Maintenance staff run it after an install, a camera swap or a model update. Each check
prints one PASS / FAIL line with what it found and, when it fails, a hint that says what
to do. The exit code is 0 only when every check passed.

Without --config it checks every station install.sh put on the PC: /etc/ganspect/edge.yaml
(the single station) and /etc/ganspect/stations/*.yaml (one per camera, --multi). With more
than one station it also checks that no two configs claim the same camera, data folder
(outbox, images, models), MQTT station path or MQTT client id: two daemons on one of those
would fight over it (a camera opens once, an outbox has one writer, a broker keeps one
session per client id, an MES cannot tell two stations on one topic apart).

The checks use the daemon's own code paths (config loader, bundle verification with the
scorer's warm-up, source opening, the TLS context, the outbox quota), so a station that
passes here starts the same way under systemd. The checks never publish anything and
connect to the broker under their own client id, so running doctor next to a live daemon
does not disturb it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ganspect.edge.cli import Command
from ganspect.edge.config import EdgeConfig, is_path_like_source, read_password
from ganspect.edge.errors import ConfigError, GanspectError

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

    from ganspect.edge.mqtt import configured_client

    where = f"{mqtt_config.host}:{mqtt_config.port}"
    try:
        password = read_password(mqtt_config) if mqtt_config.username else None
        # The daemon's own set-up (protocol included: a v5-only broker must pass here as it does there).
        client = configured_client(mqtt.Client, mqtt_config, config.station, password, client_id_suffix="-doctor")
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
    return _station_checks(config_path)[1]


def _station_checks(config_path: Path) -> tuple[EdgeConfig | None, list[Check]]:
    from ganspect.edge.config import load_config

    try:
        config = load_config(config_path)
    except GanspectError as exc:
        return None, [
            Check("config", False, str(exc), "fix the file; `ganspect edge --config FILE --check` validates it")
        ]
    return config, [Check("config", True, f"{config_path} valid"), *(check(config) for check in CHECKS)]


def station_configs(config_dir: Path) -> list[Path]:
    """The configs install.sh writes: the single station's edge.yaml, then one per --multi station."""
    single = config_dir / "edge.yaml"
    return ([single] if single.is_file() else []) + sorted((config_dir / "stations").glob("*.yaml"))


def camera_key(uri: str) -> str:
    """One name per camera: an index is /dev/videoN, and links (/dev/ganspect-camera-top, by-id) resolve."""
    if uri.isdigit():
        uri = f"/dev/video{int(uri)}"
    return os.path.realpath(uri) if is_path_like_source(uri) else uri


def _client_id(config: EdgeConfig) -> str:
    s = config.station
    return config.mqtt.client_id or f"ganspect-{s.site}-{s.line}-{s.station}"


def check_shared(configs: dict[Path, EdgeConfig]) -> list[Check]:
    """One check per resource two daemons must not share, failing with every pair of configs that do."""
    published = {path: c for path, c in configs.items() if c.mqtt.enabled}
    claims: list[tuple[str, str, dict[Path, tuple[str, str]], str]] = [
        (
            "cameras",
            "camera",
            {path: (camera_key(c.source.uri), f"source.uri {c.source.uri}") for path, c in configs.items()},
            "give each station its own camera: one udev name per camera (install.sh --camera-id with the "
            "SERIAL, or --camera-port), or the /dev/v4l/by-id/ or by-path/ name",
        ),
        (
            "folders",
            "data folder",
            {path: (os.path.realpath(c.data.dir), f"data.dir {c.data.dir}") for path, c in configs.items()},
            "give each station its own data.dir (install.sh --multi uses /var/lib/ganspect/stations/STATION): "
            "the outbox and the seq counter have one writer",
        ),
        (
            "topics",
            "MQTT station path",
            {
                path: (f"{c.mqtt.prefix}/{c.station.site}/{c.station.line}/{c.station.station}", "station")
                for path, c in published.items()
            },
            "give each station its own station.station (its topic level): the MES tells the views apart by it",
        ),
        (
            "clients",
            "MQTT client id",
            {
                path: (f"{_client_id(c)} on {c.mqtt.host}:{c.mqtt.port}", "mqtt.client_id")
                for path, c in published.items()
            },
            "remove mqtt.client_id or make it differ: a broker drops the older of two sessions with one client "
            "id, and the two daemons would take turns",
        ),
    ]
    topics = {path: (c.mqtt.prefix, c.station) for path, c in published.items()}
    checks = []
    for name, what, keys, hint in claims:
        by_key: dict[str, list[Path]] = {}
        for path, (key, _) in keys.items():
            by_key.setdefault(key, []).append(path)
        shared = {key: paths for key, paths in by_key.items() if len(paths) > 1}
        if name == "clients":
            # Equal station paths give equal default client ids: "topics" already says so.
            shared = {key: paths for key, paths in shared.items() if len({str(topics[p]) for p in paths}) > 1}
        clashes = [
            f"{what} {key} is claimed by " + " and ".join(f"{path} ({keys[path][1]})" for path in paths)
            for key, paths in shared.items()
        ]
        if clashes:
            checks.append(Check(name, False, "; ".join(clashes), hint))
        else:
            checks.append(Check(name, True, f"each of the {len(keys)} stations has its own {what}"))
    return checks


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        action="append",
        default=None,
        help="edge config YAML, e.g. /etc/ganspect/edge.yaml; repeat it for several stations "
        "(default: every station in --config-dir)",
    )
    p.add_argument(
        "--config-dir",
        type=Path,
        default=Path("/etc/ganspect"),
        help="without --config: check DIR/edge.yaml and DIR/stations/*.yaml (default /etc/ganspect)",
    )


def _summary(checks: list[Check]) -> str:
    failed = [c.name for c in checks if not c.passed]
    return f"{len(checks) - len(failed)}/{len(checks)} checks passed" + (
        f"; failed: {', '.join(failed)}" if failed else ""
    )


def _run(args: argparse.Namespace) -> int:
    paths: list[Path] = args.config or station_configs(args.config_dir)
    if not paths:
        raise ConfigError(
            f"no station config in {args.config_dir} (edge.yaml or stations/*.yaml): give --config FILE "
            "or --config-dir DIR"
        )
    if len(paths) == 1:
        checks = run_checks(paths[0])
        for check in checks:
            print(check.line())
        print(_summary(checks))
        return 1 if any(not c.passed for c in checks) else 0
    configs: dict[Path, EdgeConfig] = {}
    failed: list[str] = []
    for path in paths:
        config, checks = _station_checks(path)
        label = config.station.station if config else re.sub(r"\.ya?ml$", "", path.name)
        print(f"== station {label}: {path}")
        for check in checks:
            print(check.line())
        print(_summary(checks))
        failed += [f"{label}: {c.name}" for c in checks if not c.passed]
        if config is not None:
            configs[path] = config
    print(f"== the {len(paths)} stations side by side")
    shared = check_shared(configs)
    for check in shared:
        print(check.line())
    failed += [c.name for c in shared if not c.passed]
    print(f"{len(paths)} stations: " + ("every check passed" if not failed else f"failed: {', '.join(failed)}"))
    return 1 if failed else 0


DOCTOR = Command(
    "check the stations on this PC: config, model bundle, camera, broker, data folder and display of each, "
    "and that no two share a camera, data folder or MQTT station path",
    _configure,
    _run,
)
