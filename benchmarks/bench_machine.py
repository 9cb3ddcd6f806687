"""The machine a run measured: CPU, flags, versions, load; and its float32 matrix-multiply peak.

The peak is what the inference figures are a fraction of. It is measured with
onnxruntime's own MatMul kernel (the engine the edge runs), at 1 thread and at all
threads, in the same run as the figures it is compared with.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

# Flags that decide which kernels onnxruntime can use: AVX2/FMA for FP32, VNNI (AVX-512 or
# AVX) for the INT8 dot products, AMX on the newest Xeons.
CPU_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
)
# Load per logical CPU above which we say the figures were taken on a busy machine.
BUSY_LOAD_PER_CPU = 0.5


@dataclass
class Machine:
    cpu_model: str
    logical_cpus: int
    usable_cpus: int  # in this process's affinity mask
    physical_cores: int | None
    flags: list[str]
    memory_gib: float | None
    kernel: str
    versions: dict[str, str]
    load_start: tuple[float, float, float]
    load_end: tuple[float, float, float] | None = None
    notes: list[str] = field(default_factory=list)

    def busy_at_start(self) -> bool:
        # Only the start: at the end the 1-minute average counts this run's own threads.
        return self.load_start[0] >= BUSY_LOAD_PER_CPU * self.logical_cpus


def _cpuinfo() -> dict[str, str]:
    """The first processor's block of /proc/cpuinfo (key -> value)."""
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return info
    for line in text.splitlines():
        if not line.strip():
            if info:
                break
            continue
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3  # type: ignore[return-value]


def _package_version(dist: str, module: str | None = None) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        pass
    if module:
        try:
            return str(getattr(import_module(module), "__version__", "installed, version unknown"))
        except ImportError:
            pass
    return "not installed"


def versions() -> dict[str, str]:
    out = {"Python": platform.python_version()}
    for label, dist, module in (
        ("ganspect", "ganspect", None),
        ("numpy", "numpy", "numpy"),
        ("onnxruntime", "onnxruntime", "onnxruntime"),
        ("onnx", "onnx", "onnx"),
        ("torch", "torch", "torch"),
        ("OpenCV", "opencv-python", "cv2"),
        ("paho-mqtt", "paho-mqtt", None),
    ):
        out[label] = _package_version(dist, module)
    return out


def describe_machine() -> Machine:
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    cores = info.get("cpu cores")
    return Machine(
        cpu_model=info.get("model name", platform.processor() or platform.machine()),
        logical_cpus=os.cpu_count() or 1,
        usable_cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
        physical_cores=int(cores) if cores and cores.isdigit() else None,
        flags=[f for f in CPU_FLAGS if f in flags],
        memory_gib=_memory_gib(),
        kernel=platform.release(),
        versions=versions(),
        load_start=load_average(),
    )


# ---------------------------------------------------------------------------------------
# Float32 matrix-multiply peak


@dataclass
class MatmulPeak:
    threads: int  # 1, or 0 = onnxruntime's default (all cores)
    n: int  # square size: (n x n) @ (n x n), 2 n^3 FLOP per run
    runs: int
    best_gflops: float  # the peak: the fastest run
    median_gflops: float


def _matmul_model(n: int) -> bytes:
    import onnx
    from onnx import TensorProto, helper

    # B is a constant weight, as in a model's Gemm/Conv: onnxruntime may pre-pack it once.
    rng = np.random.default_rng(0)
    b = helper.make_tensor("B", TensorProto.FLOAT, [n, n], rng.standard_normal((n, n), dtype=np.float32).ravel())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["Y"])],
        "matmul_peak",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n, n])],
        initializer=[b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def matmul_peak(threads: int, n: int = 1024, budget_s: float = 1.5, min_runs: int = 5) -> MatmulPeak:
    """GFLOP/s of onnxruntime's float32 MatMul at `threads` (0 = all): the machine's practical peak."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(_matmul_model(n), options, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    for _ in range(2):
        session.run(None, {"A": a})  # warm-up: thread pool, packing
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_runs or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        session.run(None, {"A": a})
        times.append(time.perf_counter() - t0)
    flop = 2.0 * n**3
    return MatmulPeak(
        threads=threads,
        n=n,
        runs=len(times),
        best_gflops=flop / min(times) / 1e9,
        median_gflops=flop / float(np.median(times)) / 1e9,
    )
