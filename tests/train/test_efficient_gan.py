"""Efficient GAN model: shapes, the score formula, buffers, checkpoint round-trip."""

from __future__ import annotations

import io
import math

import cv2
import pytest
import torch

from ganspect.train.models.common import gaussian_kernel_1d
from ganspect.train.models.efficient_gan import EfficientGAN, EfficientGANConfig, build_model, load_model


def tiny(**kw: object) -> EfficientGAN:
    torch.manual_seed(0)
    cfg = EfficientGANConfig(**{"image_size": 32, "channels": 1, "latent_dim": 8, "base_width": 8, **kw})
    return build_model(cfg).eval()


def images(n: int, size: int, channels: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, channels), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize(("size", "channels"), [(32, 1), (32, 3), (64, 1), (64, 3)])
def test_forward_shapes(size: int, channels: int) -> None:
    model = tiny(image_size=size, channels=channels)
    with torch.no_grad():
        score, heatmap = model(images(3, size, channels))
    assert score.shape == (3,) and score.dtype == torch.float32
    assert heatmap.shape == (3, size, size) and heatmap.dtype == torch.float32
    assert torch.isfinite(score).all() and (heatmap >= 0).all()


def test_depth_scales_and_256_builds() -> None:
    model = tiny(image_size=256, channels=3)
    # 256 -> 4 takes 6 stride-2 convolutions in the encoder.
    strided = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == 6
    with torch.no_grad():
        recon = model.generator(torch.zeros(1, 8))
        score, heatmap = model(images(1, 256, 3))
    assert recon.shape == (1, 3, 256, 256)
    assert heatmap.shape == (1, 256, 256) and score.shape == (1,)


def test_invalid_config_is_refused() -> None:
    with pytest.raises(ValueError, match="power of two"):
        EfficientGANConfig(image_size=48)
    with pytest.raises(ValueError, match="channels"):
        EfficientGANConfig(channels=2)


def test_normalisation_is_x_over_127_5_minus_1() -> None:
    x = torch.tensor([[[[0], [255]], [[127], [128]]]], dtype=torch.uint8)  # (1, 2, 2, 1) NHWC
    out = EfficientGAN.normalise(x)
    assert out.shape == (1, 1, 2, 2)
    assert out.flatten().tolist() == pytest.approx([-1.0, 1.0, 127 / 127.5 - 1, 128 / 127.5 - 1], abs=1e-6)


def _smoothed_peak(per_pixel: torch.Tensor, sigma: float) -> torch.Tensor:
    """Max of each Gaussian-smoothed map, computed with OpenCV, independently of the model."""
    radius = max(1, math.ceil(3 * sigma))
    peaks = [
        cv2.GaussianBlur(m.numpy(), (2 * radius + 1, 2 * radius + 1), sigma, borderType=cv2.BORDER_REPLICATE).max()
        for m in per_pixel
    ]
    return torch.tensor(peaks)


@pytest.mark.parametrize("reduction", ["mean", "peak"])
@pytest.mark.parametrize("lam", [0.0, 1.0, 0.3])
def test_lambda_weights_residual_and_discrimination(lam: float, reduction: str) -> None:
    model = tiny(lambda_=lam, residual_reduction=reduction)
    batch = images(4, 32, 1)
    with torch.no_grad():
        score, _ = model(batch)
        # The two losses computed here directly from E, G and D's feature layer.
        x = batch.float().permute(0, 3, 1, 2) / 127.5 - 1
        z = model.encoder(x)
        recon = model.generator(z)
        per_pixel = (x - recon).abs().mean(dim=1)  # (N, H, W)
        l_r = per_pixel.mean(dim=(1, 2)) if reduction == "mean" else _smoothed_peak(per_pixel, model.cfg.heatmap_sigma)
        l_d = (model.discriminator.features(x, z) - model.discriminator.features(recon, z)).abs().mean(dim=1)
    assert not torch.allclose(l_r, l_d)
    torch.testing.assert_close(score, (1 - lam) * l_r + lam * l_d)


