"""Export then run for each model kind, on grayscale tiny models: the export is generic over the run's
scoring module (`ganspect.train.loop.load_run_model`).

AnoGAN (with its one-pass encoder) comes from the trainer's branch; until a checkout's
training config knows `model.kind: anogan`, that case is skipped and says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ganspect.edge.config import InspectionConfig
from ganspect.edge.inspector import Inspector
from ganspect.edge.manifest import load_bundle
from ganspect.edge.scorer import Scorer
from ganspect.export.bundle import export_run
from ganspect.export.onnx_export import compare, run_onnx, run_torch
from ganspect.train.config import config_from_dict
from ganspect.train.data import load_normal_images
from ganspect.train.loop import load_run_model, train

TINY: dict[str, dict[str, Any]] = {
    "efficient_gan": {
        "model": {"kind": "efficient_gan", "image_size": 32, "channels": 1, "latent_dim": 8, "base_width": 8},
        "train": {"steps": 4, "batch_size": 8, "threads": 2},
    },
    "anogan": {
        "model": {"kind": "anogan", "image_size": 32, "channels": 1, "latent_dim": 8, "base_width": 8},
        "train": {"steps": 4, "batch_size": 8, "threads": 2},
        "anogan": {"encoder_steps": 6, "search_steps": 3},
    },
}


@pytest.mark.parametrize("kind", list(TINY))
def test_export_then_run_grayscale(kind: str, data: Path, tmp_path: Path) -> None:
    config = config_from_dict(TINY[kind])
    run = train(config, data=data, out=tmp_path / "run")
    bundle_dir = export_run(run, tmp_path / "bundle", int8=True, latency_budget_s=0.05)

    m = load_bundle(bundle_dir).manifest
    assert (m.kind, m.input.channels, m.input.colour_order) == (kind, 1, "GRAY")
    assert m.metrics["int8_guard_passed"] == 1.0
    images = np.ascontiguousarray(load_normal_images(data, 32, 1).images)
    model, _ = load_run_model(run)
    reference = run_torch(model, images)
    assert compare(reference, run_onnx(bundle_dir / "model.onnx", images)).ok
    for precision in ("fp32", "int8"):
        scorer = Scorer.load(bundle_dir, precision=precision, intra_op_threads=1)  # golden self-test included
        frame = images[0][:, :, 0]  # a grayscale frame straight from the data set
        result = Inspector(InspectionConfig()).inspect(frame, scorer, scorer.threshold).score
        assert result.heatmap.shape == (32, 32) and scorer.threshold == scorer.model_file.threshold
