"""Inference: ms per image of each bundle file, batch 1, at 1 thread and at all threads.

The session is opened with the edge scorer's options (ganspect.edge.scorer.Scorer.load:
`intra_op_num_threads`, one inter-op thread, every graph optimisation), and fed one
synthetic part at the model's size, as the edge feeds a frame after its preprocessing;
every output of the graph is fetched, as the edge does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_stats import Budget, Stats, time_calls


@dataclass
class InferenceFigure:
    label: str  # model label (kind, size, colour)
    kind: str
    size: int
    channels: int
    precision: str
    threads: int  # 1, or 0 = all
    ms: Stats
    macs: int  # per image
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


def _part_lookup(path: Path) -> Callable[[str, str], str]:
    """Map a profiled node (name, op type) to the network part whose weights it uses (bench_models.PARTS).

    onnxruntime renames the nodes it fuses or re-lays out (`<name>_token_N`, `<output>_nchwc`;
    a Conv fused with its activation takes the activation's output name), so a name is tried
    as a node name and as an output name, and a weighted op found as its activation is traced
    back to the node that feeds it.
    """
    import re

    import onnx

    from benchmarks.bench_models import node_part

    graph = onnx.load(str(path)).graph
    by_name: dict[str, Any] = {}
    producer: dict[str, Any] = {}
    for node in graph.node:
        by_name[node.name] = node
        for out in node.output:
            producer[out] = node

    def part(name: str, op: str) -> str:
        weighted = any(k in op for k in ("Conv", "Gemm", "MatMul"))
        for candidate in (name, re.sub(r"(_token_\d+|_nchwc)+$", "", name)):
            node = by_name.get(candidate) or by_name.get(f"node_{candidate}") or producer.get(candidate)
            for _ in range(3 if weighted else 1):
                if node is None:
                    break
                found = node_part(node)
                if found:
                    return found
                node = producer.get(node.input[0]) if node.input else None
        return "elementwise and other"

    return part


@dataclass
class Profile:
    label: str
    precision: str
    by_op: dict[str, float]  # ms per image by ONNX op type
    by_part: dict[str, float]  # ms per image by network part


def op_profile(
    path: Path, image: np.ndarray, threads: int, runs: int = 20
) -> tuple[dict[str, float], dict[str, float]]:
    """Where a `session.run` spends its time: ms per image by op type and by network part (onnxruntime's profiler)."""
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
    part_of = _part_lookup(path)
    by_op: dict[str, float] = {}
    by_part: dict[str, float] = {}
    node_events = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    for event in node_events[len(node_events) * 3 // (3 + runs) :]:  # the timed runs only, not the warm-up
        op = event.get("args", {}).get("op_name", "?")
        ms = float(event.get("dur", 0)) / 1000.0 / runs
        by_op[op] = by_op.get(op, 0.0) + ms
        part = part_of(event["name"][: -len("_kernel_time")], op)
        by_part[part] = by_part.get(part, 0.0) + ms
    ordered = lambda d: dict(sorted(d.items(), key=lambda kv: -kv[1]))  # noqa: E731
    return ordered(by_op), ordered(by_part)
