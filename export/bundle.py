"""Turn a trained run folder into a model bundle: `model.onnx` + `manifest.json`.

The bundle is assembled in a temporary sibling folder and renamed into place only after
the ONNX graph has passed the parity check against PyTorch, so a failed export leaves
nothing half-written. An existing bundle at the destination is replaced; any other
non-empty folder is refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from ganspect.edge.errors import GanspectError
from ganspect.edge.manifest import (
    MANIFEST_NAME,
    HeatmapSpec,
    InputSpec,
    Manifest,
    Normalisation,
    ScoreSpec,
    ThresholdSpec,
    TrainingData,
    describe_file,
    write_manifest,
    utc_now,
)

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
SCORE_FORMULA = (
    "A(x) = (1 - lambda) * L_R + lambda * L_D with lambda = {lam:g}; x = image / 127.5 - 1; "
    "r = mean over channels of |x - G(E(x))|; L_R = {residual}; "
    "L_D = mean |f_D(x, E(x)) - f_D(G(E(x)), E(x))| (feature matching)"
)
RESIDUAL_FORMULA = {"mean": "mean of r over H, W", "peak": "max over H, W of Gaussian-smoothed r"}


def _ganspect_version() -> str:
    try:
        return version("ganspect")
    except PackageNotFoundError:
        return "unknown"


def _parity_images(run_info: dict[str, Any], size: int, channels: int, holdout: float, seed: int) -> np.ndarray:
    """The run's held-out normal images when its data set is still there, else seeded random pixels."""
    from ganspect.train.data import load_normal_images, split_holdout

    source = Path(run_info["source"])
    if source.exists():
        images = load_normal_images(source, size, channels)
        _, held = split_holdout(images, holdout, seed)
        if len(held.images):
            return np.ascontiguousarray(held.images)
    log.warning("training data %s is gone: checking ONNX parity on random images instead", source)
    return np.random.default_rng(seed).integers(0, 256, (16, size, size, channels), dtype=np.uint8)


def _scalar_metrics(run: Path) -> dict[str, float | None]:
    path = run / "metrics.json"
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text(encoding="utf-8"))
    return {k: (float(v) if v is not None else None) for k, v in raw.items()
            if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))}


def _prepare_destination(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise GanspectError(f"--out {out} is a file; give a folder for the bundle")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise GanspectError(f"--out {out} is a non-empty folder that is not a model bundle; refusing to overwrite it")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Replace `out` with `tmp`; the old bundle is removed only after the new one is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_run(run: Path, out: Path) -> Path:
    """Export the run's calibrated model to ONNX, verify parity, write the bundle; return its folder."""
    from ganspect.export.onnx_export import check_parity, export_onnx, opset_of
    from ganspect.train.loop import load_run_model, read_run_config, read_run_info

    run, out = Path(run), Path(out)
    _prepare_destination(out)
    config = read_run_config(run)
    info = read_run_info(run)
    model, ckpt = load_run_model(run)
    if not ckpt.get("calibrated"):
        raise GanspectError(f"{run}: training did not finish (not calibrated); resume it before exporting")
    cfg = model.cfg
    images = _parity_images(info, cfg.image_size, cfg.channels, config.data.holdout, config.train.seed)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        onnx_path = export_onnx(model, tmp / MODEL_FILE, cfg.image_size, cfg.channels)
        parity = check_parity(model, onnx_path, images)
        if not parity.ok:
            raise GanspectError(
                f"ONNX and PyTorch disagree on {parity.n_images} held-out images (max score difference "
                f"{parity.max_abs_score_diff:.3g}, heatmap {parity.max_abs_heatmap_diff:.3g}); bundle not written")
        log.info("ONNX opset %d; parity on %d images: max |score diff| %.2e, max |heatmap diff| %.2e",
                 opset_of(onnx_path), parity.n_images, parity.max_abs_score_diff, parity.max_abs_heatmap_diff)
        cal = json.loads((run / "calibration.json").read_text(encoding="utf-8"))
        metrics = _scalar_metrics(run)
        metrics.update({"parity_max_abs_score_diff": parity.max_abs_score_diff,
                        "parity_max_abs_heatmap_diff": parity.max_abs_heatmap_diff})
        manifest = Manifest(
            format_version=1,
            name=f"efficient_gan-{run.resolve().name}",
            kind="efficient_gan",
            created_at=utc_now(),
            ganspect_version=_ganspect_version(),
            input=InputSpec(height=cfg.image_size, width=cfg.image_size, channels=cfg.channels,
                            colour_order="GRAY" if cfg.channels == 1 else "BGR", resize_interpolation="area"),
            normalisation=Normalisation(scale=1 / 127.5, offset=-1.0),
            score=ScoreSpec(
                formula=SCORE_FORMULA.format(lam=cfg.lambda_, residual=RESIDUAL_FORMULA[cfg.residual_reduction]),
                lambda_=cfg.lambda_, discrimination="feature_matching", residual_reduction=cfg.residual_reduction),
            threshold=ThresholdSpec(value=float(model.threshold), method=cal.get("method", "normal_quantile"),
                                    nu=cal.get("nu"), n_images=int(cal.get("n_images", 0))),
            heatmap=HeatmapSpec(scale=float(model.heatmap_scale), smoothing_sigma=cfg.heatmap_sigma),
            training_data=TrainingData(source=str(info["source"]), n_train=int(info["n_train"]),
                                       n_val=int(info["n_val"])),
            metrics=metrics,
            files=[describe_file(tmp, MODEL_FILE, "fp32")],
        )
        write_manifest(tmp, manifest)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
