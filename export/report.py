"""Latency measurement and the bundle's `export_report.md`.

Latency is batch 1 (one frame, as on the line), median and 90th percentile of timed
`session.run` calls after a warm-up, with 1 intra-op thread and with all cores. The
figures describe the machine that exported, which is named in the report; the edge PC
has its own (`ganspect edge` logs its per-stage timings).
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ganspect.export.onnx_export import INPUT_NAME, OUTPUT_NAMES, Parity, onnx_session
from ganspect.export.quantize import GuardResult, Int8Settings


@dataclass
class Latency:
    threads: int
    median_ms: float
    p90_ms: float
    runs: int


def measure_latency(path: Path, image: np.ndarray, threads: int, min_runs: int = 20, budget_s: float = 2.0) -> Latency:
    """Batch-1 latency of `session.run` on `image` (H, W, C) uint8; `threads` 0 = all cores."""
    session: Any = onnx_session(path, threads)
    feed = {INPUT_NAME: np.ascontiguousarray(image[None])}
    for _ in range(3):
        session.run(list(OUTPUT_NAMES), feed)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - started < budget_s and len(times) < 500):
        t0 = time.perf_counter()
        session.run(list(OUTPUT_NAMES), feed)
        times.append((time.perf_counter() - t0) * 1000.0)
    return Latency(
        threads=threads or (os.cpu_count() or 1),
        median_ms=float(np.median(times)),
        p90_ms=float(np.percentile(times, 90)),
        runs=len(times),
    )


def cpu_description() -> str:
    name = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name") and name in ("", platform.machine()):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    vnni = "VNNI" if flags & {"avx512_vnni", "avx_vnni"} else ("AVX2, no VNNI" if "avx2" in flags else "no AVX2")
    return f"{name}, {os.cpu_count()} logical CPUs, {vnni}"


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def _parity_row(label: str, p: Parity) -> str:
    gate = ("yes" if p.ok else "no") if "INT8" not in label else "n/a (the guard decides)"
    return (
        f"| {label} | {p.n_images} | {p.max_abs_score_diff:.2e} | {p.median_rel_score_diff:.2e} / "
        f"{p.p95_rel_score_diff:.2e} / {p.max_rel_score_diff:.2e} | {p.max_abs_heatmap_diff:.2e} | "
        f"{p.peak_agreement:.0%} | {p.max_peak_distance:.1f} | {gate} |"
    )


@dataclass(frozen=True, kw_only=True)
class ExportFigures:
    """Everything one export measured, as `export_report.md` presents it.

    `files` maps each ONNX file to its size in bytes, in the bundle's order (FP32 first);
    `guard`, `guard_data` and `settings` are None without --int8.
    """

    name: str
    kind: str
    image_size: int
    channels: int
    files: dict[str, int]
    thresholds: dict[str, float]
    latency: dict[str, list[Latency]]
    parity: dict[str, Parity]
    parity_images: str
    guard: list[GuardResult] | None
    guard_data: str | None
    settings: Int8Settings | None
    forced: bool
    golden: list[str]


def _files_section(r: ExportFigures) -> list[str]:
    lines = [
        "## Files and latency",
        "",
        "Batch 1, median (90th percentile) of `session.run` after warm-up.",
        "",
        "| file | size | threshold | 1 thread | all threads |",
        "|---|---|---|---|---|",
    ]
    for file_name, size in r.files.items():
        lat = {lt.threads == 1: lt for lt in r.latency[file_name]}
        one, many = lat.get(True), lat.get(False)
        lines.append(
            f"| {file_name} | {size / 1e6:.2f} MB | {r.thresholds[file_name]:.5g} | "
            f"{_fmt(one.median_ms if one else None, '.2f')} ms ({_fmt(one.p90_ms if one else None, '.2f')}) | "
            f"{_fmt(many.median_ms if many else None, '.2f')} ms ({_fmt(many.p90_ms if many else None, '.2f')}), "
            f"{many.threads if many else '?'} threads |"
        )
    if len(r.files) == 2:
        fp32, int8 = (r.latency[f] for f in r.files)
        speedups = [f"{a.median_ms / b.median_ms:.2f}x with {a.threads} thread(s)" for a, b in zip(fp32, int8)]
        lines += ["", f"INT8 speed-up over FP32: {', '.join(speedups)}."]
    return lines


def _parity_section(r: ExportFigures) -> list[str]:
    lines = [
        "## Parity",
        "",
        f"Images: {r.parity_images}.",
        "",
        "Tolerances (the export gate): PyTorch vs ONNX FP32 scores within rtol 1e-3 + atol 1e-4, heatmaps "
        "within atol 1e-3, peaks equal or tied (within 1e-3) in the reference heatmap. INT8 rounds every "
        "learned layer's activations to 8 bits, so its figures are reported and the accuracy guard below "
        "decides. On a flat normal heatmap the peak may move far between near-equal pixels.",
        "",
        "| comparison | images | max abs score diff | rel score diff median / p95 / max | "
        "max abs heatmap diff | same peak | max peak distance (px) | within FP32 tolerances |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return lines + [_parity_row(label, p) for label, p in r.parity.items()]


def _guard_section(guard: list[GuardResult], settings: Int8Settings, guard_data: str | None, forced: bool) -> list[str]:
    final = guard[-1]
    verdict = "passed" if final.ok else ("FAILED, shipped because of --force" if forced else "FAILED")
    lines = [
        "## INT8 accuracy guard",
        "",
        f"Guard images: {guard_data}.",
        "",
        f"Limits: AUROC drop <= {settings.max_auroc_drop:g}, Spearman rho >= {settings.min_spearman:g}, "
        f"OK/NG agreement >= {settings.min_agreement:.0%} (each model at its own threshold). "
        f"Quantization: QDQ, U8S8, per-channel weights, reduce_range={settings.reduce_range}, MinMax "
        f"calibration on {settings.calibration_images} normal training images at most.",
        "",
        "| attempt | layers kept in FP32 | INT8 threshold | AUROC FP32 | AUROC INT8 | Spearman | agreement | result |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in guard:
        lines.append(
            f"| {g.attempt} | {len(g.fp32_nodes)} | {g.int8_threshold:.5g} | {_fmt(g.fp32_auroc)} | "
            f"{_fmt(g.int8_auroc)} | {g.spearman:.4f} | {g.agreement:.1%} | "
            f"{'pass' if g.ok else '; '.join(g.failures)} |"
        )
    lines += ["", f"Result: **{verdict}** ({final.attempt})."]
    if final.fp32_nodes:
        lines += ["", "Layers kept in FP32:", ""] + [f"- {n}" for n in final.fp32_nodes]
    return lines


def _golden_section(golden: list[str]) -> list[str]:
    return [
        "## Golden images",
        "",
        "The edge scores these at load and refuses the bundle when a file's outputs differ from the "
        "recorded ones by more than its tolerance (in manifest.json).",
        "",
        *(f"- {g}" for g in golden),
    ]


def write_report(path: Path, figures: ExportFigures) -> Path:
    """Write the Markdown export report; every figure in it was measured by this export."""
    r = figures
    lines = [
        f"# Export report: {r.name}",
        "",
        f"- model kind: {r.kind}, input {r.image_size}x{r.image_size}x{r.channels} uint8 NHWC",
        f"- exported on: {cpu_description()}, onnxruntime CPU execution provider",
        "",
        *_files_section(r),
        "",
        *_parity_section(r),
    ]
    if r.guard is not None and r.settings is not None:
        lines += ["", *_guard_section(r.guard, r.settings, r.guard_data, r.forced)]
    lines += ["", *_golden_section(r.golden)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
