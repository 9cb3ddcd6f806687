"""The verdict: one per inspected part, published on `.../verdict` and kept in the outbox.

`Verdict` is the payload's only definition: the daemon builds one per part once its
timings are known, and `schemas/verdict.schema.json` is generated from it
(`schema_files.py`). `judge` is the only place that decides OK, NG or UNDEFINED.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ganspect.edge.common import utc_iso
from ganspect.edge.payloads import UTC_PATTERN

if TYPE_CHECKING:  # type-only: the manifest judges its golden images with `judge`, so no import back at run time
    from ganspect.edge.config import StationConfig
    from ganspect.edge.manifest import Manifest, ModelFile
    from ganspect.edge.scorer import Score

ResultState = Literal["OK", "NG", "UNDEFINED"]
Milliseconds = Annotated[float, Field(ge=0)]


class _Part(BaseModel):
    # Written by the daemon, never read from outside: no strict mode, but nothing JSON cannot carry (NaN).
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        allow_inf_nan=False,
        json_schema_serialization_defaults_required=True,
    )


class Evaluation(_Part):
    """The result state (OPC UA ResultState): OK, NG (score above the threshold) or UNDEFINED (no usable score:
    treat as not OK)."""

    state: ResultState
    reason: str | None = Field(description="Why the state is UNDEFINED; null for OK and NG.")


def judge(score: float | None, threshold: float, undefined: str | None = None) -> Evaluation:
    """NG when `score` > `threshold`, else OK; UNDEFINED, never OK, with a reason (`undefined`: a stale frame, no
    frame, a failed inference) or without a finite score."""
    if undefined is not None:
        return Evaluation(state="UNDEFINED", reason=undefined)
    if score is None:
        return Evaluation(state="UNDEFINED", reason="no score")
    if not math.isfinite(score):
        # A NaN compares false with everything: without this test it would pass as OK.
        return Evaluation(state="UNDEFINED", reason=f"the model returned a non-finite score ({score})")
    return Evaluation(state="NG" if score > threshold else "OK", reason=None)


def finite_or_none(value: float) -> float | None:
    # JSON has no NaN or infinity: a non-finite number is published as null.
    return value if math.isfinite(value) else None


class StationName(_Part):
    """Where the part was inspected (the same names as in the topic)."""

    site: str = Field(min_length=1)
    line: str = Field(min_length=1)
    station: str = Field(min_length=1)

    @classmethod
    def of(cls, station: StationConfig) -> StationName:
        return cls(site=station.site, line=station.line, station=station.station)


class ThresholdUsed(_Part):
    """The decision threshold used: NG when score > value."""

    value: float
    source: Literal["bundle", "override"] = Field(
        description="bundle: chosen at training time (manifest.json); override: set at run time by a command."
    )


class ModelUsed(_Part):
    """The model that judged the part."""

    name: str = Field(min_length=1)
    kind: Literal["efficient_gan", "anogan"]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the ONNX file that ran.")
    precision: Literal["fp32", "int8"]

    @classmethod
    def of(cls, manifest: Manifest, model_file: ModelFile) -> ModelUsed:
        return cls(name=manifest.name, kind=manifest.kind, sha256=model_file.sha256, precision=model_file.precision)


class Timings(_Part):
    """Milliseconds per stage for this result. Delivery (outbox commit and send) comes after the payload is
    sealed, so its timing is in the metrics topic only."""

    capture_age: Milliseconds | None = Field(
        description="Age of the frame when scoring began (capture to hand-over); null without a frame."
    )
    preprocess: Milliseconds | None = Field(
        description="ROI crop, colour conversion, resize or tiling; null when nothing was scored."
    )
    inference: Milliseconds | None = Field(
        description="The one session.run (all tiles in one batch); null when nothing was scored."
    )
    overlay: Milliseconds | None = Field(description="Drawing the operator window's image; null without a window.")
    total: Milliseconds = Field(description="From frame in hand to result ready, the stages above included.")

    @field_validator("*")
    @classmethod
    def _to_the_microsecond(cls, value: float | None) -> float | None:
        return None if value is None else round(value, 3)


class HeatmapPeak(_Part):
    """Position of the heatmap maximum in model input pixels (x = column, y = row) and its value (1.0 = largest
    residual seen on normal images). With inspection.tiling: tiles, in ROI pixels (a tile's pixel is a model
    pixel)."""

    x: int = Field(ge=0)
    y: int = Field(ge=0)
    value: float | None

    @classmethod
    def of(cls, score: Score) -> HeatmapPeak:
        return cls(x=score.peak_x, y=score.peak_y, value=finite_or_none(score.peak_value))


class Verdict(_Part):
    """One inspection result, published as JSON on <prefix>/<site>/<line>/<station>/verdict with QoS 1: at least
    once (deduplicate by result_id), in seq order per station. Field names follow OPC UA Machine Vision results
    (ResultId, PartId, ResultState). See docs/mqtt.md."""

    schema_: Literal["ganspect.verdict/1"] = Field(
        default="ganspect.verdict/1",
        alias="schema",
        description="Payload format and major version; a consumer rejects a version it does not know.",
    )
    seq: int = Field(
        ge=1,
        description="Per-station counter: 1, 2, 3, ... in production order, kept on disk so it keeps increasing "
        "across daemon restarts. A gap means verdicts were discarded by the outbox quota (or the station's data "
        "folder was reset).",
    )
    result_id: str = Field(
        pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$",
        description="Random UUID (version 4) of this result, the same in every copy: the consumers' idempotency key.",
    )
    part_id: str = Field(
        min_length=1,
        description="The part's id: in trigger mode the one the trigger command carried; in continuous mode "
        "<source-name>:<frame-index>, or <source-name>:stalled for the UNDEFINED result a silent source gives once "
        "per source.stale_after_s.",
    )
    trigger_id: str | None = Field(
        description="Id of the trigger command that asked for this result (as the command gave it, or null when it "
        "gave none); null in continuous mode."
    )
    station: StationName
    captured_at: str = Field(
        pattern=UTC_PATTERN,
        description="UTC time (ISO 8601) the frame was read from the source; when no frame could be had "
        "(UNDEFINED), the time the result was made.",
    )
    published_at: str = Field(
        pattern=UTC_PATTERN,
        description="UTC time (ISO 8601) this copy was sent from the outbox (later than captured_at by the outage "
        "for a replayed result). In the daemon's local verdict log: the time the result was made.",
    )
    evaluation: Evaluation
    score: float | None = Field(
        description="Anomaly score, higher = more anomalous; with tiling, the worst tile's. null when there is none "
        "(no frame, a stale frame, a failed inference) or the model returned a non-finite value; evaluation.state "
        "is then UNDEFINED."
    )
    threshold: ThresholdUsed
    model: ModelUsed
    processing_ms: Timings
    heatmap_peak: HeatmapPeak | None = Field(description="null when nothing was scored.")
    image_path: str | None = Field(
        description="JPEG of this part with its heatmap overlay on the edge PC, "
        "<data.dir>/images/<UTC date>/<result_id>.jpg; written shortly after the verdict by a writer thread. null "
        "when not saved (an OK part, or dropped because the disk is nearly full or the writer is behind)."
    )
    replayed: bool = Field(
        default=False,
        description="true when this result waited in the outbox for a connection (a broker outage or a daemon "
        "restart) instead of being sent as it was made.",
    )

    def unstored(self) -> Verdict:
        """This verdict as sent when the outbox had no room for it: UNDEFINED, the judgement kept in the reason."""
        reason = (
            "data disk full: the verdict could not be stored, so its delivery is not guaranteed "
            f"(judged {self.evaluation.state}, not published as such)"
        )
        return self.model_copy(update={"evaluation": judge(self.score, self.threshold.value, undefined=reason)})

    def json_text(self) -> str:
        """The compact JSON text, as stored, logged and sent."""
        return _compact(self.model_dump(by_alias=True))


def stamped_for_sending(stored: str, *, replayed: bool) -> str:
    """A stored verdict's text as sent now: `published_at` this send's time, `replayed` whether it waited."""
    # Patched as JSON rather than validated into a Verdict again: whatever an earlier run stored still goes out.
    payload = json.loads(stored)
    payload["replayed"] = replayed
    payload["published_at"] = utc_iso(datetime.now(timezone.utc))
    return _compact(payload)


def _compact(payload: dict[str, object]) -> str:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False)
