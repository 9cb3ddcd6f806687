"""Export: ONNX graph vs PyTorch through real onnxruntime, and the bundle on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ganspect.edge.cli import main
from ganspect.edge.errors import GanspectError
from ganspect.edge.manifest import load_bundle
from ganspect.export.bundle import export_run
from ganspect.export.graph import inference_copy
from ganspect.export.onnx_export import check_parity, export_onnx, opset_of
from ganspect.train.data import load_normal_images, split_holdout
from ganspect.train.loop import load_run_model
from ganspect.train.models.efficient_gan import EfficientGANConfig, build_model


def test_bundle_loads_and_onnxruntime_matches_pytorch(run: Path, data: Path, tmp_path: Path) -> None:
    bundle_dir = export_run(run, tmp_path / "bundle", latency_budget_s=0.05)
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    assert (m.kind, m.input.height, m.input.channels, m.input.colour_order) == ("efficient_gan", 32, 3, "BGR")
    calibration = json.loads((run / "calibration.json").read_text(encoding="utf-8"))
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert m.model_file("fp32").threshold == pytest.approx(calibration["threshold"])
    assert [f.path for f in m.files] == ["model.onnx"]  # no INT8 unless asked
    assert m.threshold.method == "normal_quantile" and m.threshold.n_images == calibration["n_images"]
    assert m.heatmap.scale == pytest.approx(calibration["heatmap_scale"])
    assert m.metrics["image_auroc"] == pytest.approx(metrics["image_auroc"])
    assert m.score.lambda_ == pytest.approx(0.1) and "0.1" in m.score.formula
    assert (m.training_data.n_train, m.training_data.n_val) == (17, 3)
    assert opset_of(bundle.path_of(m.model_file("fp32"))) >= 17
    # The golden set carries the verdicts the threshold must give (the edge checks them at load): held-out
    # normals OK, test anomalies NG, where the threshold judges them so with a margin; the others carry none.
    fp32 = m.model_file("fp32")
    assert len(m.golden) == 4 and [g.expect for g in m.golden[:2]] == ["OK", "OK"]
    assert all(g.expect in ("NG", None) for g in m.golden[2:]) and all(
        g.origin.startswith("test anomaly") for g in m.golden[2:]
    )
    for g, score in zip(m.golden, fp32.golden.scores):
        if g.expect is not None:
            assert (score > fp32.threshold) == (g.expect == "NG")
        else:  # unlabelled only where the threshold does not judge it NG with a margin
            assert score <= fp32.threshold + 1e-4 + 1e-3 * abs(score)
    assert m.metrics["threshold"] == pytest.approx(fp32.threshold, rel=1e-6)

    # Run the bundle's graph directly, at batch sizes 1 and 3 (dynamic batch axis).
    _, held = split_holdout(load_normal_images(data, 32, 3), 0.15, 0)
    session = ort.InferenceSession(str(bundle.path_of(m.model_file())), providers=["CPUExecutionProvider"])
    model, _ = load_run_model(run)
    for n in (1, 3):
        batch = held.images[:n]
        score, heatmap, peak = session.run(["score", "heatmap", "peak"], {"image": batch})
        assert score.shape == (n,) and heatmap.shape == (n, 32, 32) and peak.shape == (n, 2)
        assert peak.dtype == np.int64
        with torch.no_grad():
            t_score, t_heatmap = model(torch.from_numpy(batch))
        np.testing.assert_allclose(score, t_score.numpy(), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(heatmap, t_heatmap.numpy(), rtol=1e-3, atol=1e-3)
        # The graph's peak is numpy's argmax rule on its own heatmap: (row, column) of the first maximum.
        expected = np.stack(np.unravel_index(heatmap.reshape(n, -1).argmax(axis=1), (32, 32)), axis=1)
        np.testing.assert_array_equal(peak, expected)
    # The generator's transposed convolutions became plain ones (onnxruntime quantizes only those).
    ops = {node.op_type for node in onnx.load(str(bundle.path_of(m.model_file()))).graph.node}
    assert "ConvTranspose" not in ops and "Conv" in ops


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_inference_copy_rewrites_transposed_convolutions_without_changing_a_number(norm: str) -> None:
    torch.manual_seed(5)
    model = build_model(EfficientGANConfig(image_size=32, channels=3, latent_dim=8, base_width=4, norm=norm))
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.normal_()  # statistics far from the initial 0 / 1, so a wrong fold would show
        bn.running_var.uniform_(0.3, 3.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    model.eval()
    copy = inference_copy(model)
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in copy.modules())
    z = torch.randn(4, 8)
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(copy.generator(z), model.generator(z), rtol=1e-5, atol=1e-5)
        for got, want in zip(copy(images), model(images)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_inference_copy_merges_the_heads_skips_before_upsampling_without_changing_a_number() -> None:
    torch.manual_seed(6)
    cfg = EfficientGANConfig(
        image_size=32,
        channels=1,
        latent="spatial",
        latent_stride=8,
        latent_dim=4,
        base_width=4,
        segmentation_head=True,
        head_width=4,
        scoring="segmentation",
    )
    model = build_model(cfg).eval()
    copy = inference_copy(model)
    # No 1x1 convolution of the copy's head reads a concatenation any more: each merge is two convolutions.
    merges = [m for m in copy.segmentation_head.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)]
    assert len(merges) == 6 and {m.out_channels for m in merges} == {4 * cfg.head_width, 2 * cfg.head_width, 1}
    x, recon = torch.randn(3, 1, 32, 32), torch.randn(3, 1, 32, 32)
    images = torch.randint(0, 256, (3, 32, 32, 1), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(
            copy.segmentation_head(x, recon), model.segmentation_head(x, recon), rtol=1e-5, atol=1e-5
        )
        for got, want in zip(copy(images), model(images)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_metrics_measured_at_another_threshold_are_not_exported(run: Path, tmp_path: Path) -> None:
    # A run calibrated again after its evaluation: the edge would refuse the bundle, so export refuses first.
    import shutil

    stale = tmp_path / "run"
    shutil.copytree(run, stale)
    metrics = json.loads((stale / "metrics.json").read_text(encoding="utf-8"))
    metrics["threshold"] *= 2
    (stale / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    with pytest.raises(GanspectError, match=r"metrics.json was measured at the threshold .* run `ganspect eval"):
        export_run(stale, tmp_path / "bundle", latency_budget_s=0.05)
    assert not (tmp_path / "bundle").exists()


def test_bundle_destination_rules(run: Path, tmp_path: Path) -> None:
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(GanspectError, match="not a model bundle"):
        export_run(run, other, latency_budget_s=0.05)
    assert [p.name for p in other.iterdir()] == ["keep.txt"]

    bundle = tmp_path / "bundle"
    export_run(run, bundle, latency_budget_s=0.05)
    first = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))["created_at"]
    export_run(run, bundle, latency_budget_s=0.05)  # replacing a previous bundle is allowed
    assert json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))["created_at"] >= first
    load_bundle(bundle)
    # Nothing half-written or left over beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "notes"]


def test_parity_check_catches_a_different_graph(tmp_path: Path) -> None:
    cfg = EfficientGANConfig(image_size=32, channels=1, latent_dim=8, base_width=8)
    torch.manual_seed(0)
    a = build_model(cfg).eval()
    torch.manual_seed(1)
    b = build_model(cfg).eval()
    path = export_onnx(a, tmp_path / "a.onnx", 32, 1)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 1), dtype=np.uint8)
    assert check_parity(a, path, images).ok
    report = check_parity(b, path, images)
    assert not report.ok and report.max_abs_score_diff > 1e-3


def test_export_command(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(run), "--out", str(tmp_path / "b")]) == 0
    assert "bundle written" in capsys.readouterr().out
    assert (tmp_path / "b" / "export_report.md").is_file()
    load_bundle(tmp_path / "b")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("", encoding="utf-8")
    assert main(["export", str(run), "--out", str(tmp_path / "x")]) == 2
    assert "not a model bundle" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(tmp_path / "c"), "--force"]) == 2
    assert "--force only applies to --int8" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_export_sign_makes_a_bundle_that_only_its_key_vouches_for(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from ganspect.edge.errors import BundleError

    def keypair(name: str) -> tuple[Path, Path]:
        # The PEM files `openssl genpkey -algorithm ed25519` and `openssl pkey -pubout` write (docs/security.md).
        private_key = Ed25519PrivateKey.generate()
        private, public = tmp_path / f"{name}.key", tmp_path / f"{name}.pub"
        private.write_bytes(
            private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        public.write_bytes(
            private_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return private, public

    (key, public), (_, other) = keypair("workstation"), keypair("other")
    assert main(["export", str(run), "--out", str(tmp_path / "b"), "--sign", str(key)]) == 0
    assert f"signed with the key in {key}" in capsys.readouterr().out
    signature = json.loads((tmp_path / "b" / "signature.json").read_text(encoding="utf-8"))
    assert (signature["algorithm"], signature["signed_file"]) == ("Ed25519", "manifest.json")
    load_bundle(tmp_path / "b", trusted_keys=[public])
    load_bundle(tmp_path / "b", trusted_keys=[other, public])
    with pytest.raises(BundleError, match="which this station does not trust"):
        load_bundle(tmp_path / "b", trusted_keys=[other])
    # A public key is no signing key: refused before any work, nothing written.
    assert main(["export", str(run), "--out", str(tmp_path / "c"), "--sign", str(public)]) == 2
    assert "is not a PEM private key" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


class _PixelsAsHeatmap(torch.nn.Module):
    """Scoring module whose heatmap is the image itself, so the test can place ties exactly."""

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heatmap = image[..., 0].to(torch.float32)  # (N, H, W)
        return heatmap.mean(dim=(1, 2)), heatmap


def test_graph_peak_is_the_first_maximum_in_row_major_order(tmp_path: Path) -> None:
    images = np.random.default_rng(3).integers(0, 200, (6, 32, 32, 1), dtype=np.uint8)
    images[1, 5, 30] = images[1, 9, 2] = images[1, 5, 31] = 255  # ties: first row wins, then first column
    images[2, 31, 0] = images[2, 31, 31] = 250
    images[3] = 7  # all equal: (0, 0)
    path = export_onnx(_PixelsAsHeatmap(), tmp_path / "pixels.onnx", 32, 1)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (peak,) = session.run(["peak"], {"image": images})
    expected = np.stack(np.unravel_index(images[..., 0].reshape(6, -1).argmax(axis=1), (32, 32)), axis=1)
    np.testing.assert_array_equal(peak, expected)
    assert peak[1].tolist() == [5, 30] and peak[2].tolist() == [31, 0] and peak[3].tolist() == [0, 0]