def test_peak_residual_singles_out_a_local_defect_that_the_mean_dilutes() -> None:
    per_pixel = torch.full((2, 32, 32), 0.05)
    per_pixel[0] += 0.01  # image 0: slightly worse everywhere
    per_pixel[1, 10:13, 10:13] = 0.8  # image 1: a small, strong local residual
    model = tiny()
    smoothed = model.smooth(per_pixel)
    assert per_pixel[0].mean() > per_pixel[1].mean()  # the mean ranks the defect-free image worse
    assert smoothed[1].amax() > 3 * smoothed[0].amax()  # the smoothed peak ranks the defect far worse


def test_residual_polarity_counts_only_the_side_of_the_reconstruction_it_names() -> None:
    recon = torch.zeros(1, 1, 32, 32)
    x = recon.clone()
    x[0, 0, 4:8, 4:8] = -0.6  # a dark spot: a crack or a dead area on an electroluminescence image
    x[0, 0, 20:24, 20:24] = 0.6  # a bright speck
    maps = {}
    for polarity in ("both", "darker", "brighter"):
        maps[polarity] = tiny(residual_polarity=polarity, heatmap_sigma=0.0).residual_terms(x, recon)[1][0]
    assert maps["both"][5, 5] == maps["both"][21, 21] == pytest.approx(0.6)
    assert maps["darker"][5, 5] == pytest.approx(0.6) and maps["darker"][21, 21] == 0
    assert maps["brighter"][21, 21] == pytest.approx(0.6) and maps["brighter"][5, 5] == 0
    with pytest.raises(ValueError, match="residual_polarity"):
        tiny(residual_polarity="up")


def test_heatmap_is_scaled_by_the_buffer_and_smoothing_keeps_constants() -> None:
    model = tiny()
    batch = images(2, 32, 1)
    with torch.no_grad():
        _, h1 = model(batch)
        model.heatmap_scale.fill_(4.0)
        _, h4 = model(batch)
    torch.testing.assert_close(h4 * 4.0, h1)
    k = gaussian_kernel_1d(2.0)
    assert k.sum().item() == pytest.approx(1.0) and len(k) == 13
    flat = torch.full((1, 32, 32), 0.25)
    torch.testing.assert_close(model.smooth(flat), flat)


def test_matrix_smoothing_equals_the_separable_convolution_with_replicated_borders() -> None:
    residual = torch.rand(3, 32, 32)
    residual[1, 0, 0] = 5.0  # a corner spike: border replication matters most there
    k = gaussian_kernel_1d(2.0)
    pad = len(k) // 2
    padded = torch.nn.functional.pad(residual.unsqueeze(1), (pad, pad, pad, pad), mode="replicate")
    reference = torch.nn.functional.conv2d(torch.nn.functional.conv2d(padded, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    torch.testing.assert_close(tiny().smooth(residual), reference.squeeze(1))


def test_checkpoint_round_trip_with_weights_only() -> None:
    model = tiny(channels=3)
    model.heatmap_scale.fill_(0.5)
    model.threshold.fill_(0.123)
    buf = io.BytesIO()
    torch.save({"model_config": model.cfg.to_dict(), "model": model.state_dict()}, buf)
    buf.seek(0)
    restored = load_model(torch.load(buf, weights_only=True)).eval()
    assert restored.cfg == model.cfg
    assert restored.threshold.item() == pytest.approx(0.123)
    batch = images(2, 32, 3)
    with torch.no_grad():
        for a, b in zip(model(batch), restored(batch)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_cross_entropy_discrimination_is_bce_of_d_against_real(lam: float) -> None:
    model = tiny(lambda_=lam, residual_reduction="mean", discrimination="cross_entropy")
    batch = images(4, 32, 1)
    with torch.no_grad():
        score, _ = model(batch)
        x = batch.float().permute(0, 3, 1, 2) / 127.5 - 1
        z = model.encoder(x)
        logit = model.discriminator.head(model.discriminator.features(x, z)).squeeze(1)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logit, torch.ones(4), reduction="none")
        l_r = (x - model.generator(z)).abs().mean(dim=(1, 2, 3))
    torch.testing.assert_close(score, l_r if lam == 0.0 else bce)


def test_unknown_discrimination_is_refused() -> None:
    with pytest.raises(ValueError, match="discrimination"):
        EfficientGANConfig(discrimination="wasserstein")
