"""AnoGAN: the one-pass forward contract, lambda semantics, latent search, encoder training, export parity."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ganspect.train import loop
from ganspect.train.calibrate import score_images
from ganspect.train.config import config_from_dict
from ganspect.train.models.anogan import AnoGAN, AnoGANConfig, build_anogan, load_anogan
from ganspect.train.synth import synthesize_dataset


def tiny(**kw: object) -> AnoGAN:
    torch.manual_seed(0)
    cfg = AnoGANConfig(**{"image_size": 32, "channels": 1, "latent_dim": 8, "base_width": 8, **kw})
    return build_anogan(cfg).eval()


def images(n: int, size: int, channels: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, channels), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize(("size", "channels"), [(32, 1), (32, 3), (64, 3)])
def test_forward_is_the_edge_contract(size: int, channels: int) -> None:
    model = tiny(image_size=size, channels=channels)
    with torch.no_grad():
        score, heatmap = model(images(3, size, channels))
    assert score.shape == (3,) and score.dtype == torch.float32
    assert heatmap.shape == (3, size, size) and (heatmap >= 0).all()
    # The calibration buffers the export path relies on.
    assert {"threshold", "heatmap_scale"} <= {name for name, _ in model.named_buffers()}


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_lambda_zero_is_the_residual_and_one_the_feature_distance(lam: float) -> None:
    model = tiny(lambda_=lam, residual_reduction="mean")
    batch = images(4, 32, 1)
    with torch.no_grad():
        score, _ = model(batch)
        x = batch.float().permute(0, 3, 1, 2) / 127.5 - 1
        recon = model.generator(model.encoder(x))
        l_r = (x - recon).abs().mean(dim=(1, 2, 3))
        l_d = (model.discriminator.trunk(x).flatten(1) - model.discriminator.trunk(recon).flatten(1)).abs().mean(1)
    assert not torch.allclose(l_r, l_d)
    torch.testing.assert_close(score, l_r if lam == 0.0 else l_d)


def test_latent_search_lowers_each_images_loss_and_images_do_not_interact() -> None:
    model = tiny()
    x = model.normalise(images(3, 32, 1))
    z0 = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    result = model.search(x, steps=30, lr=0.05, z_init=z0)
    history = result.loss_history  # (31, 3)
    assert history.shape == (31, 3)
    assert (history[-1] < history[0]).all()
    # Search of image 1 alone from the same start finds the same z: no coupling through the batch.
    alone = model.search(x[1:2], steps=30, lr=0.05, z_init=z0[1:2])
    torch.testing.assert_close(alone.z[0], result.z[1], rtol=1e-4, atol=1e-5)
    # The parts describe G(z) of the found z, and the weights were not touched.
    with torch.no_grad():
        torch.testing.assert_close(result.parts.recon, model.generator(result.z))
    assert all(p.grad is None for p in model.parameters())


def test_search_scoring_through_score_images_is_seeded() -> None:
    model = tiny()
    batch = images(4, 32, 1).numpy()
    a = score_images(model, batch, scoring="search", search_steps=5, seed=3)
    b = score_images(model, batch, scoring="search", search_steps=5, seed=3)
    np.testing.assert_array_equal(a.score, b.score)
    one_pass = score_images(model, batch)
    assert not np.allclose(a.score, one_pass.score)


TINY_ANOGAN = {
    "model": {"kind": "anogan", "image_size": 32, "channels": 1, "latent_dim": 8, "base_width": 8},
    "train": {"steps": 6, "batch_size": 8, "checkpoint_every": 3, "log_every": 2, "threads": 2},
    "anogan": {"encoder_steps": 6, "search_steps": 3},
    "data": {"holdout": 0.25},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parts") / "parts32"
    synthesize_dataset(root, size=32, n_train=24, n_test_good=4, n_test_bad=4, seed=0)
    return root


def test_training_runs_both_phases_and_the_encoder_phase_leaves_g_and_d_alone(data: Path, tmp_path: Path) -> None:
    config = config_from_dict(json.loads(json.dumps(TINY_ANOGAN)))
    run = loop.train(config, data=data, out=tmp_path / "run")
    rows = list(csv.DictReader(open(run / "losses.csv", encoding="utf-8")))
    assert [(int(r["step"]), r["phase"]) for r in rows] == [
        (2, "gan"),
        (4, "gan"),
        (6, "gan"),
        (8, "encoder"),
        (10, "encoder"),
        (12, "encoder"),
    ]
    assert all(r["loss_recon"] and r["loss_feature"] for r in rows if r["phase"] == "encoder")

    # Resume the finished GAN phase with more encoder steps: G and D must not move, E must.
    before = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    more = json.loads(json.dumps(TINY_ANOGAN))
    more["anogan"]["encoder_steps"] = 10
    loop.train(config_from_dict(more), data=data, out=run, resume=True)
    after = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert after["step"] == 16 and after["kind"] == "anogan"
    for key, value in before["model"].items():
        if key.startswith(("generator.", "discriminator.")) and "running" not in key and "num_batches" not in key:
            torch.testing.assert_close(after["model"][key], value, msg=key)
    assert any(
        not torch.equal(after["model"][k], before["model"][k])
        for k in before["model"]
        if k.startswith("encoder.") and before["model"][k].is_floating_point()
    )

    model, ckpt = loop.load_run_model(run)
    assert isinstance(model, AnoGAN) and ckpt["calibrated"]
    batch = images(2, 32, 1)
    with torch.no_grad():
        score, heatmap = model(batch)
    assert score.shape == (2,) and heatmap.shape == (2, 32, 32)
    assert torch.isfinite(model.threshold) and model.heatmap_scale > 0


def test_anogan_one_pass_model_exports_with_onnx_parity(data: Path, tmp_path: Path) -> None:
    from ganspect.export.onnx_export import check_parity, export_onnx

    config = config_from_dict(json.loads(json.dumps(TINY_ANOGAN)))
    run = loop.train(config, data=data, out=tmp_path / "run")
    model, _ = loop.load_run_model(run)
    path = export_onnx(model, tmp_path / "anogan.onnx", 32, 1)
    parity = check_parity(model, path, images(5, 32, 1, seed=4).numpy())
    assert parity.ok, parity.to_dict()


def test_checkpoint_round_trip() -> None:
    model = tiny(channels=3)
    model.threshold.fill_(0.25)
    restored = load_anogan({"model_config": model.cfg.to_dict(), "model": model.state_dict()}).eval()
    batch = images(2, 32, 3)
    with torch.no_grad():
        for a, b in zip(model(batch), restored(batch)):
            torch.testing.assert_close(a, b)
    assert restored.threshold.item() == pytest.approx(0.25)


def test_anogan_refuses_cross_entropy() -> None:
    with pytest.raises(ValueError, match="feature matching"):
        AnoGANConfig(discrimination="cross_entropy")
    with pytest.raises(Exception, match="feature_matching only"):
        config_from_dict({"model": {"kind": "anogan", "discrimination": "cross_entropy"}})
