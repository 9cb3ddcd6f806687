"""The `ganspect export` sub-command: run folder -> model bundle (model.onnx + manifest.json).

The parser is built without importing torch; `run` imports the exporter.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ganspect.edge.cli import Command


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run folder written by `ganspect train` (and, for metrics, `ganspect eval`)")
    p.add_argument("--out", type=Path, required=True,
                   help="bundle folder to write; an existing bundle there is replaced, any other content refused")


def _run(args: argparse.Namespace) -> int:
    from ganspect.export.bundle import export_run

    bundle = export_run(args.run, args.out)
    print(f"bundle written to {bundle}")
    return 0


EXPORT = Command("export a trained run to an ONNX model bundle, checked for parity with PyTorch",
                 _configure, _run, extra="train")
