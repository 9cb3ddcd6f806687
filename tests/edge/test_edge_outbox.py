"""The verdict outbox (`ganspect.edge.outbox.Outbox`) on a real SQLite file, without MQTT."""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from ganspect.edge.outbox import Outbox, OutboxError


def _open(folder: Path, **quota: object) -> Outbox:
    settings = {"max_messages": 1000, "max_bytes": 1_000_000, "when_full": "drop_oldest", **quota}
    return Outbox(folder / "outbox.sqlite3", **settings)  # type: ignore[arg-type]


def _put(outbox: Outbox, n: int, size: int = 10) -> list[int]:
    seqs = []
    for _ in range(n):
        seq = outbox.next_seq()
        assert outbox.put(seq, f"id-{seq}", json.dumps({"seq": seq, "pad": "x" * size}))
        seqs.append(seq)
    return seqs


def _rows_on_disk(path: Path) -> list[int]:
    with sqlite3.connect(path) as db:  # a second, independent reader of the file
        return [s for (s,) in db.execute("SELECT seq FROM outbox ORDER BY seq")]


def test_rows_come_back_in_seq_order_and_leave_only_when_acknowledged(tmp_path):
    outbox = _open(tmp_path)
    assert _put(outbox, 4) == [1, 2, 3, 4]
    assert [r.seq for r in outbox.pending(0, 10)] == [1, 2, 3, 4]
    assert [r.seq for r in outbox.pending(2, 1)] == [3]
    assert json.loads(outbox.pending(0, 1)[0].payload)["seq"] == 1

    outbox.mark_sent(1, mid=11)
    outbox.mark_sent(2, mid=12)
    assert outbox.inflight() == 2
    assert _rows_on_disk(outbox.path) == [1, 2, 3, 4]  # sent is not delivered
    assert outbox.acked(12)
    assert _rows_on_disk(outbox.path) == [1, 3, 4]
    assert outbox.acked(11)
    assert _rows_on_disk(outbox.path) == [3, 4]
    stats = outbox.stats()
    assert (stats.queued, stats.acknowledged, stats.dropped, stats.backlog, outbox.inflight()) == (4, 2, 0, 2, 0)
    outbox.close()


def test_an_ack_that_arrives_before_publish_returned_is_matched(tmp_path):
    outbox = _open(tmp_path)
    _put(outbox, 2)
    # paho's network thread can read the PUBACK before publish() has returned the mid.
    assert outbox.acked(21) is False
    assert _rows_on_disk(outbox.path) == [1, 2]
    outbox.mark_sent(1, mid=21)
    assert _rows_on_disk(outbox.path) == [2]
    assert outbox.inflight() == 0 and outbox.stats().acknowledged == 1
    # A later, ordinary ack for another message is unaffected by the parked one.
    outbox.mark_sent(2, mid=22)
    assert outbox.acked(22)
    assert _rows_on_disk(outbox.path) == []
    outbox.close()


def test_drop_oldest_keeps_the_newest_and_never_drops_a_row_in_flight(tmp_path, caplog):
    outbox = _open(tmp_path, max_messages=3)
    _put(outbox, 3)
    outbox.mark_sent(1, mid=5)  # row 1 is on the wire: the broker may still acknowledge it
    with caplog.at_level(logging.ERROR, logger="ganspect.edge.outbox"):
        _put(outbox, 2)
    assert _rows_on_disk(outbox.path) == [1, 4, 5]
    stats = outbox.stats()
    assert (stats.queued, stats.dropped, stats.backlog) == (5, 2, 3)
    full = [r for r in caplog.records if "outbox FULL" in r.getMessage()]
    assert len(full) == 1, "drops are logged loudly, but rate-limited"
    assert "drop_oldest" in full[0].getMessage()
    outbox.close()


def test_drop_new_keeps_the_oldest_and_still_advances_seq(tmp_path, caplog):
    outbox = _open(tmp_path, max_messages=2, when_full="drop_new")
    _put(outbox, 2)
    with caplog.at_level(logging.ERROR, logger="ganspect.edge.outbox"):
        assert outbox.put(3, "id-3", "{}") is False
    assert _rows_on_disk(outbox.path) == [1, 2]
    assert outbox.next_seq() == 4  # the gap in seq shows the consumer that a verdict was discarded
    assert outbox.stats().dropped == 1
    assert any("outbox FULL" in r.getMessage() and "drop_new" in r.getMessage() for r in caplog.records)
    outbox.close()


