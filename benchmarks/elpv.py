"""ELPV solar cells (Buerhop-Lutz et al. 2018; Deitsch et al. 2019): Efficient GAN on real industrial images.

Electroluminescence images of 2,624 solar cells (300x300 grayscale), each with a defect
probability of 0, 1/3, 2/3 or 1 and a type (mono- or polycrystalline). Per type and
seed: a seeded 75 % of the probability-0 cells train (10 % of those held out for
calibration), the test set is the other 25 % of probability-0 cells against every
probability-1 cell of the same type (the uncertain 1/3 and 2/3 cells are left out).
Image AUROC at λ = 0.1 with both residual reductions (peak: local cracks; mean: the
papers), from the same trained model; 3 seeds.

The data are for evaluation only (CC BY-NC-SA 4.0): they are read from the installed
`elpv-dataset` wheel (`pip install elpv-dataset==1.0.0.post1`) and never copied here.

    nice -n 10 .venv/bin/python benchmarks/elpv.py                 # full run (resumable)
    .venv/bin/python benchmarks/elpv.py --steps 10 --types mono --seeds 0 --tag smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Experiment, fmt, train_or_resume, write_markdown


def load_elpv(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 (N, size, size, 1), probabilities (N,), types (N,)) from the installed wheel."""
    try:
        import elpv_dataset
    except ImportError:
        raise SystemExit("ELPV is not installed: pip install elpv-dataset==1.0.0.post1") from None
    import cv2

    root = Path(elpv_dataset.__file__).parent / "data"
    rows = [line.split() for line in (root / "labels.csv").read_text().splitlines() if line.strip()]
    images = np.empty((len(rows), size, size, 1), dtype=np.uint8)
    for i, (name, _, _) in enumerate(rows):
        gray = cv2.imread(str(root / name), cv2.IMREAD_GRAYSCALE)
        images[i, ..., 0] = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)
    return images, np.array([float(r[1]) for r in rows]), np.array([r[2] for r in rows])


def make_config(args: argparse.Namespace, seed: int) -> object:
    from ganspect.train.config import config_from_dict

    return config_from_dict(
        {
            "model": {
                "kind": "efficient_gan",
                "image_size": args.size,
                "channels": 1,
                "latent_dim": 64,
                "base_width": 16,
                "residual_reduction": "peak",
                "lambda": 0.1,
            },
            # A mirrored good cell is a good cell; busbars stay straight under flips.
            "data": {"holdout": 0.1, "augment": {"hflip": True, "vflip": True, "shift": 2, "brightness": 0.05}},
            "train": {
                "steps": args.steps,
                "batch_size": 32,
                "seed": seed,
                "threads": args.threads,
                "checkpoint_every": 250,
                "log_every": 50,
            },
            "calibration": {"nu": 0.05},
        },
        source="elpv",
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000, help="Efficient GAN steps of batch 32 (default 1000)")
    p.add_argument("--size", type=int, default=64, help="image side (default 64)")
    p.add_argument("--types", nargs="+", default=["mono", "poly"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from ganspect.train.calibrate import score_images

    name = "elpv" + (f"_{args.tag}" if args.tag else "")
    exp = Experiment(name)
    images, prob, types = load_elpv(args.size)
    for seed in args.seeds:
        for cell_type in args.types:
            unit = f"{cell_type}_seed{seed}"

            def work(cell_type: str = cell_type, seed: int = seed) -> dict[str, object]:
                from sklearn.metrics import average_precision_score, roc_auc_score

                rng = np.random.default_rng([seed, 0 if cell_type == "mono" else 1])
                good = rng.permutation(np.flatnonzero((types == cell_type) & (prob == 0.0)))
                bad = np.flatnonzero((types == cell_type) & (prob == 1.0))
                n_train = round(0.75 * len(good))
                train, test_good = good[:n_train], good[n_train:]
                n_val = round(0.1 * n_train)
                model = train_or_resume(
                    make_config(args, seed), images[train[n_val:]], images[train[:n_val]], exp.run_dir(unit)
                )
                test = np.concatenate([test_good, bad])
                labels = np.concatenate([np.zeros(len(test_good), int), np.ones(len(bad), int)])
                result: dict[str, object] = {
                    "type": cell_type,
                    "seed": seed,
                    "n_train": n_train - n_val,
                    "n_val": n_val,
                    "n_test_good": len(test_good),
                    "n_test_bad": len(bad),
                    "steps": args.steps,
                    "size": args.size,
                }
                original = model.cfg.residual_reduction
                try:
                    for reduction in ("peak", "mean"):
                        model.cfg.residual_reduction = reduction
                        s = score_images(model, images[test], batch_size=128)
                        result[reduction] = {
                            "auroc": float(roc_auc_score(labels, s.score)),
                            "auprc": float(average_precision_score(labels, s.score)),
                            "auroc_lambda0": float(roc_auc_score(labels, s.l_r)),
                            "auroc_lambda1": float(roc_auc_score(labels, s.l_d)),
                        }
                finally:
                    model.cfg.residual_reduction = original
                return result

            exp.unit(unit, work)
            _write(exp, name)
    print(f"results: benchmarks/results/{name}.md")
    return 0


def _write(exp: Experiment, name: str) -> None:
    units = list(exp.data["units"].values())
    lines = [
        "| cell type | L_R | AUROC λ=0.1 (mean ± std) | AUROC λ=0 | AUROC λ=1 | AUPRC λ=0.1 | seeds | train / test good / test bad |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell_type in ("mono", "poly"):
        us = [u for u in units if u["type"] == cell_type]
        if not us:
            continue
        for red in ("peak", "mean"):

            def ms(key: str) -> str:
                v = [u[red][key] for u in us]
                return f"{fmt(float(np.mean(v)))} ± {fmt(float(np.std(v)))}"

            u0 = us[0]
            lines.append(
                f"| {cell_type} | {red} | {ms('auroc')} | {ms('auroc_lambda0')} | {ms('auroc_lambda1')} | "
                f"{ms('auprc')} | {len(us)} | {u0['n_train']} / {u0['n_test_good']} / {u0['n_test_bad']} |"
            )
    u0 = units[0] if units else {"steps": "?", "size": "?"}
    body = (
        f"Efficient GAN at {u0['size']}x{u0['size']} grayscale, latent 64, base width 16, {u0['steps']} steps of "
        "batch 32, flips/shift/brightness augmentation; trained on defect-probability-0 cells of one type, "
        "tested on held-out probability-0 cells against all probability-1 cells of that type. Both L_R "
        "reductions are measured on the same trained model. std over seeds (population std).\n\n"
        + "\n".join(lines)
        + "\n"
    )
    write_markdown(name, "ELPV solar cells: image AUROC, probability 0 vs 1", exp, body)


if __name__ == "__main__":
    raise SystemExit(main())
