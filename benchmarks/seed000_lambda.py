"""Seed 000: how the score weight lambda affects Efficient GAN on MNIST.

The paper's protocol: train on two digits (1,500 training images each), test on 150
images of which 50 are the anomalous digit, threshold = the 50th highest score (so 50
images are called anomalous and precision = recall = F1), F1 for lambda = 0.0 ... 1.0.

Experiment 1: training pairs (4,6), (1,7), (3,4) with anomaly digit 2.
Experiment 2: training pair (4,6) with each other digit as the anomaly (same model).

As the paper, L_R is the mean absolute residual (`residual_reduction: mean`). Both
discrimination losses are measured on the same trained D: feature matching (fm) and
cross-entropy (ce). The 150 test images come from MNIST's test set; each F1 is the mean
over `--draws` random draws of the 150 (50 of each training digit, 50 anomalies), to
show how much a single draw of 150 moves it (the std is in the JSON).

    nice -n 10 .venv/bin/python benchmarks/seed000_lambda.py            # full run (resumable)
    .venv/bin/python benchmarks/seed000_lambda.py --steps 20 --tag smoke  # seconds, to check it works
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Experiment, fmt, train_or_resume, write_markdown
from mnist import load_mnist

LAMBDAS = [round(0.1 * i, 1) for i in range(11)]
PAIRS = [(4, 6), (1, 7), (3, 4)]
ANOMALY = 2
SECOND_PAIR = (4, 6)


def make_config(steps: int, seed: int, threads: int) -> object:
    from ganspect.train.config import config_from_dict

    return config_from_dict(
        {
            "model": {
                "kind": "efficient_gan",
                "image_size": 32,
                "channels": 1,
                "latent_dim": 32,
                "base_width": 16,
                "residual_reduction": "mean",
                "lambda": 0.1,
            },
            "data": {"holdout": 0.1, "augment": {"shift": 0, "brightness": 0.0}},
            "train": {
                "steps": steps,
                "batch_size": 64,
                "seed": seed,
                "threads": threads,
                "checkpoint_every": 250,
                "log_every": 50,
                "device": "auto",
            },
            "calibration": {"nu": 0.05},
        },
        source="seed000",
    )


def f1_at_top_k(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Call the k highest scores anomalous (the paper's '50th highest score' threshold); F1 of that call."""
    from sklearn.metrics import f1_score

    order = np.argsort(-scores, kind="stable")
    pred = np.zeros(len(scores), dtype=int)
    pred[order[:k]] = 1
    return float(f1_score(labels, pred))


def score_parts_both(model: object, images: np.ndarray) -> dict[str, np.ndarray]:
    """l_r, l_d (feature matching) and l_d (cross-entropy) of the same trained model."""
    from ganspect.train.calibrate import score_images

    original = model.cfg.discrimination
    out = {}
    try:
        for disc in ("feature_matching", "cross_entropy"):
            model.cfg.discrimination = disc
            scored = score_images(model, images, batch_size=256)
            out["l_r"] = scored.l_r
            out["fm" if disc == "feature_matching" else "ce"] = scored.l_d
    finally:
        model.cfg.discrimination = original
    return out


def sweep(parts: dict[str, np.ndarray], labels: np.ndarray, draws: list[np.ndarray]) -> dict[str, object]:
    from sklearn.metrics import roc_auc_score

    result: dict[str, object] = {}
    for disc in ("fm", "ce"):
        f1s = np.array(
            [
                [f1_at_top_k((1 - lam) * parts["l_r"][d] + lam * parts[disc][d], labels[d], 50) for lam in LAMBDAS]
                for d in draws
            ]
        )  # (draws, lambdas)
        aurocs = [float(roc_auc_score(labels, (1 - lam) * parts["l_r"] + lam * parts[disc])) for lam in LAMBDAS]
        result[disc] = {
            "f1_mean": f1s.mean(0).round(4).tolist(),
            "f1_std": f1s.std(0).round(4).tolist(),
            "auroc_all_test": [round(a, 4) for a in aurocs],
        }
    return result


