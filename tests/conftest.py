"""Shared fixtures: a real Mosquitto broker, a tiny real ONNX bundle, a lossless test video.

Nothing here is a mock: the broker is the `mosquitto` binary on a free port (never the
shared one on 1883), the bundle is an ONNX graph built with `onnx.helper` (no torch)
and verified by `ganspect.edge.manifest`, and the video is written by OpenCV with the
lossless FFV1 codec so the test knows each frame's pixels exactly.

The tiny model: heatmap = mean over channels of |x/255 - 0.5| / HEATMAP_SCALE,
score = mean over the image of |x/255 - 0.5|, and peak = (row, column) of the heatmap's
first maximum. A mid-grey part scores about 0.02; a part with a large white or black
patch scores about 0.3, above the threshold 0.15 (NG). The bundle's golden images (one
good, one defective part) carry expected outputs computed here with numpy, independently
of onnxruntime.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import yaml

TINY_THRESHOLD = 0.15
HEATMAP_SCALE = 0.1
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


# The system tools some tests drive, and the Debian package each comes in: `bash .ci/run` installs
# them. A test marked `needs_tools(...)` fails with the install line when one is missing, rather
# than being skipped (the operator window would go untested) or dying in a traceback.
TOOL_PACKAGES = {
    "Xvfb": "xvfb",
    "import": "imagemagick",
    "xdotool": "xdotool",
    "shellcheck": "shellcheck",
    "systemd-analyze": "systemd",
    "openssl": "openssl",
    "mosquitto_passwd": "mosquitto",
}


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers("needs_tools"):
        missing = [tool for tool in marker.args if shutil.which(tool) is None]
        if missing:
            packages = " ".join(sorted({TOOL_PACKAGES[tool] for tool in missing}))
            pytest.fail(
                f"{', '.join(missing)} not found: install with `apt-get install -y {packages}` (bash .ci/run does)",
                pytrace=False,
            )


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"mosquitto did not listen on {host}:{port} within {timeout} s")


@pytest.fixture
def unused_port() -> int:
    """A free TCP port on 127.0.0.1 with nothing listening (for "broker not answering")."""
    return free_port()


@dataclass
class Broker:
    host: str
    port: int
    process: subprocess.Popen[bytes]

    def __iter__(self) -> Iterator[Any]:  # so `host, port = broker` works
        return iter((self.host, self.port))

    def stop(self) -> None:
        """SIGTERM (a persistent broker saves its sessions), wait; the port is free afterwards."""
        _stop_mosquitto(self.process)


def _start_mosquitto(
    folder: Path, port: int, persistent: bool = False, listener_lines: Sequence[str] = (), allow_anonymous: bool = True
) -> Broker:
    conf = folder / f"mosquitto-{port}.conf"
    # Listener options (cafile, certfile, require_certificate ...) follow their `listener` line.
    lines = [f"listener {port} 127.0.0.1", *listener_lines, f"allow_anonymous {str(allow_anonymous).lower()}"]
    if persistent:
        # Sessions, subscriptions and queued QoS 1 messages survive a restart on the same port.
        store = folder / f"mosquitto-{port}-db"
        store.mkdir(exist_ok=True)
        lines += ["persistence true", f"persistence_location {store}/", "autosave_interval 1"]
        # mosquitto keeps at most 1,000 messages for an offline subscriber by default: when the daemon
        # reconnects after a restart before the test's subscriber does, its backlog (over 1,000 in the
        # soak test) would be cut by the broker, not lost by the daemon. No limit: the test measures the daemon.
        lines.append("max_queued_messages 0")
    else:
        lines.append("persistence false")
    if os.geteuid() == 0 and (persistent or listener_lines or not allow_anonymous):
        # Started as root, mosquitto drops to the user `mosquitto`, who can neither write in tmp_path
        # nor read the certificates and password file the test put there.
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(folder / f"mosquitto-{port}.log", "ab") as log:
        proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_port("127.0.0.1", port, proc)
    except RuntimeError:
        _stop_mosquitto(proc)
        raise
    return Broker("127.0.0.1", port, proc)


def _stop_mosquitto(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def start_broker(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Factory: start_broker(port=None, persistent=False, *, listener_lines=(), allow_anonymous=True).

    Starts a mosquitto; all stop at teardown. `listener_lines` are mosquitto 2 config lines
    for the listener (e.g. `cafile ...`, `require_certificate true`); with `allow_anonymous=False`
    add a `password_file ...` line.

    The port is a free one by default. `persistent=True` keeps the broker's state in a
    folder of tmp_path named by the port, so `broker.stop()` then `start_broker(port,
    persistent=True)` is a broker restart that keeps persistent sessions.
    """
    if not Path(MOSQUITTO).exists():
        # The broker tests are the point of the suite: a missing broker is a failure, not a skip.
        pytest.fail(f"{MOSQUITTO} not found: install it with `apt-get install -y mosquitto` (.ci/run does)")
    started: list[Broker] = []

    def start(
        port: int | None = None,
        persistent: bool = False,
        *,
        listener_lines: Sequence[str] = (),
        allow_anonymous: bool = True,
    ) -> Broker:
        broker = _start_mosquitto(tmp_path, port or free_port(), persistent, listener_lines, allow_anonymous)
        started.append(broker)
        return broker

    yield start
    for broker in reversed(started):
        _stop_mosquitto(broker.process)


