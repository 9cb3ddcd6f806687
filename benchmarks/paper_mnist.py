"""The Efficient GAN paper's MNIST protocol (Zenati et al. 2018, seed 001): AUPRC per anomalous digit.

For each digit d: d is the anomaly, the nine others are normal. From all 70,000 MNIST
images, a seeded 80 % of the normal images are for training (5 % of those held out for
calibration and never trained on); the test set is the other 20 % of the normals plus
every image of digit d. AUPRC with the anomaly as the positive class, mean ± std over
3 seeds, for Efficient GAN and AnoGAN (one-pass encoder scoring: the latent search over
~20,000 test images per model is out of reach on 2 CPU cores; seed 003's benchmark
compares the two on a subset).

Both models score with L_R = mean |x − G(z)| (the paper) and λ = 0.1; the λ = 0 column
(residual only) is in the JSON.

    nice -n 10 .venv/bin/python benchmarks/paper_mnist.py                 # full run (resumable)
    .venv/bin/python benchmarks/paper_mnist.py --steps 10 --encoder-steps 10 --digits 0 --seeds 0 --tag smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Experiment, fmt, train_or_resume, write_markdown
from mnist import load_all_mnist

MODELS = ("efficient_gan", "anogan")


def make_config(kind: str, args: argparse.Namespace, seed: int) -> object:
    from ganspect.train.config import config_from_dict

    steps = args.steps if kind == "efficient_gan" else args.anogan_steps
    return config_from_dict(
        {
            "model": {
                "kind": kind,
                "image_size": 32,
                "channels": 1,
                "latent_dim": 32,
                "base_width": 16,
                "residual_reduction": "mean",
                "lambda": 0.1,
            },
            "data": {"holdout": 0.05, "augment": {"shift": 0, "brightness": 0.0}},
            "train": {
                "steps": steps,
                "batch_size": 64,
                "seed": seed,
                "threads": args.threads,
                "checkpoint_every": 250,
                "log_every": 100,
            },
            "anogan": {"encoder_steps": args.encoder_steps},
            "calibration": {"nu": 0.05, "batch_size": 512},
        },
        source="paper_mnist",
    )


def split(labels: np.ndarray, digit: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, held-out, test) indices: 80 % of normals (5 % of it held out); test = 20 % normals + all of `digit`."""
    rng = np.random.default_rng([seed, digit])
    normal = rng.permutation(np.flatnonzero(labels != digit))
    n_train = round(0.8 * len(normal))
    train, test_normal = normal[:n_train], normal[n_train:]
    n_val = round(0.05 * n_train)
    test = np.sort(np.concatenate([test_normal, np.flatnonzero(labels == digit)]))
    return np.sort(train[n_val:]), np.sort(train[:n_val]), test


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="Efficient GAN steps of batch 64 (default 600)")
    p.add_argument("--anogan-steps", type=int, default=600, help="AnoGAN DCGAN steps of batch 64 (default 600)")
    p.add_argument("--encoder-steps", type=int, default=300, help="AnoGAN encoder steps (default 300)")
    p.add_argument("--digits", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from ganspect.train.calibrate import score_images

    name = "paper_mnist" + (f"_{args.tag}" if args.tag else "")
    exp = Experiment(name)
    x, y = load_all_mnist()
    # Seeds outermost: after one seed, every digit already has a number.
    for seed in args.seeds:
        for digit in args.digits:
            for kind in args.models:
                unit = f"{kind}_digit{digit}_seed{seed}"

                def work(kind: str = kind, digit: int = digit, seed: int = seed) -> dict[str, object]:
                    from sklearn.metrics import average_precision_score, roc_auc_score

                    tr, val, te = split(y, digit, seed)
                    model = train_or_resume(make_config(kind, args, seed), x[tr], x[val], exp.run_dir(unit))
                    scored = score_images(model, x[te], batch_size=512)
                    labels = (y[te] == digit).astype(int)
                    return {
                        "kind": kind,
                        "digit": digit,
                        "seed": seed,
                        "n_train": len(tr),
                        "n_test": len(te),
                        "n_test_anomalous": int(labels.sum()),
                        "auprc": float(average_precision_score(labels, scored.score)),
                        "auroc": float(roc_auc_score(labels, scored.score)),
                        "auprc_lambda0": float(average_precision_score(labels, scored.l_r)),
                        "steps": make_config(kind, args, seed).train.steps,
                    }

                exp.unit(unit, work)
                _write(exp, name)
    print(f"results: benchmarks/results/{name}.md")
    return 0


def _write(exp: Experiment, name: str) -> None:
    units = list(exp.data["units"].values())
    lines = [
        "| anomalous digit | " + " | ".join(f"{k} AUPRC (mean ± std, n seeds)" for k in MODELS) + " |",
        "|---" * (1 + len(MODELS)) + "|",
    ]
    means = {k: [] for k in MODELS}
    for digit in range(10):
        cells = []
        for kind in MODELS:
            v = [u["auprc"] for u in units if u["kind"] == kind and u["digit"] == digit]
            if v:
                means[kind].append(np.mean(v))
            cells.append(f"{fmt(float(np.mean(v)))} ± {fmt(float(np.std(v)))} (n={len(v)})" if v else "—")
        lines.append(f"| {digit} | " + " | ".join(cells) + " |")
    lines.append(
        "| mean over digits | " + " | ".join(fmt(float(np.mean(means[k]))) if means[k] else "—" for k in MODELS) + " |"
    )
    steps = {k: next((u["steps"] for u in units if u["kind"] == k), None) for k in MODELS}
    body = (
        "AUPRC (anomaly = positive) per anomalous digit; the nine other digits are normal. 80 % of the normal "
        "images of all 70,000 MNIST images train (5 % of those held out for calibration), the test set is the "
        "other 20 % of normals plus every image of the anomalous digit (about 13,000 + 7,000). 32x32 (padded), "
        "latent 32, base width 16, batch 64; "
        f"Efficient GAN {steps['efficient_gan']} steps, AnoGAN {steps['anogan']} DCGAN steps + encoder; "
        "score λ = 0.1, L_R = mean residual, L_D feature matching; AnoGAN scored in one pass by its encoder. "
        "std over seeds (population std).\n\n" + "\n".join(lines) + "\n"
    )
    write_markdown(name, "The Efficient GAN paper's MNIST protocol: AUPRC per anomalous digit", exp, body)


if __name__ == "__main__":
    raise SystemExit(main())
