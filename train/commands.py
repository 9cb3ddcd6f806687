"""Workstation sub-commands: synth, train, eval.

Parsers are built without importing torch; each `run` imports what it needs, so the CLI
stays quick and an edge-only install gets a clear "install the train extra" message.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ganspect.edge.cli import Command


def _configure_synth(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder to write the data set into (MVTec AD layout)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--n-train", type=int, default=200, help="good training images (default 200)")
    p.add_argument("--n-test-good", type=int, default=40, help="good test images (default 40)")
    p.add_argument("--n-test-bad", type=int, default=60, help="defective test images, spread over the defect kinds")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")


def _run_synth(args: argparse.Namespace) -> int:
    from ganspect.train.synth import synthesize_dataset

    summary = synthesize_dataset(
        args.out,
        size=args.size,
        n_train=args.n_train,
        n_test_good=args.n_test_good,
        n_test_bad=args.n_test_bad,
        seed=args.seed,
    )
    print(f"wrote {sum(summary.values())} images to {args.out}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return 0


def _configure_train(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", type=Path, required=True, help="training config YAML, e.g. configs/train/efficient_gan.yaml"
    )
    p.add_argument("--data", type=Path, required=True, help="MVTec-layout data set or a folder of normal images")
    p.add_argument("--out", type=Path, required=True, help="run folder for checkpoints, config and calibration")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config value (YAML syntax), e.g. --set train.steps=200; repeatable",
    )
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")


def _run_train(args: argparse.Namespace) -> int:
    from ganspect.train.config import load_train_config
    from ganspect.train.loop import train

    config = load_train_config(args.config, args.overrides)
    train(config, data=args.data, out=args.out, resume=args.resume)
    return 0


def _configure_calibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run folder written by `ganspect train`")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="calibration.KEY=VALUE",
        help="calibration setting to change, e.g. --set calibration.nu=0.02; repeatable",
    )


def _run_calibrate(args: argparse.Namespace) -> int:
    from ganspect.train.loop import recalibrate

    cal = recalibrate(args.run, args.overrides)
    print(f"threshold {cal.threshold:.6g} ({cal.method}, nu {cal.nu:g}) written to {args.run}; export the run again")
    return 0


def _configure_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run folder written by `ganspect train`")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="MVTec-layout data set with a test/ folder (default: the data set the run was trained on)",
    )
    p.add_argument(
        "--scoring",
        choices=("encoder", "search"),
        default="encoder",
        help="encoder = the one-pass forward that is exported (default; the only one for Efficient GAN); "
        "search = AnoGAN's latent search (anogan.search_steps per image: slow)",
    )
    p.add_argument(
        "--no-report", dest="report", action="store_false", help="write metrics only, no report/ folder with figures"
    )


def _run_eval(args: argparse.Namespace) -> int:
    from ganspect.train.evaluate import evaluate_run, format_metrics

    metrics = evaluate_run(args.run, data=args.data, scoring=args.scoring, report=args.report)
    print(format_metrics(metrics))
    name = "metrics.json" if args.scoring == "encoder" else "metrics_search.json"
    print(f"metrics written to {args.run / name}")
    if metrics.get("report"):
        print(f"report written to {metrics['report']}")
    return 0


SYNTH = Command(
    "write synthetic machined parts with defects and masks (MVTec AD layout)",
    _configure_synth,
    _run_synth,
    extra="train",
)
TRAIN = Command("train a model on normal images", _configure_train, _run_train, extra="train")
CALIBRATE = Command(
    "set a trained run's threshold again from its held-out normals (new nu or threshold method, no training)",
    _configure_calibrate,
    _run_calibrate,
    extra="train",
)
EVAL = Command("evaluate a run on a test set and write metrics.json", _configure_eval, _run_eval, extra="train")