@pytest.fixture
def mosquitto_broker(start_broker: Callable[..., Broker]) -> Broker:
    """A fresh mosquitto on a free port of 127.0.0.1 (never the shared 1883): Broker(host, port, process)."""
    return start_broker()


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    dup: bool = False


@dataclass
class Subscriber:
    """A real paho client that records every message on its topic filter."""

    client: Any
    messages: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on(self, topic_suffix: str) -> list[Received]:
        with self.lock:
            return [m for m in self.messages if m.topic.endswith(topic_suffix)]

    def wait_for(self, topic_suffix: str, count: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.on(topic_suffix)) < count:
            time.sleep(0.02)
        return self.on(topic_suffix)


@pytest.fixture
def mqtt_subscriber() -> Iterator[Callable[..., Subscriber]]:
    """Factory: subscribe(host, port, topic_filter, persistent=False, setup=None) -> Subscriber, once subscribed.

    At the end of the test every message received from the daemon (verdict, status,
    metrics, cmd/result) is validated against its JSON Schema in edge/schemas/.

    `setup(client)` runs before connecting (TLS, credentials).

    `persistent=True`: a QoS 1 persistent session (clean_session false, fixed client id)
    that reconnects every second, so with a persistent broker it receives what was
    published while it or the broker was away.
    """
    import paho.mqtt.client as mqtt

    clients: list[Any] = []
    subscribers: list[Subscriber] = []

    def subscribe(
        host: str, port: int, topic: str, persistent: bool = False, setup: Callable[[Any], None] | None = None
    ) -> Subscriber:
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"test-sub-{len(clients)}-{os.getpid()}",
            clean_session=not persistent,
        )
        client.reconnect_delay_set(min_delay=1, max_delay=1)
        sub = Subscriber(client)
        subscribed = threading.Event()

        def on_message(c: Any, userdata: Any, msg: Any) -> None:
            with sub.lock:
                sub.messages.append(Received(msg.topic, msg.payload, bool(msg.retain), bool(msg.dup)))

        client.on_message = on_message
        client.on_subscribe = lambda *a: subscribed.set()
        client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        if setup is not None:
            setup(client)
        client.connect(host, port)
        client.loop_start()
        clients.append(client)
        subscribers.append(sub)
        if not subscribed.wait(10):
            raise RuntimeError(f"test subscriber could not subscribe to {topic} on {host}:{port}")
        return sub

    yield subscribe
    for client in clients:
        client.disconnect()
        client.loop_stop()
    # Every payload the daemon published in a test validates against its JSON Schema.
    for sub in subscribers:
        for message in sub.messages:
            if schema_name_of(message.topic) is not None:
                validate_published_payload(message.topic, message.payload)


