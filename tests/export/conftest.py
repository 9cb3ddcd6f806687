"""A tiny trained Efficient GAN run (32x32 colour, a few steps) shared by the export tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from ganspect.train.config import config_from_dict
from ganspect.train.evaluate import evaluate_run
from ganspect.train.loop import train
from ganspect.train.synth import synthesize_dataset


@pytest.fixture(scope="package")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parts") / "parts32"
    synthesize_dataset(root, size=32, n_train=20, n_test_good=4, n_test_bad=4, seed=2)
    return root


@pytest.fixture(scope="package")
def run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = config_from_dict(
        {
            "model": {"image_size": 32, "channels": 3, "latent_dim": 8, "base_width": 8},
            "train": {"steps": 4, "batch_size": 8, "threads": 2},
        }
    )
    out = train(config, data=data, out=tmp_path_factory.mktemp("runs") / "run")
    evaluate_run(out, data=None)
    return out