def test_draws(
    test_y: np.ndarray, pair: tuple[int, int], anomaly: int, n_draws: int, seed: int
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Indices of all usable test images, their labels, and `n_draws` draws of 50 + 50 + 50 positions."""
    idx = np.flatnonzero(np.isin(test_y, [*pair, anomaly]))
    labels = (test_y[idx] == anomaly).astype(int)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_draws):
        pick = [rng.choice(np.flatnonzero(test_y[idx] == d), 50, replace=False) for d in (*pair, anomaly)]
        draws.append(np.concatenate(pick))
    return idx, labels, draws


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000, help="training steps of batch 64 per model (default 2000)")
    p.add_argument("--per-digit", type=int, default=1500, help="training images per digit (the paper: 1500)")
    p.add_argument("--draws", type=int, default=5, help="random draws of the 150 test images (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--tag", default="", help="suffix for the result files (e.g. smoke)")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    name = "seed000_lambda" + (f"_{args.tag}" if args.tag else "")
    exp = Experiment(name)
    train_x, train_y = load_mnist("train")
    test_x, test_y = load_mnist("test")
    models = {}
    for pair in PAIRS:

        def work(pair: tuple[int, int] = pair) -> dict[str, object]:
            rng = np.random.default_rng([args.seed, *pair])
            chosen = np.concatenate(
                [rng.choice(np.flatnonzero(train_y == d), args.per_digit, replace=False) for d in pair]
            )
            images = train_x[np.sort(chosen)]
            n_val = len(images) // 10
            order = np.random.default_rng(args.seed).permutation(len(images))
            model = train_or_resume(
                make_config(args.steps, args.seed, args.threads),
                images[order[n_val:]],
                images[order[:n_val]],
                exp.run_dir(f"train_{pair[0]}{pair[1]}"),
            )
            models[pair] = model
            idx, labels, draws = test_draws(test_y, pair, ANOMALY, args.draws, args.seed)
            parts = score_parts_both(model, test_x[idx])
            return {"pair": list(pair), "anomaly": ANOMALY, "steps": args.steps, **sweep(parts, labels, draws)}

        exp.unit(f"exp1_train{pair[0]}{pair[1]}_anomaly{ANOMALY}", work)
        _write(exp, name, args)

    for anomaly in [d for d in range(10) if d not in SECOND_PAIR]:

        def work2(anomaly: int = anomaly) -> dict[str, object]:
            model = models.get(SECOND_PAIR) or train_or_resume(
                make_config(args.steps, args.seed, args.threads),
                np.zeros((0,)),
                np.zeros((0,)),
                exp.run_dir(f"train_{SECOND_PAIR[0]}{SECOND_PAIR[1]}"),
            )
            idx, labels, draws = test_draws(test_y, SECOND_PAIR, anomaly, args.draws, args.seed)
            parts = score_parts_both(model, test_x[idx])
            return {"pair": list(SECOND_PAIR), "anomaly": anomaly, "steps": args.steps, **sweep(parts, labels, draws)}

        exp.unit(f"exp2_train{SECOND_PAIR[0]}{SECOND_PAIR[1]}_anomaly{anomaly}", work2)
        _write(exp, name, args)
    print(f"results: benchmarks/results/{name}.md")
    return 0


def _write(exp: Experiment, name: str, args: argparse.Namespace) -> None:
    head = "| training digits | anomaly | L_D | " + " | ".join(f"λ={lam:.1f}" for lam in LAMBDAS) + " | falls? |\n"
    head += "|---" * (len(LAMBDAS) + 4) + "|\n"
    rows1, rows2 = [], []
    for unit, r in exp.data["units"].items():
        for disc in ("fm", "ce"):
            f1 = r[disc]["f1_mean"]
            trend = "yes" if f1[0] > f1[-1] else "no"
            row = (
                f"| {r['pair'][0]},{r['pair'][1]} | {r['anomaly']} | {disc} | "
                + " | ".join(fmt(v, 2) for v in f1)
                + f" | {trend} |"
            )
            (rows1 if unit.startswith("exp1") else rows2).append(row)
    steps = next(iter(exp.data["units"].values()))["steps"] if exp.data["units"] else args.steps
    body = (
        "F1 at the paper's threshold (the 50 highest of 150 test scores called anomalous), mean over "
        f"{args.draws} random draws of the 150 test images from MNIST's test set. Efficient GAN at 32x32 "
        f"(MNIST padded), latent 32, base width 16, {steps} steps of batch 64 on {args.per_digit} training "
        "images per digit (10 % of them held out), L_R = mean |x - G(E(x))|, L_D = feature matching (fm) or "
        "cross-entropy (ce) on the same trained D. 'falls?' = F1 at λ=0 above F1 at λ=1.\n\n"
        "## Experiment 1: anomaly digit 2\n\n" + head + "\n".join(rows1) + "\n\n"
        "## Experiment 2: training digits 4,6; each other digit as the anomaly\n\n" + head + "\n".join(rows2) + "\n"
    )
    write_markdown(name, "Seed 000: F1 against the score weight λ (Efficient GAN, MNIST)", exp, body)


if __name__ == "__main__":
    raise SystemExit(main())
