"""Score a trained per-pixel run, and variants of its scoring, on development data, never on a test split.

    .venv/bin/python benchmarks/dev_study.py --run RUN --dev benchmarks/runs/data/elpv_mono/dev

The normals are the run's own held-out training images, each scored leave-one-out (as
calibration scores them); the defects are the images under `--dev` (for ELPV the cells an
expert called "likely defective", which `prepare_elpv.py` keeps out of train and test).
It prints the AUROC of the dev defects against those normals for the run as trained and
for each way of turning its residual maps into a score: the residual's smoothing σ and
polarity, the spread's floor, a spatial smoothing of the per-pixel variance, the peak or
the mean of the hottest pixels. So a setting, or a training recipe, can be chosen
without the test set. With 56 ELPV dev defects and 66 normals, one AUROC's standard error
is about 0.04: compare recipes over seeds, not single runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score

from ganspect.train.calibrate import SPREAD_FLOOR
from ganspect.train.data import Framing, held_out_images, load_normal_images
from ganspect.train.loop import load_run_model, read_run_config, read_run_info
from ganspect.train.models.common import smoothing_matrix, weighted_score

POLARITIES = ("both", "darker", "brighter")  # model.residual_polarity


def raw_maps(model: Any, images: np.ndarray, sigma: float, polarity: str) -> tuple[np.ndarray, np.ndarray]:
    """(residual maps smoothed with `sigma` and counted with `polarity`, as the model computes them; L_D)."""
    model.cfg.heatmap_sigma = sigma
    model.cfg.residual_polarity = polarity
    model.smooth_matrix = smoothing_matrix(model.cfg.image_size, sigma)
    maps, l_d = [], []
    with torch.no_grad():
        for start in range(0, len(images), 64):
            parts = model.score_parts(model.normalise(torch.from_numpy(images[start : start + 64])))
            maps.append(model.widen(parts.residual).numpy())
            l_d.append(parts.l_d.numpy())
    return np.concatenate(maps).astype(np.float64), np.concatenate(l_d)


def normalise(
    maps: np.ndarray, reference: np.ndarray, floor_factor: float, var_sigma: float, leave_one_out: bool
) -> np.ndarray:
    """z-maps of `maps` against `reference`'s per-pixel mean and spread; with `leave_one_out`,
    map i (one of `reference`) is measured against the other n - 1. The spread's floor is
    `floor_factor` times the median spread of all of `reference`, as `calibrate_pixels` sets it."""
    floor = max(floor_factor * float(np.median(reference.std(axis=0))), 1e-6)
    out = np.empty_like(maps)
    for i, m in enumerate(maps):
        ref = np.delete(reference, i, axis=0) if leave_one_out else reference
        mean, var = ref.mean(axis=0), ref.var(axis=0)
        if var_sigma:
            var = gaussian_filter(var, var_sigma)
        out[i] = (m - mean) / np.maximum(np.sqrt(var), floor)
    return out


def aggregate(z: np.ndarray, top: float) -> np.ndarray:
    """Each map's peak (top 0), or the mean of its hottest `top` share of pixels."""
    flat = z.reshape(len(z), -1)
    if top == 0:
        return flat.max(axis=1)
    k = max(1, round(top * flat.shape[1]))
    return np.sort(flat, axis=1)[:, -k:].mean(axis=1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a trained run with calibration.per_pixel")
    p.add_argument("--dev", type=Path, required=True, help="folder of development defect images")
    p.add_argument("--sigmas", type=float, nargs="+", help="residual smoothing, model pixels; default: the run's")
    p.add_argument("--polarities", nargs="+", choices=POLARITIES, help="default: the run's")
    p.add_argument(
        "--floors", type=float, nargs="+", default=[SPREAD_FLOOR], help="spread floor, times the median spread"
    )
    p.add_argument("--var-sigmas", type=float, nargs="+", default=[0.0], help="smoothing of the variance map")
    p.add_argument("--tops", type=float, nargs="+", default=[0.0], help="0 = peak, else share of hottest pixels")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    torch.set_num_threads(1)
    config = read_run_config(args.run)
    if not config.calibration.per_pixel or config.model.scoring != "residual":
        raise SystemExit(f"{args.run}: dev_study studies residual runs with calibration.per_pixel: true")
    model, _ = load_run_model(args.run)
    size, channels = config.model.image_size, config.model.channels
    normals = held_out_images(config, Path(read_run_info(args.run)["source"]))
    if normals is None:
        raise SystemExit(f"{args.run}: its training data is gone")
    dev = load_normal_images(args.dev, size, channels, Framing.of(size, config.tiling)).images
    labels = np.r_[np.zeros(len(normals)), np.ones(len(dev))]
    lam = config.model.lambda_
    print(f"{args.run}: {len(normals)} held-out normals, {len(dev)} dev defects")
    sigmas = args.sigmas or [model.cfg.heatmap_sigma]
    polarities = args.polarities or [model.cfg.residual_polarity]
    rows = []
    for sigma, polarity in itertools.product(sigmas, polarities):
        n_maps, n_ld = raw_maps(model, normals, sigma, polarity)
        d_maps, d_ld = raw_maps(model, dev, sigma, polarity)
        for floor, var_sigma, top in itertools.product(args.floors, args.var_sigmas, args.tops):
            zn = normalise(n_maps, n_maps, floor, var_sigma, leave_one_out=True)
            zd = normalise(d_maps, n_maps, floor, var_sigma, leave_one_out=False)
            scores = np.r_[weighted_score(aggregate(zn, top), n_ld, lam), weighted_score(aggregate(zd, top), d_ld, lam)]
            row = {"sigma": sigma, "polarity": polarity, "floor": floor, "var_sigma": var_sigma, "top": top}
            rows.append({**row, "dev_auroc": float(roc_auc_score(labels, scores))})
            print("  ".join(f"{k} {v}" for k, v in row.items()) + f"  dev AUROC {rows[-1]['dev_auroc']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
