"""Errors meant for the person at the keyboard: the CLI prints them as one line, no traceback."""


class GanspectError(Exception):
    """A problem the user can fix (bad config, bad bundle, missing extra, unreachable source)."""


class BundleError(GanspectError):
    """A model bundle that must not be used: missing file, hash mismatch, invalid manifest, wrong shape."""


class ConfigError(GanspectError):
    """A configuration file that does not validate; the message names the key."""
