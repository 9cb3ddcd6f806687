"""systemd's notify protocol as the daemon speaks it, received on a real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ganspect.edge.notify import SystemdNotifier, Watchdog, watchdog_interval_s


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket bound where $NOTIFY_SOCKET would point, as systemd binds its own."""
    path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(2.0)
    yield str(path), server
    server.close()


def _drain(server: socket.socket, wait: float = 0.2) -> list[str]:
    server.settimeout(wait)
    got = []
    try:
        while True:
            got.append(server.recv(4096).decode())
    except TimeoutError:
        return got


def test_ready_status_and_stopping_arrive_as_datagrams(notify_socket: tuple[str, socket.socket]) -> None:
    address, server = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    assert notifier.ready("inspecting with tiny-test")
    assert server.recv(4096).decode() == "READY=1\nSTATUS=inspecting with tiny-test"
    assert notifier.stopping()
    assert server.recv(4096).decode() == "STOPPING=1\nSTATUS=stopping"
    notifier.close()


def test_abstract_socket_address(tmp_path: Path) -> None:
    name = f"ganspect-test-{os.getpid()}-{time.monotonic_ns()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(2.0)
    try:
        assert SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).send("WATCHDOG=1")
        assert server.recv(4096) == b"WATCHDOG=1"
    finally:
        server.close()


def test_without_systemd_nothing_is_sent_and_nothing_fails() -> None:
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert not notifier.ready("x")
    assert not Watchdog(notifier, 1.0).armed


def test_a_vanished_socket_does_not_raise(tmp_path: Path) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.send("WATCHDOG=1") is False
    assert notifier.send("WATCHDOG=1") is False  # warned once, still no exception


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_sec(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval_s(env) == expected


def test_watchdog_pings_at_most_once_per_interval_and_stops_with_the_beats(
    notify_socket: tuple[str, socket.socket],
) -> None:
    address, server = notify_socket
    watchdog = Watchdog(SystemdNotifier({"NOTIFY_SOCKET": address}), interval_s=0.1)
    assert watchdog.armed
    started = time.monotonic()
    beats = 0
    while time.monotonic() - started < 0.55:  # a loop scoring up to ~1000 frames/s
        watchdog.beat()
        beats += 1
        time.sleep(0.001)
    elapsed = time.monotonic() - started
    pings = _drain(server)
    assert set(pings) == {"WATCHDOG=1"}
    # One ping per started interval, however many beats (the first beat pings at once).
    assert 2 <= len(pings) <= elapsed / 0.1 + 1, (len(pings), beats, elapsed)
    time.sleep(0.3)  # the loop stalls: no beats
    assert _drain(server) == []


def test_the_daemon_is_ready_pings_while_scoring_and_stops_pinging_when_its_loop_hangs(  # noqa: C901, PLR0915 — the daemon's whole life as systemd sees it, in order
    notify_socket: tuple[str, socket.socket],
    tiny_bundle: Path,
    make_video: Any,
    make_edge_config: Any,
    tmp_path: Path,
    edge_daemon: Any,  # tests/conftest.py's EdgeDaemons
) -> None:
    """READY=1 after start-up, WATCHDOG=1 while frames are scored, none while the loop is stuck, STOPPING=1.

    The stall is real: the verdict log is a FIFO that the test stops reading, so once the
    pipe's buffer is full the scoring loop blocks in its write, as it would on a hung disk.
    """
    import threading

    address, server = notify_socket
    fifo = tmp_path / "verdicts.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so the daemon's open() for writing does not block
    draining = threading.Event()
    draining.set()

    def drain() -> None:
        while True:
            if draining.is_set():
                try:
                    if os.read(reader, 65536) == b"":
                        time.sleep(0.01)
                except BlockingIOError:
                    time.sleep(0.01)
                except OSError:
                    return
            else:
                time.sleep(0.01)

    threading.Thread(target=drain, daemon=True).start()
    video = make_video(tmp_path / "parts.avi", [False, True, False, False])
    config = make_edge_config(tiny_bundle, video, source={"loop": True, "max_fps": 100})
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}  # a ping every 0.2 s
    proc = edge_daemon.start(config, verdict_log=fifo, env=env)

    def messages_for(seconds: float) -> list[tuple[float, str]]:
        got = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            server.settimeout(max(0.01, end - time.monotonic()))
            try:
                got.append((time.monotonic(), server.recv(4096).decode()))
            except TimeoutError:
                break
        return got

    try:
        ready = None
        deadline = time.monotonic() + 30
        while ready is None and time.monotonic() < deadline:
            for _, message in messages_for(1):
                if message.startswith("READY=1"):
                    ready = message
        assert ready is not None and "STATUS=inspecting parts with tiny-test" in ready

        scoring = [m for _, m in messages_for(1.5)]
        assert scoring.count("WATCHDOG=1") >= 4, scoring

        draining.clear()  # the verdict log stops being read: the loop will block in its write
        quiet_since = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pings = [t for t, m in messages_for(0.5) if m == "WATCHDOG=1"]
            quiet_since = (quiet_since or time.monotonic()) if not pings else None
            if quiet_since is not None and time.monotonic() - quiet_since >= 2.0:
                break
        assert quiet_since is not None and time.monotonic() - quiet_since >= 2.0, "pings went on while stalled"
        assert proc.poll() is None  # hung, not dead: exactly what the watchdog is for

        draining.set()  # the disk answers again
        resumed = [m for _, m in messages_for(2.0)]
        assert resumed.count("WATCHDOG=1") >= 3, resumed

        proc.send_signal(signal.SIGTERM)
        stopping = [m for _, m in messages_for(10) if m.startswith("STOPPING=1")]
        assert stopping, "no STOPPING=1 after SIGTERM"
        edge_daemon.finish(proc, sig=None)
        assert proc.returncode == 0
    finally:
        edge_daemon.kill_leftovers()  # before the FIFO's reader goes, or a live daemon's write fails
        os.close(reader)