def build_tiny_model(height: int, width: int, channels: int) -> bytes:
    """The tiny ONNX graph (opset 17) honouring the bundle contract; returns its bytes."""
    import onnx
    from onnx import TensorProto, helper

    def const(name: str, value: float) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [], [value]))

    nodes = [
        const("inv255", 1.0 / 255.0),
        const("half", 0.5),
        const("inv_scale", 1.0 / HEATMAP_SCALE),
        helper.make_node("Cast", ["image"], ["x_f"], to=TensorProto.FLOAT),  # (N, H, W, C)
        helper.make_node("Mul", ["x_f", "inv255"], ["x01"]),
        helper.make_node("Sub", ["x01", "half"], ["centred"]),
        helper.make_node("Abs", ["centred"], ["dev"]),  # (N, H, W, C)
        helper.make_node("ReduceMean", ["dev"], ["dev_hw"], axes=[3], keepdims=0),  # (N, H, W)
        helper.make_node("Mul", ["dev_hw", "inv_scale"], ["heatmap"]),  # (N, H, W)
        helper.make_node("ReduceMean", ["dev_hw"], ["score"], axes=[1, 2], keepdims=0),  # (N,)
        # peak: argmax over the flattened heatmap -> (row, column), as numpy's argmax + unravel_index.
        helper.make_node(
            "Constant", [], ["flat_shape"], value=helper.make_tensor("fs", TensorProto.INT64, [2], [0, -1])
        ),
        helper.make_node("Constant", [], ["width"], value=helper.make_tensor("w", TensorProto.INT64, [], [width])),
        helper.make_node("Reshape", ["heatmap", "flat_shape"], ["flat"]),  # (N, H*W)
        helper.make_node("ArgMax", ["flat"], ["index"], axis=1, keepdims=1),  # (N, 1) int64
        helper.make_node("Div", ["index", "width"], ["row"]),  # integer division
        helper.make_node("Mod", ["index", "width"], ["col"]),
        helper.make_node("Concat", ["row", "col"], ["peak"], axis=1),  # (N, 2)
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", height, width, channels])],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, ["N", height, width]),
            helper.make_tensor_value_info("peak", TensorProto.INT64, ["N", 2]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="ganspect-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_tiny_bundle(
    root: Path,
    *,
    height: int = 32,
    width: int = 32,
    colour_order: Literal["GRAY", "BGR"] = "GRAY",
    threshold: float = TINY_THRESHOLD,
    graph_shape: tuple[int, int, int] | None = None,
    tiling: dict[str, Any] | None = None,
) -> Path:
    """Write model.onnx, golden images + manifest.json into `root`; `graph_shape` (H, W, C) builds a graph that
    disagrees; `tiling` is the manifest's tiling record (None: none, as bundles before it)."""
    from ganspect.edge.golden import write_golden_image
    from ganspect.edge.manifest import (
        GoldenExpectation,
        HeatmapSpec,
        InputSpec,
        Manifest,
        Normalisation,
        ScoreSpec,
        ThresholdSpec,
        TilingSpec,
        TrainingData,
        describe_file,
        describe_golden,
        utc_now,
        write_manifest,
    )
    from ganspect.edge.preprocess import preprocess

    root.mkdir(parents=True, exist_ok=True)
    channels = 1 if colour_order == "GRAY" else 3
    (root / "model.onnx").write_bytes(build_tiny_model(*(graph_shape or (height, width, channels))))
    spec = InputSpec(height=height, width=width, channels=channels, colour_order=colour_order)
    golden, scores, peaks = [], [], []
    for index, ng in enumerate([False, True]):
        image = preprocess(part_image(ng, index), spec)[0]  # (H, W, C) as the edge feeds it
        name = f"golden/{index}_{'ng' if ng else 'ok'}.png"
        write_golden_image(root / name, image)
        golden.append(describe_golden(root, name, "tests/conftest.py part_image", expect="NG" if ng else "OK"))
        deviation = np.abs(image.astype(np.float64) / 255.0 - 0.5).mean(axis=2)  # (H, W)
        scores.append(float(deviation.mean()))
        peaks.append(float(deviation.max() / HEATMAP_SCALE))
    expectation = GoldenExpectation(scores=scores, heatmap_peaks=peaks, atol=1e-5, rtol=1e-4)
    manifest = Manifest(
        format_version=2,
        name="tiny-test",
        kind="efficient_gan",
        created_at=utc_now(),
        ganspect_version="0.1.0",
        input=spec,
        normalisation=Normalisation(scale=1 / 255, offset=-0.5),
        score=ScoreSpec(
            formula="mean |x/255 - 0.5| (test model)",
            lambda_=0.1,
            discrimination="feature_matching",
            residual_reduction="mean",
        ),
        threshold=ThresholdSpec(method="manual", n_images=0),
        heatmap=HeatmapSpec(scale=HEATMAP_SCALE, smoothing_sigma=0.0),
        tiling=None if tiling is None else TilingSpec.model_validate(tiling),
        training_data=TrainingData(source="tests/conftest.py", n_train=0, n_val=0),
        files=[describe_file(root, "model.onnx", "fp32", threshold, expectation)],
        golden=golden,
    )
    write_manifest(root, manifest)
    return root


@pytest.fixture
def make_bundle() -> Callable[..., Path]:
    """Factory: make_bundle(root, height=32, width=32, colour_order="GRAY", threshold=0.15, graph_shape=None)."""
    return write_tiny_bundle


@pytest.fixture
def tiny_bundle(tmp_path: Path) -> Path:
    """A verified-valid GRAY 32x32 bundle folder (fp32 only)."""
    return write_tiny_bundle(tmp_path / "bundle")


def part_image(ng: bool, index: int, size: tuple[int, int] = (64, 48)) -> np.ndarray:
    """A (h, w, 3) BGR frame: grey part with mild texture; NG parts carry a big white or black patch."""
    w, h = size
    rng = np.random.default_rng(index)
    image = (128 + rng.integers(-8, 9, size=(h, w, 3))).astype(np.uint8)
    if ng:
        value = 255 if index % 2 else 0
        image[h // 8 : h - h // 8, w // 8 : w - w // 8] = value  # 56% of the area
    return image


def write_video(path: Path, pattern: list[bool], size: tuple[int, int] = (64, 48), fps: float = 10.0) -> Path:
    """Lossless FFV1 .avi whose frame i is NG when pattern[i] is True."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), fps, size)
    if not writer.isOpened():
        raise RuntimeError("OpenCV cannot write FFV1 video here")
    for i, ng in enumerate(pattern):
        writer.write(part_image(ng, i, size))
    writer.release()
    return path


# Frames 2, 5 and 6 carry a defect.
VIDEO_PATTERN = [False, False, True, False, False, True, True, False]


@dataclass(frozen=True)
class PartsVideo:
    path: Path
    expected: list[str]  # "OK" / "NG" per frame


@pytest.fixture
def tiny_video(tmp_path: Path) -> PartsVideo:
    """An 8-frame 64x48 FFV1 video; `expected` gives the verdict the tiny model must reach per frame."""
    path = write_video(tmp_path / "parts.avi", VIDEO_PATTERN)
    return PartsVideo(path, ["NG" if ng else "OK" for ng in VIDEO_PATTERN])


@pytest.fixture
def make_video() -> Callable[..., Path]:
    """Factory: make_video(path, pattern: list[bool], size=(64, 48), fps=10.0) -> path (True = NG frame)."""
    return write_video


@pytest.fixture
def make_part_image() -> Callable[..., np.ndarray]:
    """Factory: make_part_image(ng, index, size=(64, 48)) -> (h, w, 3) BGR frame as in the test video."""
    return part_image


@pytest.fixture
def make_edge_config(tmp_path: Path) -> Callable[..., Path]:
    """Factory: make_edge_config(bundle, media, broker=None, **section_overrides) -> config path.

    `media` becomes source.uri.

    broker None disables MQTT. Overrides are merged per section, e.g. mqtt={"qos": 2}.
    """

    def make(
        bundle: Path,
        media: Path | str,
        broker: Broker | tuple[str, int] | None = None,
        name: str = "edge.yaml",
        **overrides: dict[str, Any],
    ) -> Path:
        host, port = broker if broker is not None else ("127.0.0.1", 1)
        config: dict[str, dict[str, Any]] = {
            "station": {"site": "testsite", "line": "l1", "station": "s1"},
            "model": {"bundle": str(bundle), "intra_op_threads": 1},
            "source": {"uri": str(media)},
            "mqtt": {
                "enabled": broker is not None,
                "host": host,
                "port": port,
                "prefix": "gstest",
                "connect_timeout_s": 5,
                "drain_timeout_s": 5,
            },
            "display": {"window": "off"},
        }
        for section, values in overrides.items():
            config.setdefault(section, {}).update(values)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return path

    return make


def run_ganspect(
    *args: str, timeout: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m ganspect.edge ARGS` as a real subprocess; stdout/stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "ganspect.edge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def ganspect_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Factory: ganspect_cli(*args, timeout=60) runs the `ganspect` CLI in a subprocess."""
    return run_ganspect


class EdgeDaemons:
    """Starts the edge daemon as a line PC runs it (`python -m ganspect.edge edge --headless`), stops it.

    Each daemon is a real subprocess with stdout and stderr captured as text. Whatever a
    test leaves running (a failed assertion between start and stop) is killed at teardown,
    so a failing test cannot leave a daemon publishing into the next test's broker.
    """

    def __init__(self) -> None:
        self._started: list[subprocess.Popen[str]] = []

    def start(
        self, config: Path, *extra: str, verdict_log: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        log_args = ["--verdict-log", str(verdict_log)] if verdict_log is not None else []
        proc = subprocess.Popen(
            [sys.executable, "-m", "ganspect.edge", "edge", "--config", str(config), "--headless", *log_args, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # Part ids are any Unicode; the daemon writes UTF-8 whatever the test machine's locale says.
            encoding="utf-8",
            env=None if env is None else {**os.environ, **env},
        )
        self._started.append(proc)
        return proc

    @staticmethod
    def finish(proc: subprocess.Popen[str], sig: int | None = signal.SIGTERM, timeout: float = 30) -> tuple[str, str]:
        """Send `sig` (None: wait for the daemon to end by itself), collect (stdout, stderr).

        A daemon still running after `timeout` is killed and the TimeoutExpired raised.
        """
        if sig is not None and proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()

    def kill_leftovers(self) -> None:
        for proc in reversed(self._started):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.fixture
def edge_daemon() -> Iterator[EdgeDaemons]:
    """edge_daemon.start(config, *extra, verdict_log=...) and edge_daemon.finish(proc, sig, timeout)."""
    daemons = EdgeDaemons()
    try:
        yield daemons
    finally:
        daemons.kill_leftovers()


_SCHEMA_VALIDATORS: dict[str, Any] = {}
# The last topic level(s) of what the daemon publishes; the tests' own commands (cmd/trigger ...) are input.
DAEMON_PAYLOADS = ("verdict", "status", "metrics", "cmd/result")


def schema_name_of(topic: str) -> str | None:
    """The schema file stem for a topic the daemon publishes (cmd/result -> cmd-result), else None."""
    for suffix in DAEMON_PAYLOADS:
        if topic.endswith("/" + suffix):
            return suffix.replace("/", "-")
    return None


def validate_published_payload(topic: str, payload: bytes) -> Any:
    """The decoded payload of a message the daemon published, checked against edge/schemas/<name>.schema.json.

    status is a bare word, validated as a string; the others are JSON. A daemon topic
    without a schema file fails: every payload the daemon publishes has one.
    """
    import json

    import jsonschema

    import ganspect.edge

    name = schema_name_of(topic)
    assert name is not None, f"{topic} is not a topic the daemon publishes"
    if name not in _SCHEMA_VALIDATORS:
        path = Path(ganspect.edge.__file__).parent / "schemas" / f"{name}.schema.json"
        assert path.exists(), f"no JSON Schema {path.name} for the payloads of {topic}"
        schema = json.loads(path.read_text(encoding="utf-8"))
        jsonschema.Draft202012Validator.check_schema(schema)
        _SCHEMA_VALIDATORS[name] = jsonschema.Draft202012Validator(schema)
    document = payload.decode("utf-8") if name == "status" else json.loads(payload)
    _SCHEMA_VALIDATORS[name].validate(document)
    return document


@pytest.fixture(scope="session")
def validate_published() -> Callable[[str, bytes], Any]:
    """validate_published(topic, payload) -> the decoded payload, checked against its JSON Schema.

    The `mqtt_subscriber` fixture also checks every daemon message it received this way
    when the test ends.
    """
    return validate_published_payload
