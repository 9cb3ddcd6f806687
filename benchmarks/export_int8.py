"""FP32 vs INT8 of one bundle: batch-1 latency, file size, and test-set accuracy of each file.

    python benchmarks/export_int8.py BUNDLE DATA [--rounds 15] [--runs 20]

DATA is an MVTec-layout data set (the run's, or another of the same part). Latency is
measured in interleaved rounds (FP32, INT8, FP32, ...) so that load from other processes
on a shared machine falls on both files alike; the table gives the median over all timed
runs. With 1 thread onnxruntime computes on the calling thread, so that thread's CPU time per
run is also given: on a machine shared with other work it is close to what the run would
take on an idle core, where the wall-clock median is not. Accuracy: image AUROC on DATA's test set and recall / false-alarm rate at each
file's own threshold from the manifest. Prints a Markdown table; asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from ganspect.edge.manifest import load_bundle
from ganspect.export.onnx_export import INPUT_NAME, OUTPUT_NAMES, onnx_session, run_onnx
from ganspect.export.report import cpu_description
from ganspect.train.data import load_test_set


def _time_runs(session: Any, feed: dict[str, np.ndarray], runs: int) -> tuple[list[float], list[float]]:
    """Wall-clock and calling-thread CPU milliseconds per run."""
    wall, cpu = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.thread_time()
        session.run(list(OUTPUT_NAMES), feed)
        wall.append((time.perf_counter() - t0) * 1000.0)
        cpu.append((time.thread_time() - c0) * 1000.0)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per thread setting")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per file per round")
    args = parser.parse_args()

    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    test = load_test_set(args.data, m.input.height, m.input.channels)
    labels = np.asarray(test.labels).astype(int)
    feed = {INPUT_NAME: np.ascontiguousarray(test.images[:1])}

    print(f"bundle {args.bundle} ({m.name}, {m.input.height}x{m.input.width}x{m.input.channels})")
    print(f"machine: {cpu_description()}")
    print(f"test set: {args.data} ({(labels == 0).sum()} good, {(labels == 1).sum()} defective)\n")
    latency: dict[tuple[str, int], list[float]] = {}
    cpu_1_thread: dict[str, list[float]] = {}
    for threads in (1, 0):
        sessions = {f.precision: onnx_session(bundle.path_of(f), threads) for f in m.files}
        for session in sessions.values():
            _time_runs(session, feed, 5)  # warm-up
        for _ in range(args.rounds):
            for precision, session in sessions.items():
                wall, cpu = _time_runs(session, feed, args.runs)
                latency.setdefault((precision, threads), []).extend(wall)
                if threads == 1:
                    cpu_1_thread.setdefault(precision, []).extend(cpu)

    print(
        "| file | size | 1 thread median (p90) | 1 thread CPU time median | all threads median (p90) | "
        "image AUROC | threshold | recall | false alarms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    medians = {}
    for f in m.files:
        scores = run_onnx(bundle.path_of(f), test.images).score
        auroc = roc_auc_score(labels, scores)
        ng = scores > f.threshold
        cells = []
        for threads in (1, 0):
            t = np.asarray(latency[(f.precision, threads)])
            medians[(f.precision, threads)] = float(np.median(t))
            cells.append(f"{np.median(t):.2f} ms ({np.percentile(t, 90):.2f})")
        cpu_ms = float(np.median(cpu_1_thread[f.precision]))
        medians[(f.precision, "cpu")] = cpu_ms
        print(
            f"| {f.path} | {f.bytes / 1e6:.2f} MB | {cells[0]} | {cpu_ms:.2f} ms | {cells[1]} | {auroc:.4f} | "
            f"{f.threshold:.5g} | "
            f"{ng[labels == 1].mean():.1%} | {ng[labels == 0].mean():.1%} |"
        )
    if ("int8", 1) in medians:
        print(
            f"\nINT8 speed-up: {medians[('fp32', 1)] / medians[('int8', 1)]:.2f}x with 1 thread "
            f"({medians[('fp32', 'cpu')] / medians[('int8', 'cpu')]:.2f}x in CPU time), "
            f"{medians[('fp32', 0)] / medians[('int8', 0)]:.2f}x with all threads"
        )


if __name__ == "__main__":
    main()
