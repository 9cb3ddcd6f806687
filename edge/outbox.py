"""The verdict outbox: a SQLite database (WAL) that holds every verdict until the broker acknowledged it.

paho keeps unacknowledged QoS 1 messages only in memory, so a daemon restart (a crash, a
power cut, an update) would lose them. Here a verdict is committed to disk *before* it
is handed to the MQTT client and deleted only when the broker's PUBACK for it arrives;
whatever is still on disk when the daemon starts again is sent first, in seq order.

The same database keeps the station's verdict counter (`seq`), so seq keeps increasing
across restarts and a consumer can spot a gap.

Threads: the daemon's main loop inserts, the publisher's sender thread reads and marks
rows as sent, and paho's network thread reports acks. One connection
(`check_same_thread=False`) serialised by one lock keeps that safe; every write is its
own short transaction. `synchronous=FULL` makes each commit durable against a power cut
(in WAL mode that is one fsync of the WAL per verdict, well under a millisecond to a few
milliseconds on a line PC's SSD).

Acks may arrive before `publish()` has returned the message id to the sender (the
network thread can read the PUBACK first), so `acked(mid)` for an id not yet known is
parked and matched by the `mark_sent(seq, mid)` that follows.

Disk space: the WAL is checkpointed every `_WAL_CHECKPOINT_PAGES` pages and cut back to
`_WAL_LIMIT_BYTES` after a checkpoint, and it keeps that size, so a small data disk is
not eaten by the journal (SQLite's default lets it grow to about 4 MB and keep it). Rows
deleted on acknowledgement leave free pages that new rows reuse, so while the broker
keeps up the outbox needs no new space; it grows only with a backlog. A write the disk
has no room for raises `OutboxFull`: nothing already on disk is touched (the transaction
rolls back), and the daemon decides what the verdict becomes (see `app.py`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

try:
    import fcntl
except ImportError:  # not on Windows: there, nothing stops a second daemon on the same folder
    fcntl = None  # type: ignore[assignment]

from ganspect.edge.errors import GanspectError

log = logging.getLogger(__name__)

WhenFull = Literal["drop_oldest", "drop_new"]
OUTBOX_FILE = "outbox.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,       -- the verdict's seq: send order
    result_id TEXT NOT NULL,
    payload TEXT NOT NULL,         -- the verdict JSON as made (published_at/replayed are set per send)
    size INTEGER NOT NULL,         -- len(payload) in bytes, for the quota
    created_at REAL NOT NULL       -- unix time the verdict was queued
);
"""
_SAVE_LAST_SEQ = (
    "INSERT INTO meta (key, value) VALUES ('last_seq', ?) "
    "ON CONFLICT(key) DO UPDATE SET value = MAX(value, excluded.value)"
)
# Drops are logged at ERROR at most this often; the counter counts every one.
_DROP_LOG_INTERVAL_S = 10.0
# ~1 MiB of 4 KiB pages between checkpoints, and the WAL cut back to that after each: a verdict is a few pages,
# so this is a few hundred verdicts, and a checkpoint (one fsync of the database) a few times a minute at 25/s.
_WAL_CHECKPOINT_PAGES = 256
_WAL_LIMIT_BYTES = 1024 * 1024


class OutboxError(GanspectError):
    """The outbox database cannot be opened or written."""


class OutboxFull(OutboxError):
    """The disk holding the outbox has no room for this write; what is already on disk is intact."""


def _is_full(exc: sqlite3.Error) -> bool:
    code: int | None = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+, and only on errors SQLite raised
    if sys.version_info >= (3, 11) and code is not None:
        return code & 0xFF == sqlite3.SQLITE_FULL
    return "disk is full" in str(exc)


class _Damaged(Exception):
    """The outbox file is not a sound SQLite database (SQLite says corrupt or not a database)."""


def _is_damage(exc: BaseException) -> bool:
    code: int | None = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if sys.version_info >= (3, 11) and code is not None:
        return code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
    text = str(exc)
    return "malformed" in text or "not a database" in text


@dataclass(frozen=True)
class _Salvage:
    """What could still be read from a damaged outbox; None where nothing could."""

    last_seq: int | None
    waiting: int | None
    first_waiting: int | None
    last_waiting: int | None


