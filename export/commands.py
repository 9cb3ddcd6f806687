"""The `ganspect export` sub-command: run folder -> model bundle (model.onnx [+ model.int8.onnx] + manifest.json);
and `ganspect demo`, which lives here because it needs both the trainer and the exporter, and
export is the part allowed to import train (train -> export -> edge).

Parsers are built without importing torch; each `run` imports what it needs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ganspect.edge.cli import Command


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run folder written by `ganspect train` (and, for metrics, `ganspect eval`)")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="bundle folder to write; an existing bundle there is replaced, any other content refused",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="add model.int8.onnx: static INT8 quantization calibrated on normal training images, "
        "kept only if it passes the accuracy guard against FP32",
    )
    p.add_argument(
        "--guard-data",
        type=Path,
        default=None,
        help="MVTec-layout data set whose test images (good and defective) join the held-out normals in "
        "the parity checks and the INT8 guard; default: the run's data set's test images, if any",
    )
    p.add_argument("--force", action="store_true", help="with --int8: ship the INT8 model even if it fails its guard")
    p.add_argument(
        "--int8-reduce-range",
        action="store_true",
        help="7-bit INT8 weights, for edge CPUs without VNNI (AVX2 only) where 8-bit products can saturate",
    )
    p.add_argument(
        "--sign",
        type=Path,
        default=None,
        metavar="KEYFILE",
        help="sign the bundle with this Ed25519 private key (PEM, `openssl genpkey -algorithm ed25519`; "
        "an encrypted key's pass phrase from GANSPECT_SIGN_PASSPHRASE): stations that list its "
        "public key in model.trusted_keys take only bundles signed so (docs/security.md)",
    )


def _run(args: argparse.Namespace) -> int:
    from ganspect.export.bundle import REPORT_FILE, export_run
    from ganspect.export.quantize import Int8Settings

    bundle = export_run(
        args.run,
        args.out,
        int8=args.int8,
        force=args.force,
        settings=Int8Settings(reduce_range=args.int8_reduce_range),
        guard_data=args.guard_data,
        sign=args.sign,
    )
    signed = f"; signed with the key in {args.sign}" if args.sign is not None else ""
    print(f"bundle written to {bundle} (report: {bundle / REPORT_FILE}){signed}")
    return 0


def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("work/demo"),
        help="where data, run, bundle, video and verdict log go (default work/demo)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, about two minutes: a smoke test of an install")
    p.add_argument("--broker", default="127.0.0.1:1883", help="MQTT broker HOST:PORT (default 127.0.0.1:1883)")
    p.add_argument("--headless", action="store_true", help="never open the operator window")
    p.add_argument("--seed", type=int, default=0, help="random seed for data and training")


def _run_demo(args: argparse.Namespace) -> int:
    from ganspect.export.demo import run_demo

    return run_demo(workdir=args.workdir, quick=args.quick, broker=args.broker, headless=args.headless, seed=args.seed)


EXPORT = Command(
    "export a trained run to an ONNX model bundle (optionally INT8), checked for parity with PyTorch",
    _configure,
    _run,
    extra="train",
)
DEMO = Command(
    "synthesize parts, train, evaluate, export and run the edge daemon on a simulated conveyor",
    _configure_demo,
    _run_demo,
    extra="train",
)
