"""Training loop: run folder contents, weights_only checkpoints, resume, interrupt, calibration."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ganspect.edge.errors import GanspectError
from ganspect.train import loop
from ganspect.train.calibrate import normal_quantile_threshold, score_images
from ganspect.train.config import TrainConfig, config_from_dict
from ganspect.train.data import load_normal_images, split_holdout
from ganspect.train.synth import synthesize_dataset

TINY = {
    "model": {"image_size": 32, "channels": 1, "latent_dim": 8, "base_width": 8},
    "train": {"steps": 6, "batch_size": 8, "checkpoint_every": 3, "log_every": 2, "threads": 2},
    "data": {"holdout": 0.25},
}


def tiny_config(**train: object) -> TrainConfig:
    raw = json.loads(json.dumps(TINY))
    raw["train"].update(train)
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parts") / "parts32"
    synthesize_dataset(root, size=32, n_train=24, n_test_good=4, n_test_bad=4, seed=0)
    return root


def test_run_folder_and_checkpoint(data: Path, tmp_path: Path) -> None:
    run = loop.train(tiny_config(), data=data, out=tmp_path / "run")
    for name in ("config.yaml", "run.json", "losses.csv", "calibration.json", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["calibrated"] is True
    assert ckpt["model_config"]["image_size"] == 32
    assert {"opt_d", "opt_eg", "model", "train_config"} <= set(ckpt)
    assert ckpt["data"] == {"source": str(data.resolve()), "n_train": 18, "n_val": 6}
    # The resolved config reads back to the same config.
    assert loop.read_run_config(run) == tiny_config()
    rows = list(csv.DictReader(open(run / "losses.csv", encoding="utf-8")))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]


def test_calibration_is_the_normal_quantile_of_held_out_scores(data: Path, tmp_path: Path) -> None:
    run = loop.train(tiny_config(), data=data, out=tmp_path / "run")
    cal = json.loads((run / "calibration.json").read_text(encoding="utf-8"))
    assert cal["method"] == "normal_quantile" and cal["nu"] == 0.01 and cal["n_images"] == 6

    # Re-score the same held-out images independently and recompute both values.
    model, _ = loop.load_run_model(run)
    _, held = split_holdout(load_normal_images(data, 32, 1), 0.25, 0)
    scored = score_images(model, held.images)
    assert cal["threshold"] == pytest.approx(float(np.quantile(scored.score.astype(np.float64), 0.99)), rel=1e-5)
    assert cal["heatmap_scale"] == pytest.approx(float(scored.residual.max()), rel=1e-5)
    assert model.threshold.item() == pytest.approx(cal["threshold"], rel=1e-6)
    # Held-out heatmaps therefore peak at exactly 1.0.
    assert scored.heatmap.max() == pytest.approx(1.0, rel=1e-5)


def test_quantile_by_hand() -> None:
    scores = np.arange(1, 101, dtype=np.float64)  # 1 .. 100
    assert normal_quantile_threshold(scores, 0.01) == pytest.approx(99.01)
    assert normal_quantile_threshold(scores, 0.0) == pytest.approx(100.0)
    assert normal_quantile_threshold(np.array([3.0, 1.0, 2.0]), 0.5) == pytest.approx(2.0)


def test_resume_continues_the_step_count(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    loop.train(tiny_config(steps=4), data=data, out=out)
    with pytest.raises(GanspectError, match="--resume"):
        loop.train(tiny_config(steps=4), data=data, out=out)
    loop.train(tiny_config(steps=8), data=data, out=out, resume=True)
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 8
    rows = list(csv.DictReader(open(out / "losses.csv", encoding="utf-8")))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]
    with pytest.raises(GanspectError, match="model section"):
        other = config_from_dict({**json.loads(json.dumps(TINY)), "model": {**TINY["model"], "latent_dim": 4}})
        loop.train(other, data=data, out=out, resume=True)


def test_same_seed_same_weights(data: Path, tmp_path: Path) -> None:
    a = loop.train(tiny_config(steps=3), data=data, out=tmp_path / "a")
    b = loop.train(tiny_config(steps=3), data=data, out=tmp_path / "b")
    wa = torch.load(a / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(b / "checkpoints" / "last.pt", weights_only=True)["model"]
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], msg=key)


def test_interrupt_saves_a_checkpoint(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_step = loop._Trainer.train_step

    def step_then_interrupt(self: loop._Trainer, x: torch.Tensor) -> dict[str, float]:
        losses = real_step(self, x)
        if self.step == 5:  # as if Ctrl-C arrived during step 5's bookkeeping
            raise KeyboardInterrupt
        return losses

    monkeypatch.setattr(loop._Trainer, "train_step", step_then_interrupt)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        loop.train(tiny_config(steps=50, checkpoint_every=100), data=data, out=out)
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 5 and ckpt["calibrated"] is False


def test_sigterm_saves_a_checkpoint(data: Path, tmp_path: Path) -> None:
    """A real `ganspect train` subprocess stopped with SIGTERM, as kill or systemd would stop it."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    config = tmp_path / "tiny.yaml"
    raw = json.loads(json.dumps(TINY))
    raw["train"].update({"steps": 100000, "checkpoint_every": 100000})
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "ganspect.edge",
        "train",
        "--config",
        str(config),
        "--data",
        str(data),
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "losses.csv").is_file() or len((out / "losses.csv").read_text().splitlines()) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "checkpoint saved" in stderr and "Traceback" not in stderr
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] >= 4 and ckpt["calibrated"] is False
