"""`ganspect demo --quick` as a user runs it: a real subprocess, every stage real."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from ganspect.export.demo import QUICK, compare_with_truth


# The quick demo takes about two minutes on 2 idle cores; the generous limits are for a
# machine shared with other test runs, where it has been seen to take five.
@pytest.mark.timeout(1000)
def test_quick_demo_runs_every_stage_and_publishes_every_verdict(
    tmp_path, mosquitto_broker, mqtt_subscriber, ganspect_cli
):
    subscriber = mqtt_subscriber(mosquitto_broker.host, mosquitto_broker.port, "ganspect/#")
    workdir = tmp_path / "demo"

    proc = ganspect_cli(
        "demo",
        "--quick",
        "--headless",
        "--workdir",
        str(workdir),
        "--broker",
        f"{mosquitto_broker.host}:{mosquitto_broker.port}",
        timeout=900,
    )

    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("1/6 synthesize", "2/6 train", "3/6 evaluate", "4/6 export", "5/6 write", "6/6 run the edge"):
        assert stage in proc.stdout
    assert "== demo summary" in proc.stdout and "image AUROC" in proc.stdout
    assert f"{QUICK.n_parts}/{QUICK.n_parts} parts judged" in proc.stdout
    for made in (
        "data/train/good",
        "run/checkpoints/last.pt",
        "run/metrics.json",
        "bundle/model.onnx",
        "bundle/manifest.json",
        "conveyor.avi",
        "edge.yaml",
    ):
        assert (workdir / made).exists(), made
    logged = [json.loads(line) for line in (workdir / "verdicts.jsonl").read_text().splitlines()]
    assert len(logged) == QUICK.n_parts
    received = subscriber.wait_for("/verdict", QUICK.n_parts)
    assert sorted(json.loads(m.payload)["result_id"] for m in received) == sorted(v["result_id"] for v in logged)


@pytest.mark.timeout(1000)
def test_demo_says_clearly_when_no_broker_answers(tmp_path, unused_port, ganspect_cli):
    proc = ganspect_cli(
        "demo",
        "--quick",
        "--headless",
        "--workdir",
        str(tmp_path / "demo"),
        "--broker",
        f"127.0.0.1:{unused_port}",
        timeout=900,
    )

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"no MQTT broker answers at 127.0.0.1:{unused_port}" in proc.stdout
    assert len((tmp_path / "demo" / "verdicts.jsonl").read_text().splitlines()) == QUICK.n_parts


def test_demo_rejects_a_malformed_broker_address(tmp_path, ganspect_cli):
    proc = ganspect_cli("demo", "--quick", "--workdir", str(tmp_path), "--broker", "localhost")

    assert proc.returncode == 2
    assert "--broker must be HOST:PORT" in proc.stderr and "Traceback" not in proc.stderr


def test_compare_with_truth_counts_caught_and_rejected_parts():
    truth = [SimpleNamespace(frame_index=i, defect=d) for i, d in enumerate([None, "dent", None, "scratch", None])]
    verdicts = [
        {"part_id": f"conveyor:{i}", "evaluation": {"state": s, "reason": None}}
        for i, s in enumerate(["OK", "NG", "NG", "OK"])
    ]

    counts = compare_with_truth(verdicts, truth)

    assert counts == {"parts": 5, "judged": 4, "defective": 2, "caught": 1, "good": 2, "rejected": 1}
    # A part the model could not judge (UNDEFINED) does not ship: for a good part that is a rejection.
    undefined = {"part_id": "conveyor:4", "evaluation": {"state": "UNDEFINED", "reason": "non-finite score"}}
    counts = compare_with_truth([*verdicts, undefined], truth)
    assert counts == {"parts": 5, "judged": 5, "defective": 2, "caught": 1, "good": 3, "rejected": 2}
