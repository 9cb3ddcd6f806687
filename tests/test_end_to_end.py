"""The whole path once, with real parts: synthetic parts → a tiny Efficient GAN trained for a
few steps → ONNX bundle → the edge daemon as a subprocess on a conveyor video → a real
mosquitto on a free port → a real subscriber that receives one valid verdict per frame."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

import ganspect.edge
from ganspect.edge.manifest import load_bundle
from ganspect.export.bundle import export_run
from ganspect.train.config import config_from_dict
from ganspect.train.loop import train
from ganspect.train.synth import synthesize_dataset, write_conveyor_video

SCHEMA = json.loads((Path(ganspect.edge.__file__).parent / "schemas" / "verdict.schema.json").read_text())
N_PARTS = 8


@pytest.fixture(scope="module")
def tiny_trained_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    synthesize_dataset(root / "data", size=32, n_train=24, n_test_good=4, n_test_bad=4, seed=3)
    config = config_from_dict(
        {
            "model": {"image_size": 32, "channels": 3, "base_width": 8, "latent_dim": 16},
            "train": {"steps": 12, "batch_size": 8, "checkpoint_every": 12, "log_every": 4},
            "data": {"holdout": 0.25},
        },
        source="test",
    )
    train(config, data=root / "data", out=root / "run")
    return export_run(root / "run", root / "bundle")


def test_trained_model_runs_on_the_edge_and_every_frame_reaches_the_subscriber(
    tiny_trained_bundle, mosquitto_broker, mqtt_subscriber, make_edge_config, ganspect_cli, tmp_path
):
    bundle = load_bundle(tiny_trained_bundle)
    video = tmp_path / "conveyor.avi"
    parts = write_conveyor_video(video, n_parts=N_PARTS, defect_rate=0.25, seed=5)
    subscriber = mqtt_subscriber(mosquitto_broker.host, mosquitto_broker.port, "gstest/#")
    config = make_edge_config(tiny_trained_bundle, video, mosquitto_broker, source={"name": "conveyor"})

    proc = ganspect_cli("edge", "--config", str(config), "--headless")

    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    received = subscriber.wait_for("/verdict", N_PARTS)
    verdicts = [json.loads(message.payload) for message in received]
    assert len(verdicts) == N_PARTS
    for verdict in verdicts:
        jsonschema.validate(verdict, SCHEMA)
    assert [v["part_id"] for v in verdicts] == [f"conveyor:{p.frame_index}" for p in parts]
    assert {v["model"]["sha256"] for v in verdicts} == {bundle.manifest.model_file().sha256}
    assert {v["threshold"]["value"] for v in verdicts} == {bundle.manifest.model_file().threshold}
    assert all(v["evaluation"]["state"] == ("NG" if v["score"] > v["threshold"]["value"] else "OK") for v in verdicts)