def _salvage(path: Path) -> _Salvage:
    """Read what a damaged outbox still tells, without writing to it (its owner may want to recover it)."""

    def ask(sql: str) -> tuple[int | None, ...] | None:
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
            try:
                return tuple(db.execute(sql).fetchone())
            finally:
                db.close()
        except sqlite3.Error:
            return None

    meta = ask("SELECT value FROM meta WHERE key = 'last_seq'")
    rows = ask("SELECT COUNT(*), MIN(seq), MAX(seq) FROM outbox")
    last_seq = None
    if meta is not None or rows is not None:
        known = [int(v) for v in ((meta or (None,))[0], (rows or (None, None, None))[2]) if v is not None]
        last_seq = max(known, default=0)
    if rows is None:
        return _Salvage(last_seq, None, None, None)
    return _Salvage(last_seq, int(rows[0] or 0), rows[1], rows[2])


def _move_aside(path: Path) -> Path:
    """Rename the damaged database and its WAL and shared-memory files to `<stem>.damaged-<UTC time><suffix>`."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.stem}.damaged-{stamp}{path.suffix}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.stem}.damaged-{stamp}-{n}{path.suffix}")
    try:
        for companion in ("-wal", "-shm"):  # the WAL holds committed rows: it belongs with the file
            side = Path(f"{path}{companion}")
            if side.exists():
                os.replace(side, f"{target}{companion}")
        os.replace(path, target)
    except OSError as exc:
        raise OutboxError(
            f"the verdict outbox {path} is damaged and cannot be moved aside: {exc.strerror or exc}; "
            f"move it (and {path.name}-wal) out of data.dir by hand, the daemon then starts a new "
            "one"
        ) from exc
    return target


@dataclass(frozen=True)
class Row:
    seq: int
    result_id: str
    payload: str


@dataclass(frozen=True)
class OutboxStats:
    queued: int  # verdicts put into the outbox since it was opened
    acknowledged: int  # rows deleted because the broker acknowledged them (any run's)
    dropped: int  # rows discarded by the quota policy since it was opened
    backlog: int  # rows on disk now (waiting or in flight)
    backlog_bytes: int


def _lock_exclusively(path: Path) -> IO[str]:
    """Hold an exclusive flock on `path` for this process (the kernel drops it when the process dies).

    Two daemons sending from one outbox would send every verdict twice.
    """
    try:
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115  (held open: the lock lives as long as it)
    except OSError as exc:
        raise OutboxError(f"cannot write in data.dir {path.parent}: {exc.strerror or exc}") from exc
    if fcntl is not None:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            raise OutboxError(
                f"{path.parent} is in use by another ganspect edge daemon ({exc.strerror}); "
                "give each daemon its own data.dir"
            ) from exc
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    except OSError:
        pass  # the pid is for people reading the folder; a full disk must not stop the start for it
    return handle


class Outbox:
    """Verdicts waiting for the broker's acknowledgement, on disk, in seq order."""

    # Both set by _open.
    _db: sqlite3.Connection
    _last_seq: int

    def __init__(self, path: Path, *, max_messages: int, max_bytes: int, when_full: WhenFull = "drop_oldest") -> None:
        self.path = path
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.when_full = when_full
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(f"cannot create data.dir {path.parent}: {exc.strerror or exc}") from exc
        self._lockfile = _lock_exclusively(path.with_suffix(".lock"))
        try:
            mode, count, size, top = self._open()
        except _Damaged as exc:
            # A service must come back: keep the damaged file for recovery, say what is lost, start afresh.
            salvaged = _salvage(path)
            try:
                moved = _move_aside(path)
            except OutboxError:
                self._lockfile.close()
                raise
            mode, count, size, top = self._open()  # a new, empty file
            # seq must keep increasing for the MES: after the old counter, or, when it cannot be read, after any
            # counter this station can have reached (one verdict per millisecond since 1970).
            floor = salvaged.last_seq if salvaged.last_seq is not None else int(time.time() * 1000)
            self._write(_SAVE_LAST_SEQ, (floor,))
            self._last_seq = max(self._last_seq, floor)
            lost = (
                f"{salvaged.waiting} verdict(s) that waited for the broker's acknowledgement "
                f"(seq {salvaged.first_waiting} .. {salvaged.last_waiting})"
                if salvaged.waiting
                else "no verdict (none was waiting)"
                if salvaged.waiting == 0
                else "the verdicts that waited for the broker's acknowledgement (how many cannot be read)"
            )
            log.error(
                "the verdict outbox %s is damaged (%s): moved aside to %s and a new one started; lost: %s; "
                "seq continues from %d%s",
                path,
                exc,
                moved.name,
                lost,
                floor + 1,
                "" if salvaged.last_seq is not None else " (the old counter could not be read)",
            )
        if mode.lower() != "wal":
            self._db.close()
            self._lockfile.close()
            raise OutboxError(
                f"the verdict outbox {path} cannot use SQLite WAL mode (got {mode}); "
                "put data.dir on a local file system"
            )
        self._last_seq = max(self._last_seq, int(top))
        self._count = int(count)
        self._bytes = int(size)
        self._queued = 0
        self._acknowledged = 0
        self._dropped = 0
        self._last_drop_log = float("-inf")
        self._inflight: dict[int, int] = {}  # paho message id -> seq
        self._early: set[int] = set()  # acks that came before mark_sent told us their mid
        self.backlog_at_open = self._count

    def _open(self) -> tuple[str, int, int, int]:
        """Connect, set WAL and the schema, check the file; (journal mode, rows, bytes, top seq)."""
        path = self.path
        try:
            # isolation_level=None: autocommit; transactions are opened explicitly below.
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=5.0)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(f"PRAGMA wal_autocheckpoint={_WAL_CHECKPOINT_PAGES}")
            self._db.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT_BYTES}")
            # Reads every page (not the payloads' contents): a damaged page found now, not while sending.
            problems = [row[0] for row in self._db.execute("PRAGMA quick_check(3)").fetchall()]
            if problems != ["ok"]:  # SQLite's own words, which may span lines: one line for the log
                raise _Damaged(" ".join("; ".join(problems).split())[:300])
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
            self._last_seq = int(row[0]) if row else 0
            count, size, top = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(MAX(seq), 0) FROM outbox"
            ).fetchone()
        except _Damaged:
            self._db.close()
            raise
        except (sqlite3.Error, OSError) as exc:
            self._close_quietly()
            if _is_damage(exc):
                raise _Damaged(str(exc)) from exc
            self._lockfile.close()
            raise OutboxError(
                f"cannot open the verdict outbox {path}: {exc} (check data.dir and that the folder is writable)"
            ) from exc
        return str(mode), int(count), int(size), int(top)

    def _close_quietly(self) -> None:
        with contextlib.suppress(sqlite3.Error, AttributeError):
            self._db.close()

    # -- seq ---------------------------------------------------------------------------
    @property
    def last_seq(self) -> int:
        """The highest seq ever given out by this station (persisted)."""
        with self._lock:
            return self._last_seq

    def next_seq(self) -> int:
        """The seq for the next verdict; it becomes durable with `put` or `note_seq`."""
        with self._lock:
            return self._last_seq + 1

    def note_seq(self, seq: int) -> None:
        """Persist `seq` as used without queueing a verdict (MQTT disabled)."""
        with self._lock:
            self._write(_SAVE_LAST_SEQ, (seq,))
            self._last_seq = max(self._last_seq, seq)

    # -- queue -------------------------------------------------------------------------
    def put(self, seq: int, result_id: str, payload: str) -> bool:
        """Commit one verdict (and its seq) to disk; False when the quota refused it (drop_new).

        Raises `OutboxFull` when the disk has no room for it; `seq` is then still saved as used
        where that one-page write fits, so that it is not given out again after a restart.
        """
        size = len(payload.encode("utf-8"))
        with self._lock:
            self._queued += 1
            if self._over_quota(1, size) and self.when_full == "drop_new":
                self._count_drops(1, f"verdict seq {seq} was not queued")
                self._write(_SAVE_LAST_SEQ, (seq,))
                self._last_seq = max(self._last_seq, seq)
                return False
            try:
                self._db.execute("BEGIN IMMEDIATE")
                if self.when_full == "drop_oldest":
                    self._drop_oldest_for(size)
                self._db.execute(
                    "INSERT INTO outbox (seq, result_id, payload, size, created_at) VALUES (?, ?, ?, ?, ?)",
                    (seq, result_id, payload, size, time.time()),
                )
                self._db.execute(_SAVE_LAST_SEQ, (seq,))
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                if _is_full(exc):
                    self._last_seq = max(self._last_seq, seq)
                    # Else in memory only: after a restart during the full disk, seq may repeat.
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute(_SAVE_LAST_SEQ, (seq,))
                    raise OutboxFull(f"the disk holding the verdict outbox {self.path} is full: {exc}") from exc
                raise OutboxError(f"cannot write the verdict outbox {self.path}: {exc}") from exc
            self._count += 1
            self._bytes += size
            self._last_seq = max(self._last_seq, seq)
            return True

    def _over_quota(self, extra_count: int, extra_bytes: int) -> bool:
        return self._count + extra_count > self.max_messages or self._bytes + extra_bytes > self.max_bytes

    def _drop_oldest_for(self, size: int) -> None:
        """Inside a transaction: delete the oldest rows not in flight until `size` more bytes fit."""
        dropped = 0
        inflight = set(self._inflight.values())
        while self._over_quota(1, size):
            rows = self._db.execute(
                "SELECT seq, size FROM outbox ORDER BY seq LIMIT ?", (len(inflight) + 64,)
            ).fetchall()
            victims = [(s, n) for s, n in rows if s not in inflight]
            if not victims:
                break  # everything left is in flight; the quota is exceeded by at most max_inflight rows
            for s, n in victims:
                if not self._over_quota(1, size):
                    break
                self._db.execute("DELETE FROM outbox WHERE seq = ?", (s,))
                self._count -= 1
                self._bytes -= n
                dropped += 1
        if dropped:
            self._count_drops(dropped, f"dropped the {dropped} oldest unsent verdict(s)")

    def _count_drops(self, n: int, what: str) -> None:
        self._dropped += n
        now = time.monotonic()
        if now - self._last_drop_log >= _DROP_LOG_INTERVAL_S:
            self._last_drop_log = now
            log.error(
                "verdict outbox FULL (%d messages / %d bytes allowed, policy %s): %s; %d dropped so far "
                "- the MQTT broker has not acknowledged verdicts for a long time",
                self.max_messages,
                self.max_bytes,
                self.when_full,
                what,
                self._dropped,
            )

    def pending(self, after_seq: int, limit: int) -> list[Row]:
        """Up to `limit` rows with seq > after_seq, in seq order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, result_id, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
            ).fetchall()
        return [Row(int(s), r, p) for s, r, p in rows]

    # -- acknowledgements --------------------------------------------------------------
    def mark_sent(self, seq: int, mid: int) -> None:
        """The row `seq` was handed to the MQTT client as message `mid`."""
        with self._lock:
            if mid in self._early:
                self._early.discard(mid)
                self._delete(seq)
            else:
                self._inflight[mid] = seq

    def acked(self, mid: int) -> bool:
        """The broker acknowledged message `mid`: delete its row. False when the mid was not known yet."""
        with self._lock:
            seq = self._inflight.pop(mid, None)
            if seq is None:
                self._early.add(mid)
                return False
            self._delete(seq)
            return True

    def release(self, mid: int) -> None:
        """Message `mid` was refused by the broker: free its in-flight slot, keep the row for the next start."""
        with self._lock:
            self._inflight.pop(mid, None)

    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def _delete(self, seq: int) -> None:
        row = self._db.execute("SELECT size FROM outbox WHERE seq = ?", (seq,)).fetchone()
        if row is None:
            return  # already dropped by the quota, or acknowledged twice
        self._write("DELETE FROM outbox WHERE seq = ?", (seq,))
        self._count -= 1
        self._bytes -= int(row[0])
        self._acknowledged += 1

    # -- bookkeeping -------------------------------------------------------------------
    def stats(self) -> OutboxStats:
        with self._lock:
            return OutboxStats(self._queued, self._acknowledged, self._dropped, self._count, self._bytes)

    def journal_mode(self) -> str:
        with self._lock:
            return str(self._db.execute("PRAGMA journal_mode").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._inflight.clear()
            self._early.clear()
            self._db.close()
            self._lockfile.close()  # releases the flock

    def _write(self, sql: str, args: tuple[object, ...]) -> None:
        try:
            self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot write the verdict outbox {self.path}: {exc}") from exc

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")
