"""Seed 004: does an OC-NN on Efficient GAN's latent codes help? Measured on the paper protocol's models.

For every Efficient GAN model that `paper_mnist.py` has finished (one anomalous digit,
nine normal), an OC-NN (nu = 0.1, 32 hidden units, 1000 full-batch Adam updates) is fit
on the frozen codes E(x) of the model's training images, and the test set (the same
split as paper_mnist.py) is scored three ways: the GAN score (λ = 0.1, mean residual),
the OC-NN score r − y(E(x)), and the rank average of the two. AUPRC and AUROC each.

Run it after paper_mnist.py (it reads benchmarks/runs/paper_mnist/); it is resumable and
only adds the models that are new since its last run:

    nice -n 10 .venv/bin/python benchmarks/ocnn_mnist.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RUNS, Experiment, fmt, write_markdown
from mnist import load_all_mnist
from paper_mnist import split


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nu", type=float, default=0.1)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--source", default="paper_mnist", help="experiment whose run folders to use")
    p.add_argument(
        "--digits",
        type=int,
        nargs="+",
        default=list(range(10)),
        help="anomalous digits to do (e.g. 0 1 2 3 4 here and 5 6 7 8 9 in a second process)",
    )
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from scipy.stats import rankdata
    from sklearn.metrics import average_precision_score, roc_auc_score

    from ganspect.train.calibrate import score_images
    from ganspect.train.loop import CHECKPOINT, latent_codes, load_checkpoint, load_run_model
    from ganspect.train.models.ocnn import fit_ocnn

    exp = Experiment("ocnn_mnist")
    x, y = load_all_mnist()
    folders = sorted((RUNS / args.source).glob("efficient_gan_digit*_seed*"))
    for folder in folders:
        ckpt_path = folder / CHECKPOINT
        if not ckpt_path.is_file() or not load_checkpoint(ckpt_path).get("calibrated"):
            continue
        digit = int(folder.name.split("digit")[1].split("_")[0])
        seed = int(folder.name.split("seed")[1])
        if digit not in args.digits:
            continue

        def work(folder: Path = folder, digit: int = digit, seed: int = seed) -> dict[str, object]:
            tr, _, te = split(y, digit, seed)
            model, _ = load_run_model(folder)
            fit = fit_ocnn(latent_codes(model, x[tr]), nu=args.nu, hidden=args.hidden, steps=args.steps, seed=seed)
            with torch.no_grad():
                ocnn = fit.model.score(latent_codes(model, x[te])).numpy()
            gan = score_images(model, x[te], batch_size=512).score
            labels = (y[te] == digit).astype(int)
            combined = rankdata(gan) + rankdata(ocnn)
            out: dict[str, object] = {"digit": digit, "seed": seed, "train_outside": fit.outside}
            for name, s in (("gan", gan), ("ocnn", ocnn), ("combined", combined)):
                out[name] = {
                    "auprc": float(average_precision_score(labels, s)),
                    "auroc": float(roc_auc_score(labels, s)),
                }
            return out

        exp.unit(folder.name, work)
    _write(exp)
    print("results: benchmarks/results/ocnn_mnist.md")
    return 0


def _write(exp: Experiment) -> None:
    units = list(exp.data["units"].values())
    lines = [
        "| anomalous digit | n | GAN AUPRC | OC-NN AUPRC | rank average AUPRC | GAN AUROC | OC-NN AUROC | rank average AUROC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for digit in range(10):
        us = [u for u in units if u["digit"] == digit]
        if not us:
            continue

        def m(name: str, key: str) -> str:
            return fmt(float(np.mean([u[name][key] for u in us])))

        lines.append(
            f"| {digit} | {len(us)} | {m('gan', 'auprc')} | {m('ocnn', 'auprc')} | {m('combined', 'auprc')} | "
            f"{m('gan', 'auroc')} | {m('ocnn', 'auroc')} | {m('combined', 'auroc')} |"
        )
    if units:

        def allm(name: str, key: str) -> str:
            return fmt(float(np.mean([u[name][key] for u in units])))

        lines.append(
            f"| all | {len(units)} | {allm('gan', 'auprc')} | {allm('ocnn', 'auprc')} | "
            f"{allm('combined', 'auprc')} | {allm('gan', 'auroc')} | {allm('ocnn', 'auroc')} | "
            f"{allm('combined', 'auroc')} |"
        )
    body = (
        "OC-NN (seed 004) on the frozen latent codes of the paper protocol's Efficient GAN models "
        "(benchmarks/paper_mnist.py), against the GAN score alone and the rank average of both. Means over "
        "the seeds done (n).\n\n" + "\n".join(lines) + "\n"
    )
    write_markdown("ocnn_mnist", "Seed 004: an OC-NN head on Efficient GAN's latent codes (MNIST)", exp, body)


if __name__ == "__main__":
    raise SystemExit(main())
