"""The verdict's one rule (`judge`) and its wire text, without a daemon."""

from __future__ import annotations

import json

import pytest

from ganspect.edge.verdict import (
    Evaluation,
    ModelUsed,
    StationName,
    ThresholdUsed,
    Timings,
    Verdict,
    judge,
    stamped_for_sending,
)


@pytest.mark.parametrize(
    ("score", "state"),
    [
        (0.1, "OK"),
        (0.15, "OK"),
        (0.150001, "NG"),
        (-1.0, "OK"),
        (float("nan"), "UNDEFINED"),
        (float("inf"), "UNDEFINED"),
        (float("-inf"), "UNDEFINED"),
        (None, "UNDEFINED"),
    ],
)
def test_ng_only_above_the_threshold_and_never_ok_without_a_finite_score(score, state):
    evaluation = judge(score, 0.15)
    assert evaluation.state == state
    assert (evaluation.reason is None) == (state != "UNDEFINED")


def test_a_reason_makes_the_result_undefined_whatever_the_score():
    assert judge(0.01, 0.15, undefined="stale frame") == Evaluation(state="UNDEFINED", reason="stale frame")


def _verdict() -> Verdict:
    return Verdict(
        seq=1,
        result_id="0b6f1a52-1d7e-4c3e-9a57-3f0c2a6f5e11",
        part_id="cam:0",
        trigger_id=None,
        station=StationName(site="s", line="l", station="c"),
        captured_at="2026-11-23T11:57:22.413Z",
        published_at="2026-11-23T11:57:22.420Z",
        evaluation=judge(0.3, 0.15),
        score=0.3,
        threshold=ThresholdUsed(value=0.15, source="bundle"),
        model=ModelUsed(name="m", kind="anogan", sha256="a" * 64, precision="fp32"),
        processing_ms=Timings(capture_age=1.23456, preprocess=0.5, inference=2.0, overlay=None, total=4.0004),
        heatmap_peak=None,
        image_path=None,
    )


def test_the_wire_text_keeps_the_documented_key_order_and_rounds_timings_to_the_microsecond():
    payload = json.loads(_verdict().json_text())
    assert list(payload) == [
        "schema",
        "seq",
        "result_id",
        "part_id",
        "trigger_id",
        "station",
        "captured_at",
        "published_at",
        "evaluation",
        "score",
        "threshold",
        "model",
        "processing_ms",
        "heatmap_peak",
        "image_path",
        "replayed",
    ]
    assert payload["schema"] == "ganspect.verdict/1" and payload["replayed"] is False
    assert payload["processing_ms"] == {
        "capture_age": 1.235,
        "preprocess": 0.5,
        "inference": 2.0,
        "overlay": None,
        "total": 4.0,
    }


def test_an_unstored_verdict_is_undefined_and_keeps_its_judgement_in_the_reason():
    unstored = _verdict().unstored()
    assert unstored.evaluation.state == "UNDEFINED" and "judged NG" in (unstored.evaluation.reason or "")
    assert unstored.score == 0.3


def test_a_stored_verdict_is_stamped_at_each_send():
    sent = json.loads(stamped_for_sending(_verdict().json_text(), replayed=True))
    assert sent["replayed"] is True and sent["published_at"] != "2026-11-23T11:57:22.420Z"
