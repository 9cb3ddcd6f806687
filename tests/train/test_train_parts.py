"""Trainer parts: EMA, augmentation, data warnings, thresholds, validation-based selection."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from ganspect.train import loop
from ganspect.train.calibrate import choose_threshold
from ganspect.train.config import AugmentSection, config_from_dict
from ganspect.train.synth import synthesize_dataset

TINY = {
    "model": {"image_size": 32, "channels": 1, "latent_dim": 8, "base_width": 8},
    "train": {"steps": 6, "batch_size": 8, "checkpoint_every": 3, "log_every": 2, "threads": 2},
    "data": {"holdout": 0.25},
}


def tiny_config(**sections: dict[str, object]) -> object:
    raw = json.loads(json.dumps(TINY))
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parts") / "parts32"
    synthesize_dataset(root, size=32, n_train=24, n_test_good=4, n_test_bad=4, seed=0)
    return root


def test_ema_follows_the_weights_with_a_warming_decay() -> None:
    net = torch.nn.Linear(2, 1)
    ema = loop.EMA(net, decay=0.999)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    # First update: decay min(0.999, 2 / 11); the average moves 9/11 of the way.
    torch.testing.assert_close(ema.model.weight, start + 9 / 11)
    for _ in range(10000):
        ema.update(net)
    torch.testing.assert_close(ema.model.weight, net.weight, atol=1e-4, rtol=0)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_ema_weights_score_and_live_weights_resume(data: Path, tmp_path: Path) -> None:
    run = loop.train(tiny_config(), data=data, out=tmp_path / "ema")
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    key = "encoder.net.0.weight"
    assert not torch.equal(ckpt["model"][key], ckpt["live"][key])
    model, _ = loop.load_run_model(run)
    torch.testing.assert_close(model.state_dict()[key], ckpt["model"][key])

    plain = loop.train(tiny_config(train={"ema_decay": 0.0}), data=data, out=tmp_path / "plain")
    ckpt = torch.load(plain / "checkpoints" / "last.pt", weights_only=True)
    torch.testing.assert_close(ckpt["model"][key], ckpt["live"][key])


def test_augmentation_off_is_the_identity_and_on_keeps_range_and_shape() -> None:
    torch.manual_seed(0)
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    off = AugmentSection(shift=0, brightness=0.0)
    torch.testing.assert_close(loop.augment(x, off), x)
    on = AugmentSection(hflip=True, vflip=True, shift=3, rotation=10.0, brightness=0.2, contrast=0.2)
    y = loop.augment(x, on)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert not torch.allclose(y, x)
    # A pure 90-degree-free shift of whole pixels moves content: a bright dot moves by at most `shift`.
    dot = -torch.ones(1, 1, 32, 32)
    dot[0, 0, 16, 16] = 1.0
    moved = loop.augment(dot, AugmentSection(shift=3, brightness=0.0))
    peak = divmod(int(moved[0, 0].argmax()), 32)
    assert abs(peak[0] - 16) <= 3 and abs(peak[1] - 16) <= 3


def test_data_warnings_name_the_problem() -> None:
    few = loop.data_warnings(n_train=20, n_val=50, image_size=128, nu=0.05, threshold="normal_quantile")
    assert len(few) == 1 and "only 20 normal training images at 128x128" in few[0]
    scarce_val = loop.data_warnings(n_train=500, n_val=30, image_size=64, nu=0.01, threshold="normal_quantile")
    assert len(scarce_val) == 1 and "30 held-out normals x nu 0.01 = 0.3 < 1" in scarce_val[0]
    assert "at least 100 normals" in scarce_val[0]
    assert loop.data_warnings(n_train=500, n_val=100, image_size=64, nu=0.01, threshold="normal_quantile") == []
    assert loop.data_warnings(n_train=500, n_val=30, image_size=64, nu=0.01, threshold="f1_optimal") == []


def test_training_logs_the_warnings_and_records_them(
    data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="ganspect.train.loop"):
        run = loop.train(tiny_config(train={"steps": 2}), data=data, out=tmp_path / "run")
    info = json.loads((run / "run.json").read_text())
    assert any("18 normal training images" in w for w in info["warnings"])
    assert any("held-out normals x nu" in w for w in info["warnings"])
    assert "held-out normals x nu" in caplog.text


def test_thresholds_by_hand() -> None:
    normal = np.array([0.1, 0.2, 0.3, 0.4])
    assert choose_threshold(normal, nu=0.25) == pytest.approx(np.quantile(normal, 0.75))
    # F1-optimal: calling 0.35 and above NG catches both anomalies and one normal -> F1 0.8;
    # calling only the anomalies NG (cut between 0.4 and 0.5) gives F1 1.0.
    anomalies = np.array([0.5, 0.9])
    assert choose_threshold(normal, 0.25, "f1_optimal", anomalies) == pytest.approx(0.45)
    with pytest.raises(ValueError, match="anomalous"):
        choose_threshold(normal, 0.25, "f1_optimal", None)


def test_f1_optimal_calibration_with_a_folder_of_anomalies(data: Path, tmp_path: Path) -> None:
    anomalies = data / "test" / "dent"
    config = tiny_config(train={"steps": 2}, calibration={"threshold": "f1_optimal", "anomalies": str(anomalies)})
    run = loop.train(config, data=data, out=tmp_path / "run")
    cal = json.loads((run / "calibration.json").read_text())
    assert cal["method"] == "f1_optimal" and cal["n_anomalies"] == len(list(anomalies.iterdir()))
    model, _ = loop.load_run_model(run)
    assert model.threshold.item() == pytest.approx(cal["threshold"])
    with pytest.raises(Exception, match="anomalies"):
        tiny_config(calibration={"threshold": "f1_optimal"})


def test_pseudo_defect_threshold_cuts_between_the_normals_and_their_painted_copies(data: Path, tmp_path: Path) -> None:
    config = tiny_config(calibration={"threshold": "pseudo_defects"})
    run = loop.train(config, data=data, out=tmp_path / "run")
    cal = json.loads((run / "calibration.json").read_text())
    assert cal["method"] == "pseudo_defects" and cal["n_anomalies"] == cal["n_images"] == 6
    model, _ = loop.load_run_model(run)
    assert model.threshold.item() == pytest.approx(cal["threshold"])
    # The same cut as choose_threshold finds on the scores of those painted copies.
    from ganspect.train.calibrate import PSEUDO_SEED, score_images
    from ganspect.train.data import held_out_images
    from ganspect.train.pseudo_defects import KINDS, paint_frames

    held = held_out_images(config, Path(json.loads((run / "run.json").read_text())["source"]))
    normal = score_images(model, held).score
    painted = score_images(model, paint_frames(held, 32, list(KINDS), PSEUDO_SEED)).score
    assert cal["threshold"] == pytest.approx(choose_threshold(normal, 0.01, "pseudo_defects", painted), rel=1e-5)


def test_keep_best_takes_the_weights_of_the_lowest_validation_loss(data: Path, tmp_path: Path) -> None:
    run = loop.train(
        tiny_config(train={"steps": 8, "validate_every": 2, "keep": "best"}), data=data, out=tmp_path / "run"
    )
    rows = list(csv.DictReader(open(run / "losses.csv", encoding="utf-8")))
    vals = {int(r["step"]): float(r["val_loss"]) for r in rows if r["val_loss"]}
    assert sorted(vals) == [2, 4, 6, 8]
    best_step = min(vals, key=vals.get)
    assert json.loads((run / "calibration.json").read_text())["kept_step"] == best_step
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    final = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert best["step"] == best_step
    key = "encoder.net.0.weight"
    torch.testing.assert_close(final["model"][key], best["model"][key])


def test_early_stopping_stops_after_patience_validations_without_improvement(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The validation loss of a few-step run goes either way; fix it to rise so that the rule is what is tested.
    losses = iter([0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    monkeypatch.setattr(loop._Trainer, "validation_loss", lambda self, *a: next(losses))
    run = loop.train(
        tiny_config(train={"steps": 20, "validate_every": 2, "early_stop_patience": 2}), data=data, out=tmp_path / "run"
    )
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["stopped_early"] is True and ckpt["calibrated"] is True


def test_validation_settings_need_validation() -> None:
    with pytest.raises(Exception, match="validate_every"):
        tiny_config(train={"keep": "best"})


def test_recalibration_sets_the_threshold_of_a_new_nu_without_training_again(data: Path, tmp_path: Path) -> None:
    from ganspect.edge.cli import main
    from ganspect.train.calibrate import score_images
    from ganspect.train.data import held_out_images

    run = loop.train(tiny_config(calibration={"nu": 0.01}), data=data, out=tmp_path / "run")
    weights_before = loop.load_run_model(run)[0].state_dict()
    kept_step = json.loads((run / "calibration.json").read_text())["kept_step"]

    assert main(["calibrate", str(run), "--set", "calibration.nu=0.2"]) == 0
    model, _ = loop.load_run_model(run)
    config = loop.read_run_config(run)
    held = held_out_images(config, data.resolve())
    expected = float(np.quantile(score_images(model, held).score.astype(np.float64), 0.8))
    assert model.threshold.item() == pytest.approx(expected, rel=1e-5)
    cal = json.loads((run / "calibration.json").read_text())
    assert (cal["nu"], cal["threshold"], cal["kept_step"]) == (0.2, pytest.approx(expected, rel=1e-5), kept_step)
    assert config.calibration.nu == 0.2  # the run's config says what its threshold means
    unchanged = {k: v for k, v in model.state_dict().items() if k not in ("threshold", "heatmap_scale")}
    assert all(torch.equal(v, weights_before[k]) for k, v in unchanged.items())


def test_recalibration_refuses_settings_that_need_training_and_leaves_the_run_alone(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ganspect.edge.cli import main

    run = loop.train(tiny_config(), data=data, out=tmp_path / "run")
    before = (run / "calibration.json").read_bytes(), (run / "checkpoints" / "last.pt").read_bytes()
    assert main(["calibrate", str(run), "--set", "train.steps=100"]) != 0
    assert "calibration.* settings only" in capsys.readouterr().err
    assert main(["calibrate", str(tmp_path / "nowhere")]) != 0
    assert "no checkpoint" in capsys.readouterr().err
    assert ((run / "calibration.json").read_bytes(), (run / "checkpoints" / "last.pt").read_bytes()) == before
