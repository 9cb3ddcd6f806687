"""`ganspect demo`: the whole product once, on synthetic parts.

synthesize parts → train Efficient GAN → evaluate → export the bundle → write a
simulated conveyor video → run the real edge daemon on it (a subprocess, exactly as on
a line PC) → compare its verdicts with the video's ground truth.

Everything lands under the work directory; a re-run replaces what an earlier demo wrote
there and leaves anything else alone.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ganspect.edge.errors import GanspectError
from ganspect.edge.overlay import display_available


@dataclass(frozen=True)
class DemoPlan:
    size: int
    n_train: int
    n_test_good: int
    n_test_bad: int
    n_parts: int
    train_overrides: dict[str, Any] = field(default_factory=dict)


# The full plan trains for under two minutes on 2 CPU cores. 400 good images with a
# quarter held out give 100 normals for the threshold, the fewest for which their 99th
# percentile (nu = 0.01) leaves one of them above it rather than sitting at their maximum
# (the trainer warns below n_val * nu = 1).
# Quick only proves that every stage runs on this installation.
FULL = DemoPlan(
    size=64,
    n_train=400,
    n_test_good=40,
    n_test_bad=60,
    n_parts=100,
    train_overrides={"model": {"image_size": 64}, "data": {"holdout": 0.25}},
)
QUICK = DemoPlan(
    size=32,
    n_train=60,
    n_test_good=10,
    n_test_bad=12,
    n_parts=16,
    train_overrides={"model": {"image_size": 32}, "train": {"steps": 150, "checkpoint_every": 150}},
)

# edge-data holds the daemon's outbox and seq counter: a new demo starts a new station.
OUTPUTS = (
    "data",
    "run",
    "bundle",
    "conveyor.avi",
    "conveyor.avi.truth.json",
    "edge.yaml",
    "verdicts.jsonl",
    "edge-data",
)
DEFECT_RATE = 0.3


@contextmanager
def _stage(key: str, title: str, timings: dict[str, float]) -> Iterator[None]:
    print(f"\n== {len(timings) + 1}/6 {title}", flush=True)
    started = time.monotonic()
    yield
    timings[key] = time.monotonic() - started
    print(f"   ({timings[key]:.0f} s)", flush=True)


def _broker_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _parse_broker(broker: str) -> tuple[str, int]:
    host, sep, port = broker.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise GanspectError(f"--broker must be HOST:PORT, got {broker!r}")
    return host, int(port)


def _clear_outputs(workdir: Path) -> None:
    for name in OUTPUTS:
        path = workdir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _write_edge_config(workdir: Path, bundle: Path, video: Path, broker: tuple[str, int] | None, window: bool) -> Path:
    host, port = broker if broker else ("127.0.0.1", 1883)
    config = {
        "station": {"site": "demo", "line": "line1", "station": "cam1"},
        "model": {"bundle": str(bundle.resolve())},
        "source": {"uri": str(video.resolve()), "name": "conveyor", **({"max_fps": 10} if window else {})},
        "mqtt": {"enabled": broker is not None, "host": host, "port": port, "prefix": "ganspect"},
        "display": {"window": "on" if window else "off"},
    }
    path = workdir / "edge.yaml"
    path.write_text("# written by `ganspect demo`\n" + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _frame_of(part_id: str) -> int:
    return int(part_id.rsplit(":", 1)[1])


def compare_with_truth(verdicts: list[dict[str, Any]], truth: list[Any]) -> dict[str, int]:
    """Count caught defective parts and rejected good parts (one frame per part)."""
    by_frame = {_frame_of(v["part_id"]): v["evaluation"]["state"] for v in verdicts}
    counts = {"parts": len(truth), "judged": 0, "defective": 0, "caught": 0, "good": 0, "rejected": 0}
    for part in truth:
        result = by_frame.get(part.frame_index)
        if result is None:
            continue
        counts["judged"] += 1
        if part.defect is None:
            counts["good"] += 1
            counts["rejected"] += result != "OK"  # NG or UNDEFINED: the part does not ship
        else:
            counts["defective"] += 1
            counts["caught"] += result != "OK"
    return counts


def _run_edge_daemon(config: Path, verdict_log: Path, window: bool) -> None:
    """The daemon as a line PC runs it, a subprocess, until the video ends."""
    command = [
        sys.executable,
        "-m",
        "ganspect.edge",
        "edge",
        "--config",
        str(config),
        "--verdict-log",
        str(verdict_log),
    ] + ([] if window else ["--headless"])
    edge = subprocess.run(command, check=False)
    if edge.returncode != 0:
        raise GanspectError(f"the edge daemon exited with code {edge.returncode}; see its messages above")


def _print_summary(
    metrics: dict[str, Any], tally: dict[str, int], verdicts_at: str, timings: dict[str, float], total: float
) -> None:
    print("\n== demo summary")
    print(
        f"   synthetic test set: image AUROC {metrics['image_auroc']:.3f}"
        + (f", pixel AUROC {metrics['pixel_auroc']:.3f}" if metrics.get("pixel_auroc") is not None else "")
    )
    print(
        f"   conveyor video: {tally['judged']}/{tally['parts']} parts judged by the edge daemon; "
        f"defective parts caught {tally['caught']}/{tally['defective']}, "
        f"good parts rejected {tally['rejected']}/{tally['good']}"
    )
    print(f"   verdicts: {verdicts_at}")
    print(f"   time: {total / 60:.1f} min (" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")")


def run_demo(workdir: Path, quick: bool, broker: str, headless: bool, seed: int) -> int:
    from ganspect.export.bundle import export_run
    from ganspect.train.config import config_from_dict
    from ganspect.train.evaluate import evaluate_run
    from ganspect.train.loop import train
    from ganspect.train.synth import read_conveyor_truth, synthesize_dataset, write_conveyor_video

    plan = QUICK if quick else FULL
    broker_address = _parse_broker(broker)
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    _clear_outputs(workdir)
    timings: dict[str, float] = {}
    started = time.monotonic()
    print(f"ganspect demo ({'quick' if quick else 'full'}) in {workdir}")

    data = workdir / "data"
    with _stage("synth", f"synthesize parts ({plan.size}x{plan.size}, {plan.n_train} good for training)", timings):
        counts = synthesize_dataset(
            data,
            size=plan.size,
            n_train=plan.n_train,
            n_test_good=plan.n_test_good,
            n_test_bad=plan.n_test_bad,
            seed=seed,
        )
        print("   " + ", ".join(f"{k}: {v}" for k, v in counts.items()))

    run = workdir / "run"
    with _stage("train", "train Efficient GAN", timings):
        overrides = {**plan.train_overrides, "train": {**plan.train_overrides.get("train", {}), "seed": seed}}
        train(config_from_dict(overrides, source="demo plan"), data=data, out=run)

    with _stage("eval", "evaluate on the synthetic test set", timings):
        metrics = evaluate_run(run, data=data, report=not quick)
        print(
            f"   image AUROC {metrics['image_auroc']:.3f}, AUPRC {metrics['image_auprc']:.3f}, "
            f"F1 {metrics['f1']:.3f} at threshold {metrics['threshold']:.4g} ({metrics['threshold_method']})"
        )
        if metrics.get("report"):
            print(f"   report with figures: {metrics['report']}")

    bundle = workdir / "bundle"
    with _stage("export", "export the ONNX bundle", timings):
        export_run(run, bundle)
        print(f"   {bundle}")

    video = workdir / "conveyor.avi"
    with _stage("video", f"write a conveyor video of {plan.n_parts} parts", timings):
        write_conveyor_video(video, n_parts=plan.n_parts, defect_rate=DEFECT_RATE, seed=seed + 1)
        truth = read_conveyor_truth(video)
        print(f"   {video} ({sum(p.defect is not None for p in truth)} defective)")

    broker_up = _broker_answers(*broker_address)
    window = not headless and display_available()
    verdict_log = workdir / "verdicts.jsonl"
    with _stage("edge", "run the edge daemon on the video", timings):
        if broker_up:
            print(f"   publishing verdicts to the MQTT broker at {broker} (topic ganspect/demo/line1/cam1/verdict)")
        else:
            print(
                f"   no MQTT broker answers at {broker}: verdicts go to {verdict_log.name} only "
                f"(start mosquitto to see them on MQTT)"
            )
        config = _write_edge_config(workdir, bundle, video, broker_address if broker_up else None, window)
        _run_edge_daemon(config, verdict_log, window)

    verdicts = [json.loads(line) for line in verdict_log.read_text(encoding="utf-8").splitlines() if line]
    tally = compare_with_truth(verdicts, truth)
    where = f"{verdict_log}" + (f" and MQTT at {broker}" if broker_up else "")
    _print_summary(metrics, tally, where, timings, time.monotonic() - started)
    return 0
