"""systemd's service notification protocol, spoken directly over `$NOTIFY_SOCKET`.

The unit is `Type=notify` with `WatchdogSec=`: systemd waits for `READY=1` before it
calls the service started, and restarts it when `WATCHDOG=1` stops arriving. The
datagram protocol is a few lines of socket code, so the edge install needs no
libsystemd binding.

The watchdog must mean "frames are being inspected", not "the process exists": the
scoring loop calls `Watchdog.beat()` once per iteration, and the ping is sent from that
same thread. A loop that hangs (a stuck `session.run`, a deadlock) stops the pings and
systemd restarts the daemon; a helper thread pinging on a timer would hide exactly that.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends state lines to systemd; does nothing when the daemon was not started by systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # An address starting with "@" is in Linux's abstract namespace (a leading NUL byte).
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        self._failed = False
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, *lines: str) -> bool:
        """Send `KEY=value` lines in one datagram; False when not under systemd or the send failed."""
        if self._socket is None:
            return False
        try:
            self._socket.sendto("\n".join(lines).encode("utf-8"), self._address)
        except OSError as exc:
            # Say it once: a notify socket that went away must not flood the journal or stop inspection.
            if not self._failed:
                log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), exc.strerror or exc)
                self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """Half of systemd's `WatchdogSec` (from `$WATCHDOG_USEC`), or None when no watchdog is armed.

    `$WATCHDOG_PID`, when set, names the process the watchdog is meant for; a child process
    that inherited the environment must not ping on its parent's behalf.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid.isdigit() and int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000 / 2


class Watchdog:
    """`WATCHDOG=1` at most every `interval_s`, sent only from the loop that calls `beat()`."""

    def __init__(self, notifier: SystemdNotifier, interval_s: float | None) -> None:
        self._notifier = notifier
        self._interval_s = interval_s
        self._last_ping = float("-inf")

    @property
    def armed(self) -> bool:
        return self._interval_s is not None and self._notifier.enabled

    def beat(self) -> None:
        """Call once per loop iteration that made progress; cheap when no ping is due."""
        if self._interval_s is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self._interval_s:
            self._last_ping = now
            self._notifier.send("WATCHDOG=1")
