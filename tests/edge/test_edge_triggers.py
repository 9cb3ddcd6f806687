"""FrameClaims: each trigger is bound to the first frame captured after it, as the capture thread offers frames."""

from __future__ import annotations

import threading
from datetime import datetime, timezone

import numpy as np

from ganspect.edge.source import Frame
from ganspect.edge.triggers import FrameClaims, TriggerRequest


def _frame(index: int, mono: float) -> Frame:
    return Frame(np.zeros((4, 4, 3), np.uint8), index, datetime.now(timezone.utc), captured_mono=mono)


def test_triggers_before_a_frame_share_it_and_a_later_trigger_waits_for_the_next_frame():
    claims = FrameClaims()
    claims.offer(_frame(0, 10.0))
    a = claims.claim(TriggerRequest("A", None, received_at=10.5))
    b = claims.claim(TriggerRequest("B", None, received_at=10.7))
    assert a.frame is None and b.frame is None  # frame 0 was captured before both
    first = _frame(1, 11.0)
    claims.offer(first)
    c = claims.claim(TriggerRequest("C", None, received_at=11.2))
    claims.offer(_frame(2, 12.0))
    assert a.frame is first and b.frame is first  # the same array, not a later frame
    assert c.frame is not None and c.frame.index == 2


def test_a_frame_captured_just_before_the_claim_but_after_the_trigger_is_its_frame():
    claims = FrameClaims()
    claims.offer(_frame(5, 20.0))
    pending = claims.claim(TriggerRequest("A", "t", received_at=19.9))
    assert pending.frame is not None and pending.frame.index == 5


def test_wait_returns_the_frame_offered_from_another_thread_and_cancel_forgets_the_trigger():
    claims = FrameClaims()
    pending = claims.claim(TriggerRequest("A", None, received_at=1.0))
    threading.Timer(0.05, claims.offer, args=(_frame(1, 2.0),)).start()
    frame = claims.wait(pending, 5.0)
    assert frame is not None and frame.index == 1
    late = claims.claim(TriggerRequest("B", None, received_at=3.0))
    assert claims.wait(late, 0.01) is None
    claims.cancel(late)
    claims.offer(_frame(2, 4.0))
    assert late.frame is None  # cancelled: its verdict was UNDEFINED already
