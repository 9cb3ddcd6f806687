"""What asks the daemon to inspect a part: the trigger requests that reach the scoring loop.

A `TriggerRequest` is made by the MQTT command handler (`cmd/trigger`) once the command
has been validated, and consumed by the scoring loop in `trigger.mode: mqtt`, which
scores the first frame captured *after* `received_at` and publishes that part's verdict
with the same `part_id` and `trigger_id`. `FrameClaims` binds each one to that frame as
the capture thread reads it, whatever the scoring loop is busy with.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ganspect.edge.source import Frame


@dataclass(frozen=True)
class TriggerRequest:
    part_id: str
    trigger_id: str | None
    received_at: float  # time.monotonic() when the command arrived; frames captured after it qualify


class PendingTrigger:
    """A trigger waiting to be served, and the frame it is bound to once one has been captured after it."""

    __slots__ = ("frame", "request")

    def __init__(self, request: TriggerRequest) -> None:
        self.request = request
        self.frame: Frame | None = None  # set by `FrameClaims.offer` on the capture thread


class FrameClaims:
    """Binds each trigger to the first frame captured after it, on the capture thread, when that frame arrives.

    Binding at capture time is what keeps a verdict on the right part: on a moving line the
    frame taken when the scoring loop gets round to a trigger may already show the next part,
    and under the `latest` delivery a frame one trigger took is gone for the next. Triggers
    that arrive within one frame interval share its frame (the same array, not copied). A
    pending trigger holds its frame until scored, so memory is bounded by trigger.queue_size
    frames.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: list[PendingTrigger] = []  # no frame yet, oldest first
        self._newest: Frame | None = None

    def claim(self, request: TriggerRequest) -> PendingTrigger:
        pending = PendingTrigger(request)
        with self._cond:
            newest = self._newest
            # A frame captured between the command's arrival and now (microseconds) is the first after it.
            if newest is not None and newest.captured_mono > request.received_at:
                pending.frame = newest
            else:
                self._waiting.append(pending)
        return pending

    def offer(self, frame: Frame) -> None:
        """A new frame (capture thread): it becomes the frame of every trigger that arrived before it."""
        with self._cond:
            self._newest = frame
            if not self._waiting:
                return
            still = []
            for pending in self._waiting:
                if pending.request.received_at < frame.captured_mono:
                    pending.frame = frame
                else:
                    still.append(pending)
            self._waiting = still
            self._cond.notify_all()

    def wait(self, pending: PendingTrigger, timeout: float) -> Frame | None:
        """Its frame, waiting up to `timeout` s for it; None if none has come yet."""
        with self._cond:
            if pending.frame is None and timeout > 0:
                self._cond.wait_for(lambda: pending.frame is not None, timeout)
            return pending.frame

    def cancel(self, pending: PendingTrigger) -> None:
        """Stop waiting for a frame for `pending` (its verdict is UNDEFINED)."""
        with self._cond:
            if pending in self._waiting:
                self._waiting.remove(pending)