def test_byte_quota_counts_payload_bytes(tmp_path):
    outbox = _open(tmp_path, max_bytes=2500)
    _put(outbox, 5, size=1000)  # each payload is a little over 1000 bytes: two fit
    assert _rows_on_disk(outbox.path) == [4, 5]
    stats = outbox.stats()
    assert stats.dropped == 3 and 2000 < stats.backlog_bytes <= 2500
    outbox.close()


def test_the_outbox_uses_wal_and_survives_a_killed_process(tmp_path):
    folder = tmp_path / "data"
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from ganspect.edge.outbox import Outbox
        outbox = Outbox(Path({str(folder / "outbox.sqlite3")!r}), max_messages=100, max_bytes=10**6)
        for _ in range(3):
            seq = outbox.next_seq()
            outbox.put(seq, f"id-{{seq}}", '{{"seq": %d}}' % seq)
        outbox.mark_sent(1, 1)
        outbox.acked(1)
        outbox.note_seq(outbox.next_seq())  # seq 4 used without a row (as with MQTT disabled)
        print(outbox.journal_mode(), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no close(), no commit at exit: only what put() made durable
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    assert proc.stdout.strip() == "wal"
    assert (folder / "outbox.sqlite3-wal").exists()

    outbox = _open(folder)
    assert outbox.journal_mode() == "wal"
    assert [r.seq for r in outbox.pending(0, 10)] == [2, 3]
    assert outbox.backlog_at_open == 2 and outbox.stats().backlog == 2
    assert outbox.next_seq() == 5, "seq continues after the restart"
    outbox.close()


def test_a_second_daemon_cannot_share_the_data_folder(tmp_path):
    first = _open(tmp_path)
    with pytest.raises(OutboxError, match="in use by another ganspect edge daemon"):
        _open(tmp_path)
    first.close()
    _open(tmp_path).close()  # released on close


def test_puts_and_acks_from_two_threads_lose_nothing(tmp_path):
    outbox = _open(tmp_path)
    n = 300
    sent: list[tuple[int, int]] = []
    ready = threading.Condition()
    errors: list[BaseException] = []

    def producer() -> None:
        try:
            for seq in _put(outbox, n):
                with ready:
                    sent.append((seq, 1000 + seq))
                    ready.notify()
        except BaseException as exc:
            errors.append(exc)

    def acker() -> None:  # plays paho's network thread: acks each message, sometimes before mark_sent
        try:
            done = 0
            while done < n:
                with ready:
                    if not ready.wait_for(lambda: sent, timeout=10):
                        raise TimeoutError("producer stalled")
                    seq, mid = sent.pop(0)
                if seq % 2:
                    outbox.acked(mid)
                    outbox.mark_sent(seq, mid)
                else:
                    outbox.mark_sent(seq, mid)
                    outbox.acked(mid)
                done += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=producer), threading.Thread(target=acker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert _rows_on_disk(outbox.path) == []
    stats = outbox.stats()
    assert (stats.queued, stats.acknowledged, stats.backlog, outbox.inflight()) == (n, n, 0, 0)
    outbox.close()


def test_the_wal_stays_under_a_mebibyte_while_verdicts_come_and_are_acknowledged(tmp_path):
    # SQLite's default lets the WAL reach about 4 MB (1000 pages) and keep that size: on a small data disk that
    # alone filled it. Checkpointed every 256 pages and cut back after each, it stays near 1 MiB.
    outbox = _open(tmp_path)
    wal = tmp_path / "outbox.sqlite3-wal"
    largest = 0
    for i, seq in enumerate(_put(outbox, 1200, size=600), start=1):
        outbox.mark_sent(seq, seq)
        outbox.acked(seq)
        if i % 25 == 0:
            largest = max(largest, wal.stat().st_size if wal.exists() else 0)
    outbox.close()
    assert 0 < largest <= 1024 * 1024 + 64 * 1024, largest


def test_outbox_settings_are_validated_and_data_dir_follows_the_config_file(tmp_path):
    from ganspect.edge.config import load_config
    from ganspect.edge.errors import ConfigError

    base = "station: {site: s, line: l, station: c}\nmodel: {bundle: b}\nsource: {uri: v.avi}\n"
    folder = tmp_path / "etc"
    folder.mkdir()
    path = folder / "edge.yaml"
    path.write_text(base, encoding="utf-8")
    config = load_config(path)
    assert config.data.dir == folder / "edge-data"
    assert config.mqtt.require_broker is False
    assert (config.mqtt.outbox.when_full, config.mqtt.outbox.max_messages) == ("drop_oldest", 500_000)

    path.write_text(base + "data: {dir: /var/lib/ganspect}\n", encoding="utf-8")
    assert load_config(path).data.dir == Path("/var/lib/ganspect")

    path.write_text(base + "mqtt:\n  outbox:\n    when_full: block\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"edge.yaml:6: mqtt.outbox.when_full: .*'drop_oldest' or 'drop_new'"):
        load_config(path)


# -- a damaged outbox --------------------------------------------------------------------------


def _damaged_outbox(folder: Path, how: str) -> Path:
    """An outbox with 200 verdicts (seq 1 and 2 acknowledged), closed, then damaged on disk as a failing SD card or
    an interrupted copy leaves it."""
    outbox = _open(folder)
    _put(outbox, 200, size=300)
    for seq in (1, 2):
        outbox.mark_sent(seq, seq)
        outbox.acked(seq)
    outbox.close()
    path = folder / "outbox.sqlite3"
    data = bytearray(path.read_bytes())
    if how == "pages":  # some pages of the table overwritten: SQLite still opens it, its check finds the damage
        for offset in range(3 * 4096, 6 * 4096, 97):
            data[offset : offset + 16] = b"\xa5" * 16
    else:  # the header gone: not a database any more
        data[:100] = bytes(100)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    "how, counter", [("pages", "seq continues from 201"), ("header", "(the old counter could not be read)")]
)
def test_a_damaged_outbox_is_moved_aside_kept_and_replaced_by_a_new_one(tmp_path, caplog, how, counter):
    path = _damaged_outbox(tmp_path, how)
    damaged = path.read_bytes()
    with caplog.at_level(logging.ERROR, logger="ganspect.edge.outbox"):
        outbox = _open(tmp_path)
    try:
        assert outbox.stats().backlog == 0 and outbox.backlog_at_open == 0
        seq = outbox.next_seq()
        assert seq > 200, "seq keeps increasing for the MES, whatever was lost"
        assert outbox.put(seq, "id-new", json.dumps({"seq": seq}))
        assert _rows_on_disk(path) == [seq]
    finally:
        outbox.close()
    kept = sorted(tmp_path.glob("outbox.damaged-*.sqlite3"))
    assert len(kept) == 1 and re.fullmatch(r"outbox\.damaged-\d{8}T\d{6}Z\.sqlite3", kept[0].name)
    assert kept[0].read_bytes() == damaged, "the damaged file is kept as it was, for recovery"
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert f"the verdict outbox {path} is damaged (" in lines[0] and f"moved aside to {kept[0].name}" in lines[0]
    assert "lost: " in lines[0] and counter in lines[0]
    if how == "header":
        assert "lost: the verdicts that waited for the broker's acknowledgement (how many cannot be read)" in lines[0]
        assert seq > 1_700_000_000_000  # beyond any counter a station can have reached: 1 verdict/ms since 1970
    # The next start finds the new outbox sound and leaves the kept file alone.
    _open(tmp_path).close()
    assert sorted(tmp_path.glob("outbox.damaged-*.sqlite3")) == kept


def test_the_daemon_starts_with_a_damaged_outbox_and_says_what_was_lost(
    tmp_path, tiny_bundle, tiny_video, make_edge_config, ganspect_cli
):
    data = tmp_path / "data"
    data.mkdir()
    _damaged_outbox(data, "pages")
    config = make_edge_config(tiny_bundle, tiny_video.path, None, data={"dir": str(data)})
    verdict_log = tmp_path / "verdicts.jsonl"
    proc = ganspect_cli("edge", "--config", str(config), "--headless", "--verdict-log", str(verdict_log))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    damaged = [line for line in proc.stderr.splitlines() if "is damaged" in line]
    assert len(damaged) == 1 and "moved aside to outbox.damaged-" in damaged[0], proc.stderr
    assert len(list(data.glob("outbox.damaged-*.sqlite3"))) == 1
    seqs = [json.loads(line)["seq"] for line in verdict_log.read_text(encoding="utf-8").splitlines()]
    assert seqs == list(range(201, 201 + len(tiny_video.expected))), "every part judged; seq went on after 200"
