"""`ganspect edge`: the line-side daemon.

The parser is built without importing onnxruntime or OpenCV; `run` imports the daemon.
Flags override the config file; relative paths given as flags are relative to the
current folder (they are typed in a shell), those in the file to the file's folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ganspect.edge.cli import Command

if TYPE_CHECKING:
    from ganspect.edge.config import EdgeConfig


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action",
        nargs="?",
        choices=["install-model"],
        help="install-model BUNDLE: verify BUNDLE completely and make it the station's model.bundle "
        "(the previous one is kept); a running daemon swaps it in between frames",
    )
    p.add_argument("bundle", nargs="?", type=Path, help="with install-model: the bundle folder ganspect export wrote")
    p.add_argument("--config", type=Path, default=None, help="edge config YAML, e.g. configs/edge.yaml (required)")
    p.add_argument("--model", type=Path, default=None, help="model bundle folder (overrides model.bundle)")
    p.add_argument(
        "--source",
        default=None,
        help="camera index, device, video file, image folder or stream URL (overrides source.uri)",
    )
    p.add_argument("--headless", action="store_true", help="never open the operator window")
    p.add_argument(
        "--max-frames", type=int, default=None, metavar="N", help="stop after N frames (overrides run.max_frames)"
    )
    p.add_argument(
        "--verdict-log", type=Path, default=None, metavar="FILE", help="append every verdict as one JSON line to FILE"
    )
    p.add_argument(
        "--check",
        "--validate-config",
        dest="check",
        action="store_true",
        help="validate the config file and load its model bundle, print 'config OK' and exit",
    )
    p.add_argument("--check-config", type=Path, default=None, metavar="FILE", help="the same as --config FILE --check")


def _run(args: argparse.Namespace) -> int:
    from ganspect.edge.config import is_path_like_source, load_config
    from ganspect.edge.errors import ConfigError

    if args.check_config is not None:
        args.config, args.check = args.check_config, True
    if args.config is None:
        raise ConfigError("give the config file: --config FILE (or --check-config FILE to only check it)")
    if args.action == "install-model":
        return _install_model(args.config, args.bundle)
    config = load_config(args.config)
    if args.max_frames is not None and args.max_frames < 1:
        raise ConfigError(f"--max-frames must be at least 1, got {args.max_frames}")
    updates: dict[str, object] = {}  # config section -> its replacement
    if args.model is not None:
        updates["model"] = config.model.model_copy(update={"bundle": args.model})
    if args.source is not None:
        uri = str(Path(args.source).absolute()) if is_path_like_source(args.source) else args.source
        updates["source"] = config.source.model_copy(update={"uri": uri})
    if args.max_frames is not None:
        updates["run"] = config.run.model_copy(update={"max_frames": args.max_frames})
    config = config.model_copy(update=updates)
    if args.check:
        _check_model(config, args.config)
        print(f"config OK: {args.config}")
        return 0

    from ganspect.edge.app import run_edge

    summary = run_edge(config, headless=args.headless, verdict_log=args.verdict_log)
    print("ganspect edge summary:")
    for line in summary.lines():
        print(f"  {line}")
    return 0


def _install_model(config: Path, bundle: Path | None) -> int:
    from ganspect.edge.errors import ConfigError
    from ganspect.edge.model_store import install_model

    if bundle is None:
        raise ConfigError("install-model needs the bundle folder: ganspect edge install-model BUNDLE --config FILE")
    installed = install_model(config, bundle)
    if installed.unchanged:
        print(f"model {installed.name} is already installed as {installed.path} (verified again)")
    else:
        print(
            f"model {installed.name} verified and installed as {installed.path}"
            + (f"; the previous one, {installed.previous.name}, is kept" if installed.previous else "")
        )
    return 0


def _check_model(config: EdgeConfig, path: Path) -> None:
    """Load the bundle as the daemon would (hashes, interface, warm-up) and fit the inspection settings to it."""
    from ganspect.edge.errors import BundleError, ConfigError
    from ganspect.edge.inspector import Inspector
    from ganspect.edge.scorer import Scorer

    try:
        scorer = Scorer.load(
            config.model.bundle, config.model.precision, config.model.intra_op_threads, config.model.trusted_keys
        )
    except BundleError as exc:
        raise ConfigError(f"{path}: model.bundle: {exc}") from exc
    Inspector(config.inspection).check(scorer.manifest)


EDGE = Command(
    "run the edge daemon: score camera frames with a model bundle and publish verdicts over MQTT",
    _configure,
    _run,
    extra="edge",
)
