"""Inference: ms per image of each bundle file, batch 1, at 1 thread and at all threads.

The session is opened with the edge scorer's options (ganspect.edge.scorer.Scorer.load:
`intra_op_num_threads`, one inter-op thread, every graph optimisation), and fed one
synthetic part at the model's size, as the edge feeds a frame after its preprocessing;
every output of the graph is fetched, as the edge does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.bench_stats import Budget, Stats, time_calls


@dataclass
class InferenceFigure:
    label: str               # model label (kind, size, colour)
    kind: str
    size: int
    channels: int
    precision: str
    threads: int             # 1, or 0 = all
    ms: Stats
    macs: int                # per image
    file_bytes: int

    @property
    def gflops(self) -> float:
        """Achieved GFLOP/s at the median (2 FLOP per multiply-accumulate)."""
        return 2.0 * self.macs / (self.ms.median / 1000.0) / 1e9


def open_session(path: Path, threads: int) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def time_file(path: Path, image: np.ndarray, threads: int, budget: Budget) -> Stats:
    """ms per `session.run` of one uint8 (H, W, C) image, all outputs fetched."""
    session = open_session(path, threads)
    name = session.get_inputs()[0].name  # type: ignore[attr-defined]
    feed = {name: np.ascontiguousarray(image[None])}
    return time_calls(lambda: session.run(None, feed), budget)  # type: ignore[attr-defined]


def op_profile(path: Path, image: np.ndarray, threads: int, runs: int = 20) -> dict[str, float]:
    """Where a `session.run` spends its time: ms per image by ONNX op type (onnxruntime's profiler)."""
    import json

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(path.parent / f"ort-profile-{path.stem}")
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(image[None])}
    for _ in range(3 + runs):
        session.run(None, feed)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text(encoding="utf-8"))
    trace.unlink(missing_ok=True)
    per_op: dict[str, float] = {}
    node_events = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    for event in node_events[len(node_events) * 3 // (3 + runs):]:  # the timed runs only, not the warm-up
        op = event.get("args", {}).get("op_name", "?")
        per_op[op] = per_op.get(op, 0.0) + float(event.get("dur", 0)) / 1000.0 / runs
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))
