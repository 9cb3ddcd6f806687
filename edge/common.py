"""Small helpers several edge modules share."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path


def utc_iso(moment: datetime) -> str:
    """UTC ISO 8601 with milliseconds and a Z, e.g. 2024-05-01T08:30:00.123Z."""
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def first_line(exc: BaseException, *, with_type: bool = False) -> str:
    """The first line of an error's message, for a log line or an answer; the error's type when it has none.

    `with_type` puts the type in front ("ValueError: ..."), for errors nobody raised on purpose.
    """
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0]
    return f"{type(exc).__name__}: {line}" if with_type else line


def fsync_folder(folder: Path) -> None:
    """Make the names in `folder` durable: after a rename or unlink, fsync the folder too (POSIX)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
