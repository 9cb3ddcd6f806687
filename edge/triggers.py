"""What asks the daemon to inspect a part: the trigger requests that reach the scoring loop.

A `TriggerRequest` is made by the MQTT command handler (`cmd/trigger`) once the command
has been validated, and consumed by the scoring loop in `trigger.mode: mqtt`, which
scores the first frame captured *after* `received_at` and publishes that part's verdict
with the same `part_id` and `trigger_id`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TriggerRequest:
    part_id: str
    trigger_id: str | None
    received_at: float  # time.monotonic() when the command arrived; frames captured after it qualify
