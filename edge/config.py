"""The edge daemon's YAML config, validated into typed sections.

Every section forbids unknown keys, so a typo (`mqtt.hostname`) is an error at start-up
rather than a silently ignored setting. Errors are raised as `ConfigError` with one
line that names the file, the YAML line, the key path and what was expected.

Relative paths in the file (model bundle, source, password file, TLS certificates, data folder)
resolve against the folder that holds the config file, so a config can be moved together with its
bundle.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from ganspect.edge.common import first_line
from ganspect.edge.errors import ConfigError, key_path

# Names that become MQTT topic levels: no wildcards, no separators, no spaces.
_TOPIC_LEVEL = r"^[A-Za-z0-9_.\-]+$"
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StationConfig(_Section):
    site: str = Field(pattern=_TOPIC_LEVEL, description="Plant or site name; a topic level.")
    line: str = Field(pattern=_TOPIC_LEVEL, description="Production line name; a topic level.")
    station: str = Field(pattern=_TOPIC_LEVEL, description="Inspection station name; a topic level.")


class ModelConfig(_Section):
    bundle: Path = Field(description="Model bundle folder (model.onnx and/or model.int8.onnx + manifest.json).")
    precision: Literal["auto", "fp32", "int8"] = Field(
        "auto", description="Which ONNX file to run: auto = INT8 when the bundle has one, else FP32."
    )
    intra_op_threads: int = Field(
        0, ge=0, le=256, description="onnxruntime intra-op threads; 0 lets onnxruntime choose (one per core)."
    )
    trusted_keys: tuple[Path, ...] = Field(
        (),
        description="PEM files of the Ed25519 public keys whose bundles this station takes (ganspect export "
        "--sign); relative to the config file. Set: an unsigned bundle, or one signed by another key or changed "
        "after signing, is refused at start-up, install-model and cmd/reload. Empty: bundles need no signature "
        "(their hashes and golden images are still checked). docs/security.md: making and rotating keys.",
    )


class CameraConfig(_Section):
    fourcc: str | None = Field(
        None,
        pattern=r"^[A-Z0-9]{4}$",
        description="Pixel format asked of a USB camera, e.g. MJPG (high resolution at full rate over USB 2) or YUYV; "
        "none = the driver's default.",
    )
    width: int | None = Field(None, ge=16, le=16384, description="Frame width asked of the camera; none = default.")
    height: int | None = Field(None, ge=16, le=16384, description="Frame height asked of the camera; none = default.")
    fps: float | None = Field(None, gt=0, le=1000, description="Frame rate asked of the camera; none = default.")
    exposure: float | None = Field(
        None,
        description="Fixed exposure in the driver's units (V4L2: 100 µs steps); none = automatic exposure. "
        "Fixed exposure keeps images of good parts alike through the day.",
    )
    gain: float | None = Field(None, ge=0, description="Fixed gain in the driver's units; none = the driver's.")
    buffer_size: int | None = Field(
        None, ge=1, le=32, description="Driver frame buffers; 1 to 2 keeps latency low; none = the driver's."
    )


class SourceConfig(_Section):
    uri: str = Field(
        min_length=1,
        description='Camera index ("0"), device path (/dev/video0), video file, folder of images, '
        "or an rtsp:// / http:// stream URL.",
    )
    loop: bool = Field(False, description="Start a video file or image folder again at its end (demos).")
    name: str | None = Field(
        None, pattern=_TOPIC_LEVEL, description="Short source name used in part ids; default: derived from uri."
    )
    max_fps: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="Continuous mode: score at most this many frames per second (a camera's other frames are "
        "skipped; a video file or folder is read at this pace, every frame scored); none = as fast as frames come.",
    )
    delivery: Literal["auto", "every_frame", "latest"] = Field(
        "auto",
        description="every_frame: a short queue, every frame scored in order (the capture waits for scoring); "
        "latest: only the newest frame is kept, older ones are skipped and counted. auto = every_frame for a "
        "video file or folder in continuous mode, latest for cameras, streams and trigger mode.",
    )
    stale_after_s: float = Field(
        2.0,
        gt=0,
        le=3600,
        description="A live frame older than this is stale (UNDEFINED, never OK); a live source silent this long "
        "gives an UNDEFINED verdict per period in continuous mode and is reported stalled.",
    )
    read_timeout_s: float = Field(
        5.0,
        gt=0,
        le=300,
        description="How long opening or reading a camera or stream may block before it "
        "counts as failed (and is reopened).",
    )
    reconnect_max_delay_s: float = Field(
        10.0,
        ge=0.5,
        le=600,
        description="A lost camera or stream is reopened after 0.5 s, 1 s, 2 s, ... up to this.",
    )
    camera: CameraConfig = Field(
        default_factory=CameraConfig,
        description="USB camera (V4L2) settings; what the camera accepted is logged.",
    )


class RoiConfig(_Section):
    x: int = Field(ge=0, description="Left edge of the region of interest in frame pixels.")
    y: int = Field(ge=0, description="Top edge of the region of interest in frame pixels.")
    width: int = Field(ge=8, description="Width of the region of interest in frame pixels.")
    height: int = Field(ge=8, description="Height of the region of interest in frame pixels.")


class InspectionConfig(_Section):
    roi: RoiConfig | None = Field(None, description="The part of the frame to inspect; none = the whole frame.")
    tiling: Literal["resize", "tiles"] = Field(
        "resize",
        description="resize: the ROI is resized to the model input (one image per frame); tiles: the ROI is cut "
        "into model-sized tiles (ROI pixels = model pixels, so small defects keep their size), scored as one "
        "batch in one run; the frame's score is the worst tile's.",
    )
    tile_overlap: int = Field(
        16, ge=0, le=4096, description="Pixels shared by neighbouring tiles, so a defect on a seam is whole in one."
    )


class TriggerConfig(_Section):
    mode: Literal["continuous", "mqtt"] = Field(
        "continuous",
        description="continuous: score frames as they come (source.max_fps caps the rate); mqtt: score the first "
        "frame captured after each trigger command and publish that part's verdict with its part_id.",
    )
    queue_size: int = Field(
        16, ge=1, le=10_000, description="Triggers waiting to be served at most; more are rejected (the reply says so)."
    )
    frame_timeout_s: float = Field(
        2.0,
        gt=0,
        le=600,
        description="How long a trigger waits for a frame captured after it before its verdict is UNDEFINED.",
    )


class ImagesConfig(_Section):
    save: Literal["none", "ng", "ng_and_undefined"] = Field(
        "ng",
        description="Which results have their frame (with the heatmap overlay) saved as JPEG under <data.dir>/images.",
    )
    ok_sample_every: int = Field(
        0, ge=0, description="Also save every Nth OK frame (a record of what passed); 0 = none."
    )
    jpeg_quality: int = Field(90, ge=10, le=100, description="JPEG quality of saved images.")
    max_count: int = Field(10_000, ge=1, description="Most images kept; the oldest are deleted first.")
    max_bytes: int = Field(2 * 1024**3, ge=1024 * 1024, description="Most bytes of images kept (default 2 GiB).")
    max_age_days: float = Field(30.0, gt=0, description="Images older than this are deleted.")
    min_free_bytes: int = Field(
        1024**3,
        ge=0,
        description="Free space left on the disk: below it images are not saved and the oldest saved ones are "
        "deleted until it is back (the verdict outbox comes first; verdicts still flow, the counts grow).",
    )
    queue_size: int = Field(
        16,
        ge=1,
        le=1000,
        description="Images waiting for the writer thread at most; when it "
        "is behind, new images are dropped and counted, never blocking the scoring.",
    )


class HealthConfig(_Section):
    interval_s: float = Field(
        60.0, gt=0, le=86_400, description="Seconds between health reports (log line, and the MQTT metrics topic)."
    )
    publish: bool = Field(True, description="Publish health reports on <prefix>/<site>/<line>/<station>/metrics.")


class OutboxConfig(_Section):
    max_messages: int = Field(
        500_000, ge=1, le=100_000_000, description="Most verdicts the outbox holds (about 28 h at 5 parts/s)."
    )
    max_bytes: int = Field(
        512 * 1024 * 1024, ge=1024, description="Most payload bytes the outbox holds (the file is somewhat larger)."
    )
    when_full: Literal["drop_oldest", "drop_new"] = Field(
        "drop_oldest",
        description="drop_oldest: discard the oldest waiting verdicts to make room (keeps the newest; the gap "
        "shows in seq); drop_new: keep the oldest and discard new verdicts. Either way an ERROR line and a counter.",
    )


class TlsConfig(_Section):
    enabled: bool = Field(
        False,
        description="Connect to the broker over TLS (usually port 8883); the broker's certificate is always "
        "verified, and mqtt.host must be a name or address in its subjectAltName.",
    )
    ca_file: Path | None = Field(
        None,
        description="PEM file of the CA(s) that signed the broker's certificate; relative to the config "
        "file's folder. None = the operating system's trusted CAs.",
    )
    cert_file: Path | None = Field(
        None, description="PEM client certificate, for brokers that require one (require_certificate); with key_file."
    )
    key_file: Path | None = Field(
        None,
        description="PEM private key of cert_file, not encrypted (the daemon cannot type a pass phrase): "
        "make it readable only by the daemon's user.",
    )

    @model_validator(mode="after")
    def _files_fit(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set both cert_file and key_file (the client certificate and its private key), or neither")
        if not self.enabled and (self.ca_file or self.cert_file):
            raise ValueError(
                "certificate files are set but enabled is false: set enabled: true to use TLS, or remove the files"
            )
        return self

    def files(self) -> dict[str, Path]:
        """The certificate files that are set, by key name (ca_file, cert_file, key_file)."""
        named = {"ca_file": self.ca_file, "cert_file": self.cert_file, "key_file": self.key_file}
        return {key: path for key, path in named.items() if path is not None}


CommandName = Literal["trigger", "reload", "threshold"]


class CommandsConfig(_Section):
    enabled: bool = Field(
        True,
        description="Subscribe to <prefix>/<site>/<line>/<station>/cmd/+ and answer on cmd/result; "
        "false = no subscription (commands are not received at all).",
    )
    allow: tuple[CommandName, ...] = Field(
        ("trigger", "reload", "threshold"),
        description="The commands this station carries out; the others are answered 'not_allowed' "
        "(e.g. [trigger] keeps the threshold and the model out of the MES's reach).",
    )
    max_payload_bytes: int = Field(
        4096, ge=64, le=65536, description="Larger command payloads are rejected unread ('too_large')."
    )
    max_per_s: float = Field(
        50.0,
        gt=0,
        le=1000,
        description="Valid commands carried out per second at most (token bucket, with burst); "
        "the excess is answered 'rate_limited'. Above a camera's frame rate, so that a trigger per frame passes.",
    )
    burst: int = Field(40, ge=1, le=10_000, description="Valid commands accepted at once before max_per_s applies.")
    max_pending_results: int = Field(
        1000,
        ge=10,
        le=100_000,
        description="cmd/result answers handed to MQTT but not yet acknowledged by the broker at most; beyond it "
        "answers are dropped (counted and logged), so a command flood cannot fill memory.",
    )
    threshold_min_ratio: float = Field(
        0.5,
        gt=0,
        le=1,
        description="cmd/threshold may set the threshold down to this fraction of the bundle's threshold.",
    )
    threshold_max_ratio: float = Field(
        2.0,
        ge=1,
        le=100,
        description="cmd/threshold may set the threshold up to this multiple of the bundle's threshold (a higher "
        "threshold passes more parts: keep it tight).",
    )


class MqttConfig(_Section):
    enabled: bool = Field(True, description="Publish verdicts over MQTT; false = inspect and log only.")
    protocol: Literal["v3.1.1", "v5"] = Field(
        "v3.1.1",
        description="MQTT protocol version: v3.1.1 (every broker) or v5 (reason codes on every "
        "acknowledgement, a packet size limit for commands).",
    )
    host: str = Field("127.0.0.1", min_length=1, description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker TCP port.")
    prefix: str = Field(
        "ganspect",
        pattern=r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$",
        description="First topic level(s); topics are <prefix>/<site>/<line>/<station>/...",
    )
    client_id: str | None = Field(None, description="MQTT client id; default ganspect-<site>-<line>-<station>.")
    keepalive: int = Field(30, ge=5, le=3600, description="Keep-alive interval in seconds.")
    qos: Literal[1, 2] = Field(1, description="QoS of verdicts: 1 (at least once) or 2 (exactly once).")
    username: str | None = Field(None, description="Broker user name, if the broker requires one.")
    password_env: str | None = Field(None, description="Name of the environment variable holding the password.")
    password_file: Path | None = Field(None, description="File whose first line is the password.")
    connect_timeout_s: float = Field(
        5.0, gt=0, le=300, description="How long start-up waits for the broker before inspecting without it."
    )
    require_broker: bool = Field(
        False,
        description="true: exit with an error when the broker does not answer within connect_timeout_s at start-up "
        "(commissioning); false: inspect anyway, verdicts wait in the outbox on disk until the broker answers.",
    )
    reconnect_max_delay_s: float = Field(
        30.0, ge=1, le=600, description="Reconnect back-off: 1 s after a loss, doubling up to this many seconds."
    )
    max_inflight: int = Field(
        20, ge=1, le=1000, description="Verdicts sent but not yet acknowledged at most (the rest wait on disk)."
    )
    drain_timeout_s: float = Field(
        10.0,
        ge=0,
        le=600,
        description="At exit, how long to wait for the broker to acknowledge what is in the outbox; "
        "what is left stays on disk for the next start.",
    )
    tls: TlsConfig = Field(
        default_factory=TlsConfig,
        description="TLS to the broker: the CA to verify it with and the client certificate.",
    )
    outbox: OutboxConfig = Field(
        default_factory=OutboxConfig,
        description="The disk outbox that holds verdicts until the broker acknowledged them.",
    )
    commands: CommandsConfig = Field(
        default_factory=CommandsConfig,
        description="Commands from the MES (cmd/trigger, cmd/reload, cmd/threshold): "
        "untrusted input, validated and bounded.",
    )

    @model_validator(mode="after")
    def _one_password_source(self) -> MqttConfig:
        if self.password_env and self.password_file:
            raise ValueError("set password_env or password_file, not both")
        if (self.password_env or self.password_file) and not self.username:
            raise ValueError("a password needs a username")
        return self


class DataConfig(_Section):
    dir: Path = Field(
        Path("edge-data"),
        description="Folder for the daemon's state (the verdict outbox and seq counter); relative to the config "
        "file's folder. On a line PC use a local disk, e.g. /var/lib/ganspect.",
    )


class DisplayConfig(_Section):
    window: Literal["auto", "on", "off"] = Field(
        "auto", description="Operator window: auto = only when a display answers; --headless forces off."
    )
    heatmap: bool = Field(True, description="Show the heatmap blend when the window opens (key h toggles).")

    @field_validator("window", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted `on`/`off` as a boolean.
        if isinstance(value, bool):
            return "on" if value else "off"
        return value


class RunConfig(_Section):
    max_frames: int | None = Field(None, ge=1, description="Stop after this many frames; none = until the end.")

    @field_validator("max_frames", mode="before")
    @classmethod
    def _null_words(cls, value: Any) -> Any:
        return None if value in ("none", "null", "") else value


class EdgeConfig(_Section):
    station: StationConfig = Field(description="Where this daemon inspects; names the MQTT topics.")
    model: ModelConfig = Field(description="The model bundle to score with.")
    source: SourceConfig = Field(description="Where frames come from.")
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="Verdict delivery.")
    data: DataConfig = Field(
        default_factory=DataConfig,
        description="Where the daemon keeps state.",
    )
    display: DisplayConfig = Field(default_factory=DisplayConfig, description="Operator window.")
    run: RunConfig = Field(default_factory=RunConfig, description="Run limits.")
    inspection: InspectionConfig = Field(
        default_factory=InspectionConfig,
        description="Region of interest and tiling.",
    )
    trigger: TriggerConfig = Field(
        default_factory=TriggerConfig,
        description="What makes the daemon inspect: every frame, or MQTT triggers.",
    )
    images: ImagesConfig = Field(
        default_factory=ImagesConfig,
        description="Saved NG images and their retention.",
    )
    health: HealthConfig = Field(
        default_factory=HealthConfig,
        description="Periodic health reports.",
    )


def is_path_like_source(uri: str) -> bool:
    """True for a file, folder or device path; false for a camera index or a URL."""
    return not (uri.isdigit() or _URL.match(uri))


def _line_of(root: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """1-based YAML line of the deepest node on `loc` that exists (the parent for a missing key)."""
    node = root
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(key)]
            if not match:
                return line
            key_node, node = match[0]
            line = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _describe(exc: ValidationError, path: Path, root: yaml.Node | None) -> str:
    # An unknown key first: a misspelt key also makes the key it was meant to be "missing".
    err = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
    loc = tuple(p for p in err["loc"])
    key = key_path(loc) or "(top level)"
    line = _line_of(root, loc)
    where = f"{path}:{line}" if line else str(path)
    if err["type"] == "extra_forbidden":
        what = "unknown key (check the spelling; see configs/edge.yaml for the keys)"
    elif err["type"] == "missing":
        what = "required key is missing"
    else:
        what = err["msg"]
        if "input" in err and not isinstance(err["input"], dict | list):
            what += f" (got {err['input']!r})"
    more = len(exc.errors()) - 1
    return f"{where}: {key}: {what}" + (f" (and {more} more problem(s))" if more else "")


def _resolve(base: Path, value: Path) -> Path:
    return value if value.is_absolute() else (base / value)


def read_yaml_file(path: Path, what: str) -> tuple[Any, yaml.Node | None]:
    """The parsed YAML of `path` and its node tree (for line numbers); ConfigError if unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        line = exc.object.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
            "save the file as UTF-8"
        ) from exc
    try:
        return yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at_line: int | None = mark.line + 1 if mark is not None else None
        if isinstance(exc, yaml.reader.ReaderError):  # a character YAML forbids: it knows only the offset
            at_line = text.count("\n", 0, exc.position) + 1
        where = f"{path}:{at_line}" if at_line is not None else str(path)
        # PyYAML's own text spans lines ("... in '<unicode string>', position 0"): keep its first.
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from exc


