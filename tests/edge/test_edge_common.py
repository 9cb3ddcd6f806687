"""The small helpers the edge modules share."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from ganspect.edge.common import first_line, utc_iso


def test_first_line_of_an_error_without_a_message_is_its_type() -> None:
    assert first_line(ValueError("")) == "ValueError"
    assert first_line(ValueError("  \n ")) == "ValueError"
    assert first_line(ValueError(""), with_type=True) == "ValueError"


def test_first_line_keeps_only_the_first_line_and_can_name_the_type() -> None:
    error = RuntimeError("  the model failed\n  at node 12\n")
    assert first_line(error) == "the model failed"
    assert first_line(error, with_type=True) == "RuntimeError: the model failed"


def test_utc_iso_writes_utc_with_milliseconds_and_a_z() -> None:
    moment = datetime(2026, 5, 1, 10, 30, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    assert utc_iso(moment) == "2026-05-01T08:30:00.123Z"
