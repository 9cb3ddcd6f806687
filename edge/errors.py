"""Errors meant for the person at the keyboard: the CLI prints them as one line, no traceback."""

from __future__ import annotations

import re
from collections.abc import Iterable


class GanspectError(Exception):
    """A problem the user can fix (bad config, bad bundle, missing extra, unreachable source)."""


class BundleError(GanspectError):
    """A model bundle that must not be used: missing file, hash mismatch, invalid manifest, wrong shape."""


class ConfigError(GanspectError):
    """A configuration file that does not validate; the message names the key."""


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_\-]+")


def key_path(loc: Iterable[int | str]) -> str:
    """A validation error's location as `mqtt.tls.ca_file`; a key that is not a plain word is quoted.

    Keys come from the file being read: one holding a newline or a dot must not break the
    one-line message or pass for a nested key.
    """
    return ".".join(str(p) if _PLAIN_KEY.fullmatch(str(p)) else repr(p) for p in loc)