def load_config(path: str | Path) -> EdgeConfig:
    """Read, validate and resolve a config file; raise ConfigError naming the key and line."""
    path = Path(path)
    raw, root = read_yaml_file(path, "config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with station, model and source sections")
    try:
        config = EdgeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, root)) from exc
    config = resolve_paths(config, path.parent)
    _check_tls_files(config.mqtt, path, root)
    _check_trigger_path(config, path, root)
    _check_trusted_keys(config.model, path, root)
    return config


def _check_trusted_keys(model: ModelConfig, path: Path, root: yaml.Node | None) -> None:
    """Every trusted key is an Ed25519 public key now, not at the first bundle check (`--check` finds it too)."""
    from ganspect.edge.signature import load_public_key

    for i, key in enumerate(model.trusted_keys):
        line = _line_of(root, ("model", "trusted_keys", i))
        where = f"{path}:{line}: " if line else f"{path}: "
        try:
            load_public_key(key, f"model.trusted_keys[{i}]")
        except ConfigError as exc:
            raise ConfigError(where + str(exc)) from exc


def _check_trigger_path(config: EdgeConfig, path: Path, root: yaml.Node | None) -> None:
    """Trigger mode without MQTT would wait for triggers that can never arrive: say so at start-up."""
    if config.trigger.mode != "mqtt":
        return
    line = _line_of(root, ("trigger", "mode"))
    where = f"{path}:{line}" if line else str(path)
    if not config.mqtt.enabled:
        raise ConfigError(
            f"{where}: trigger.mode: mqtt needs mqtt.enabled: true (triggers arrive as MQTT commands "
            "on cmd/trigger); use trigger.mode: continuous to inspect without a broker"
        )
    commands = config.mqtt.commands
    if not commands.enabled or "trigger" not in commands.allow:
        raise ConfigError(
            f"{where}: trigger.mode: mqtt needs mqtt.commands.enabled: true with trigger in "
            "mqtt.commands.allow, or no trigger can arrive"
        )


