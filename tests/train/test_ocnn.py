"""OC-NN head (seed 004): the objective by hand, r as the nu-quantile, and the head inside a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ganspect.train import loop
from ganspect.train.config import config_from_dict
from ganspect.train.evaluate import evaluate_run
from ganspect.train.models.ocnn import OCNN, fit_ocnn, ocnn_loss
from ganspect.train.synth import synthesize_dataset


def test_objective_by_hand() -> None:
    model = OCNN(2, hidden=2, nu=0.5)
    with torch.no_grad():
        model.V.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        model.w.weight.copy_(torch.tensor([[3.0, -1.0]]))
    y = torch.tensor([0.0, 1.0, 2.0, 3.0])
    r = torch.tensor(1.5)
    # 1/2 (9 + 1) + 1/2 (1 + 4) + (1 / 0.5) * mean(1.5, 0.5, 0, 0) - 1.5 = 5 + 2.5 + 1 - 1.5
    assert ocnn_loss(model, y, r, 0.5).item() == pytest.approx(7.0)
    z = torch.tensor([[0.0, 0.0]])
    # sigmoid(0) = 0.5 for both hidden units: y = 0.5 * 3 - 0.5 = 1.0; score = r - y.
    model.r.fill_(1.5)
    assert model.output(z).item() == pytest.approx(1.0)
    assert model.score(z).item() == pytest.approx(0.5)


def test_fit_keeps_about_nu_outside_and_lowers_its_objective() -> None:
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(400, 4, generator=g)
    fit = fit_ocnn(codes, nu=0.1, hidden=16, steps=300, lr=0.01)
    # r is the nu-quantile of the training outputs after every update.
    assert fit.outside == pytest.approx(0.1, abs=0.02)
    assert fit.model.r.item() == pytest.approx(torch.quantile(fit.model.output(codes), 0.1).item(), abs=1e-5)
    assert fit.losses[-1] < fit.losses[0]
    # No claim that far-away codes score high: the boundary is a hyperplane in the hidden
    # features (see the module docstring), so only one side of the training codes is "outside".
    with pytest.raises(ValueError, match="nu"):
        fit_ocnn(codes, nu=0.0)


def test_ocnn_head_is_trained_with_the_run_and_reported_by_eval(tmp_path: Path) -> None:
    data = tmp_path / "parts32"
    synthesize_dataset(data, size=32, n_train=24, n_test_good=6, n_test_bad=6, seed=2)
    config = config_from_dict(
        {
            "model": {"image_size": 32, "channels": 1, "latent_dim": 8, "base_width": 8},
            "train": {"steps": 3, "batch_size": 8, "threads": 2},
            "ocnn": {"enabled": True, "nu": 0.2, "steps": 50},
        }
    )
    run = loop.train(config, data=data, out=tmp_path / "run")
    cal = json.loads((run / "calibration.json").read_text())
    assert cal["ocnn"]["nu"] == 0.2 and 0.0 < cal["ocnn"]["train_outside"] < 0.5
    _, ckpt = loop.load_run_model(run)
    assert loop.load_ocnn_head(ckpt) is not None
    metrics = evaluate_run(run, data=None, report=False)
    assert 0.0 <= metrics["ocnn"]["image_auroc"] <= 1.0
    assert 0.0 <= metrics["ocnn"]["combined_image_auroc"] <= 1.0
    assert "ocnn" in json.loads((run / "metrics.json").read_text())
