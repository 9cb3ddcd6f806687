"""The `ganspect` command.

Sub-commands are discovered through the `ganspect.commands` entry-point group, so this
module (which the edge install runs) never imports the trainer or the exporter. Each
entry point names a `Command`: its parser is built without heavy imports, and its
`run` imports what it needs, so `ganspect --help` is fast and works on an edge-only
install.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points, version

from ganspect.edge.errors import GanspectError


@dataclass(frozen=True)
class Command:
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    # The extra whose absence makes `run` fail with ImportError, named in the message.
    extra: str = "edge"


def _commands() -> dict[str, Command]:
    commands = {}
    for ep in entry_points(group="ganspect.commands"):
        try:
            commands[ep.name] = ep.load()
        except ImportError as exc:
            # A broken or partial install must not take the other sub-commands down with it.
            logging.getLogger(__name__).warning("sub-command %r is unavailable: %s", ep.name, exc)
    return commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ganspect",
        description="Anomaly inspection trained on good parts only: synthesize, train, "
        "evaluate, export, and run the edge daemon.",
    )
    parser.add_argument("--version", action="version", version=f"ganspect {version('ganspect')}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in sorted(_commands().items()):
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.configure(p)
        p.set_defaults(_command=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Our own INFO lines are for the operator; the libraries' INFO (the ONNX exporter's
    # optimiser passes, say) would bury them, so only their warnings show unless -v.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("ganspect").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    command: Command = args._command
    try:
        return command.run(args)
    except GanspectError as exc:
        print(f"ganspect {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in {
            "torch",
            "onnx",
            "onnxscript",
            "sklearn",
            "tqdm",
            "onnxruntime",
            "cv2",
            "paho",
        }:
            print(
                f"ganspect {args.command}: error: the Python module '{exc.name}' is missing; "
                f"install the '{command.extra}' extra: pip install 'ganspect[{command.extra}]'",
                file=sys.stderr,
            )
            return 2
        raise
    except KeyboardInterrupt:
        print(f"ganspect {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