def _check_tls_files(mqtt: MqttConfig, path: Path, root: yaml.Node | None) -> None:
    """Every certificate file is readable now, not at the first connection (`--check` finds it too)."""
    if not (mqtt.enabled and mqtt.tls.enabled):
        return
    for key, file in mqtt.tls.files().items():
        try:
            with open(file, "rb"):
                pass
        except OSError as exc:
            line = _line_of(root, ("mqtt", "tls", key))
            where = f"{path}:{line}" if line else str(path)
            raise ConfigError(f"{where}: mqtt.tls.{key}: cannot read {file}: {exc.strerror or exc}") from exc


def resolve_paths(config: EdgeConfig, base: Path) -> EdgeConfig:
    """Relative bundle, source, password-file, certificate and data paths resolved against `base` (the config's folder)."""
    model = config.model.model_copy(
        update={
            "bundle": _resolve(base, config.model.bundle),
            "trusted_keys": tuple(_resolve(base, key) for key in config.model.trusted_keys),
        }
    )
    source = config.source
    if is_path_like_source(source.uri) and not Path(source.uri).is_absolute():
        source = source.model_copy(update={"uri": str(base / source.uri)})
    mqtt = config.mqtt
    if mqtt.password_file is not None:
        mqtt = mqtt.model_copy(update={"password_file": _resolve(base, mqtt.password_file)})
    tls_files = {key: _resolve(base, file) for key, file in mqtt.tls.files().items()}
    mqtt = mqtt.model_copy(update={"tls": mqtt.tls.model_copy(update=tls_files)})
    data = config.data.model_copy(update={"dir": _resolve(base, config.data.dir)})
    return config.model_copy(update={"model": model, "source": source, "mqtt": mqtt, "data": data})


def read_password(mqtt: MqttConfig) -> SecretStr | None:
    """The broker password from the environment or a file; never logged (SecretStr hides it)."""
    if mqtt.password_env:
        value = os.environ.get(mqtt.password_env)
        if value is None:
            raise ConfigError(f"mqtt.password_env: environment variable {mqtt.password_env} is not set")
        return SecretStr(value)
    if mqtt.password_file:
        try:
            lines = mqtt.password_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"mqtt.password_file: cannot read {mqtt.password_file}: {exc.strerror or exc}") from exc
        return SecretStr(lines[0] if lines else "")
    return None
