"""The verdict payload: one per inspected part, published on `.../verdict` and kept in the outbox.

`schemas/verdict.schema.json` documents every field.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any, Literal

from ganspect.edge.common import utc_iso
from ganspect.edge.config import StationConfig
from ganspect.edge.manifest import Manifest, ModelFile
from ganspect.edge.scorer import Score

VERDICT_SCHEMA = "ganspect.verdict/1"


def _finite_or_none(value: float) -> float | None:
    # JSON has no NaN or infinity: a non-finite number is published as null.
    return value if value == value and abs(value) != float("inf") else None


def evaluation_of(score: Score) -> dict[str, str | None]:
    """OK / NG by the threshold; UNDEFINED (never OK) when the model gave no usable score."""
    if _finite_or_none(score.score) is None:
        return {"state": "UNDEFINED", "reason": f"the model returned a non-finite score ({score.score})"}
    return {"state": score.result, "reason": None}


def build_verdict(
    *,
    seq: int,
    station: StationConfig,
    part_id: str,
    captured_at: datetime,
    score: Score | None,
    manifest: Manifest,
    model_file: ModelFile,
    total_ms: float,
    trigger_id: str | None = None,
    undefined_reason: str | None = None,
    capture_age_ms: float | None = None,
    threshold: float | None = None,
    threshold_source: Literal["bundle", "override"] = "bundle",
) -> dict[str, Any]:
    """The verdict payload as made; `schemas/verdict.schema.json` documents every field.

    `score.threshold` (or `threshold` when nothing was scored) is the threshold the part was
    judged by; `threshold_source` says whether it is the bundle's or a runtime override
    (`cmd/threshold`).

    `score` None or an `undefined_reason` (a stale frame, no frame, a failed inference)
    makes the result UNDEFINED, never OK. `published_at` is the time it was made here; the
    publisher sets it again at each send. `processing_ms.overlay` and `image_path` are
    filled in by the daemon once it has drawn and queued the image.
    """
    if undefined_reason is not None or score is None:
        evaluation: dict[str, str | None] = {"state": "UNDEFINED", "reason": undefined_reason or "no score"}
    else:
        evaluation = evaluation_of(score)
    return {
        "schema": VERDICT_SCHEMA,
        "seq": seq,
        "result_id": str(uuid.uuid4()),
        "part_id": part_id,
        "trigger_id": trigger_id,
        "station": {"site": station.site, "line": station.line, "station": station.station},
        "captured_at": utc_iso(captured_at),
        "published_at": utc_iso(datetime.now(timezone.utc)),
        "evaluation": evaluation,
        "score": _finite_or_none(score.score) if score is not None else None,
        "threshold": {
            "value": score.threshold
            if score is not None
            else (threshold if threshold is not None else model_file.threshold),
            "source": threshold_source,
        },
        "model": {
            "name": manifest.name,
            "kind": manifest.kind,
            "sha256": model_file.sha256,
            "precision": model_file.precision,
        },
        "processing_ms": {
            "capture_age": None if capture_age_ms is None else round(capture_age_ms, 3),
            "preprocess": round(score.preprocess_ms, 3) if score is not None else None,
            "inference": round(score.inference_ms, 3) if score is not None else None,
            "overlay": None,
            "total": round(total_ms, 3),
        },
        "heatmap_peak": None
        if score is None
        else {"x": score.peak_x, "y": score.peak_y, "value": _finite_or_none(score.peak_value)},
        "image_path": None,
        "replayed": False,
    }


def verdict_json(payload: dict[str, Any]) -> str:
    """The compact JSON text of a verdict, as stored, logged and sent (never NaN: JSON has none)."""
    return json.dumps(payload, separators=(",", ":"), allow_nan=False)
