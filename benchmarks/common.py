"""Shared plumbing of the seed experiments: resumable units of work, run folders, result tables.

Every experiment is a list of *units* (one trained model and what is measured on it).
A unit's result is stored in `benchmarks/results/<experiment>.json` as soon as it is
done, and its run folder (`benchmarks/runs/<experiment>/<unit>/`, not committed) keeps
checkpoints, so that an interrupted experiment, started again with the same command,
continues where it stopped: finished units are skipped, a half-trained model resumes
from its last checkpoint. The Markdown table is rewritten after every unit.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shlex
import socket
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
# Both can be moved, so that a test (or a trial run) leaves the committed results alone.
RESULTS = Path(os.environ.get("GANSPECT_BENCH_RESULTS", HERE / "results"))
RUNS = Path(os.environ.get("GANSPECT_BENCH_RUNS", HERE / "runs"))


def machine() -> str:
    """One line naming the machine: CPU model, cores, torch threads, GPU if any."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{socket.gethostname()}: {cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"with {torch.get_num_threads()} thread(s), {gpu}, Python {platform.python_version()}"
    )


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


class Experiment:
    """Resumable results of one experiment, kept in results/<name>.json."""

    def __init__(self, name: str) -> None:
        self.name = name
        RESULTS.mkdir(parents=True, exist_ok=True)
        self.path = RESULTS / f"{name}.json"
        self.data: dict[str, Any] = {"units": {}}
        if self.path.is_file():
            self.data = json.loads(self.path.read_text(encoding="utf-8"))
        self.data.setdefault("units", {})
        self.data["machine"] = machine()
        self.data["command"] = command_line()
        self.data.setdefault("started", _now())

    def run_dir(self, unit: str) -> Path:
        return RUNS / self.name / unit

    def done(self, unit: str) -> bool:
        if unit not in self.data["units"]:
            self._merge_from_disk()  # another process on the same experiment may have finished it
        return unit in self.data["units"]

    def get(self, unit: str) -> dict[str, Any]:
        return self.data["units"][unit]

    def unit(self, unit: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The unit's stored result, or run `work` now, store its result with timing, and return it."""
        if self.done(unit):
            print(f"[{self.name}] {unit}: done earlier, skipped", flush=True)
            return self.get(unit)
        print(f"[{self.name}] {unit}: running", flush=True)
        started = time.monotonic()
        result = work()
        result["seconds"] = round(time.monotonic() - started, 1)
        result["finished"] = _now()
        result["command"] = command_line()
        self.data["units"][unit] = result
        self.save()
        print(f"[{self.name}] {unit}: finished in {result['seconds']:.0f} s", flush=True)
        return result

    def save(self) -> None:
        """Write the results, keeping units that other processes (e.g. `--seeds 2` beside `--seeds 0 1`) stored."""
        with open(self.path.with_suffix(".lock"), "w", encoding="utf-8") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._merge_from_disk()
            self.data["updated"] = _now()
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)

    def _merge_from_disk(self) -> None:
        if self.path.is_file():
            stored = json.loads(self.path.read_text(encoding="utf-8")).get("units", {})
            self.data["units"] = {**stored, **self.data["units"]}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def write_markdown(name: str, title: str, exp: Experiment, body: str) -> Path:
    """results/<name>.md: the table(s) in `body` with the machine, the time and the command."""
    units = exp.data["units"].values()
    seconds = sum(float(u.get("seconds", 0)) for u in units)
    # Units run by separate processes (`--seeds 0 1` beside `--seeds 2`) each name their own command.
    commands = list(dict.fromkeys(u["command"] for u in units if "command" in u)) or [exp.data["command"]]
    text = (
        f"# {title}\n\n{body.rstrip()}\n\n"
        f"- machine: {exp.data['machine']}\n"
        f"- started {exp.data['started']}, last update {exp.data.get('updated', _now())}; "
        f"{len(exp.data['units'])} unit(s) done, {seconds / 60:.1f} min of compute in them\n"
        f"- command{'s' if len(commands) > 1 else ''} (from the repository root): "
        + "; ".join(f"`{c}`" for c in commands)
        + "\n"
        f"- raw results: `benchmarks/results/{name}.json`\n"
    )
    path = RESULTS / f"{name}.md"
    path.write_text(text, encoding="utf-8")
    return path


def train_or_resume(config: Any, train_images: np.ndarray, holdout_images: np.ndarray, out: Path) -> Any:
    """The calibrated scoring model of a unit: trained now, resumed, or loaded when finished."""
    from ganspect.train.loop import CHECKPOINT, load_checkpoint, load_run_model, train_arrays

    ckpt_path = out / CHECKPOINT
    if ckpt_path.is_file() and load_checkpoint(ckpt_path).get("calibrated"):
        return load_run_model(out)[0]
    train_arrays(config, train_images, holdout_images, out, resume=ckpt_path.is_file(), source="MNIST arrays")
    return load_run_model(out)[0]


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"
