"""systemd's notify protocol as the daemon speaks it, received on a real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

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


@pytest.mark.parametrize(("env", "expected"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_is_half_of_watchdog_sec(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval_s(env) == expected


def test_watchdog_pings_at_most_once_per_interval_and_stops_with_the_beats(
        notify_socket: tuple[str, socket.socket]) -> None:
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
