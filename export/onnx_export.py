"""ONNX export of a scoring module, and the PyTorch-vs-onnxruntime parity check.

The graph is the edge contract of ganspect.edge.manifest: input `image` uint8
(N, H, W, C) with a dynamic batch axis, outputs `score` (N,), `heatmap` (N, H, W) and
`peak` (N, 2) int64 (see ganspect.export.graph). We use the dynamo exporter (torch.export
based, torch's default since 2.9) with `external_data=False` so that the bundle is one
self-contained file.

Parity tolerances (PyTorch eval vs onnxruntime FP32, same images): scores within
rtol 1e-3 / atol 1e-4, heatmaps within atol 1e-3 (+ rtol 1e-3), and peaks identical
except where the two positions are a tie in PyTorch's heatmap (within the heatmap atol).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ganspect.edge.errors import GanspectError
from ganspect.export.graph import EdgeGraph, inference_copy

if TYPE_CHECKING:  # imported where used: loading this module must not pull them in
    import onnx
    import onnxruntime

log = logging.getLogger(__name__)

OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAMES = ("score", "heatmap", "peak")


def export_onnx(model: torch.nn.Module, path: Path, image_size: int, channels: int, opset: int = OPSET) -> Path:
    """Export a scoring module (uint8 NHWC -> score, heatmap) as the edge graph (+ peak), dynamic batch axis."""
    import onnx

    model = EdgeGraph(inference_copy(model)).eval()
    # Batch 2, not 1: the exporter may specialise a size-1 dimension to a constant.
    example = torch.zeros(2, image_size, image_size, channels, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    param = next(iter(_forward_params(model)))
    with torch.no_grad(), warnings.catch_warnings():
        # torch.export's internals warn about their own deprecations; nothing for the user to act on.
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            external_data=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={param: {0: batch}},
            optimize=True,
            verbose=False,
        )
    if program is None:
        raise GanspectError("the ONNX exporter returned no program")
    program.save(str(path), external_data=False)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    _check_interface(proto, image_size, channels)
    return Path(path)


def parameter_names(model: torch.nn.Module) -> list[str]:
    """Parameter names as they appear as initializers in the exported graph (the learned weights)."""
    return [name for name, _ in EdgeGraph(inference_copy(model)).named_parameters()]


def _forward_params(model: torch.nn.Module) -> list[str]:
    import inspect

    return list(inspect.signature(model.forward).parameters)


def _check_interface(proto: onnx.ModelProto, image_size: int, channels: int) -> None:
    """Fail loudly if the graph's names, types or shapes drift from the contract."""
    import onnx

    graph = proto.graph
    inputs = [i for i in graph.input]
    if [i.name for i in inputs] != [INPUT_NAME]:
        raise GanspectError(f"exported graph has inputs {[i.name for i in inputs]}, expected ['{INPUT_NAME}']")
    t = inputs[0].type.tensor_type
    if t.elem_type != onnx.TensorProto.UINT8:
        raise GanspectError("exported graph input is not uint8")
    dims = [d.dim_param or d.dim_value for d in t.shape.dim]
    if not isinstance(dims[0], str) or dims[1:] != [image_size, image_size, channels]:
        raise GanspectError(f"exported graph input shape {dims} is not (batch, {image_size}, {image_size}, {channels})")
    if [o.name for o in graph.output] != list(OUTPUT_NAMES):
        raise GanspectError(f"exported graph outputs {[o.name for o in graph.output]}, expected {list(OUTPUT_NAMES)}")


def opset_of(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


@dataclass
class Outputs:
    """The graph's three outputs for a set of images."""

    score: np.ndarray  # (N,) float32
    heatmap: np.ndarray  # (N, H, W) float32
    peak: np.ndarray  # (N, 2) int64 (row, column)


def _concat(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Outputs:
    return Outputs(*(np.concatenate([p[i] for p in parts]) for i in range(3)))


def onnx_session(path: Path, threads: int = 0) -> onnxruntime.InferenceSession:
    """A CPU onnxruntime session; `threads` 0 = onnxruntime's default (all cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, images: np.ndarray, batch_size: int = 64) -> Outputs:
    """Score uint8 NHWC images with onnxruntime on CPU."""
    session = onnx_session(path)
    return _concat(
        [
            tuple(session.run(list(OUTPUT_NAMES), {INPUT_NAME: images[i : i + batch_size]}))
            for i in range(0, len(images), batch_size)
        ]
    )


def run_torch(model: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> Outputs:
    """Score with the PyTorch scoring module in eval mode, wrapped exactly as it is exported."""
    graph = EdgeGraph(model.eval().cpu())
    parts = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            s, h, p = graph(torch.from_numpy(images[start : start + batch_size]))
            parts.append((s.numpy(), h.numpy(), p.numpy()))
    return _concat(parts)


@dataclass
class Parity:
    """How far one set of outputs is from a reference set on the same images."""

    n_images: int
    max_abs_score_diff: float
    max_rel_score_diff: float
    median_rel_score_diff: float
    p95_rel_score_diff: float
    max_abs_heatmap_diff: float
    peak_agreement: float  # share of images with the very same peak position
    max_peak_distance: float  # pixels, largest distance between the two peaks
    ok: bool

    def to_dict(self) -> dict[str, float | int | bool]:
        return dict(self.__dict__)


def compare(
    reference: Outputs, other: Outputs, rtol: float = 1e-3, atol: float = 1e-4, heatmap_atol: float = 1e-3
) -> Parity:
    """Compare outputs: scores (rtol/atol), heatmaps (atol), peaks (equal or a tie in the reference heatmap)."""
    if (
        other.score.shape != reference.score.shape
        or other.heatmap.shape != reference.heatmap.shape
        or other.peak.shape != reference.peak.shape
    ):
        raise GanspectError(
            f"output shapes {other.score.shape}, {other.heatmap.shape}, {other.peak.shape} differ from "
            f"{reference.score.shape}, {reference.heatmap.shape}, {reference.peak.shape}"
        )
    abs_diff = np.abs(other.score - reference.score)
    rel_diff = abs_diff / np.maximum(np.abs(reference.score), 1e-12)
    rows = np.arange(len(reference.peak))
    same_peak = np.all(other.peak == reference.peak, axis=1)
    # Where the peaks differ, the reference heatmap must hold (nearly) its maximum at the other's peak too.
    at_other = reference.heatmap[rows, other.peak[:, 0], other.peak[:, 1]] if len(rows) else np.zeros(0)
    at_ref = reference.heatmap[rows, reference.peak[:, 0], reference.peak[:, 1]] if len(rows) else np.zeros(0)
    peaks_tie = same_peak | (np.abs(at_ref - at_other) <= heatmap_atol)
    distance = np.hypot(*(other.peak - reference.peak).T.astype(np.float64)) if len(rows) else np.zeros(0)
    ok = bool(
        np.allclose(other.score, reference.score, rtol=rtol, atol=atol)
        and np.allclose(other.heatmap, reference.heatmap, rtol=rtol, atol=heatmap_atol)
        and peaks_tie.all()
    )
    return Parity(
        n_images=len(reference.score),
        max_abs_score_diff=float(abs_diff.max(initial=0.0)),
        max_rel_score_diff=float(rel_diff.max(initial=0.0)),
        median_rel_score_diff=float(np.median(rel_diff)) if len(rows) else 0.0,
        p95_rel_score_diff=float(np.percentile(rel_diff, 95)) if len(rows) else 0.0,
        max_abs_heatmap_diff=float(np.abs(other.heatmap - reference.heatmap).max(initial=0.0)),
        peak_agreement=float(same_peak.mean()) if len(rows) else 1.0,
        max_peak_distance=float(distance.max(initial=0.0)),
        ok=ok,
    )


def check_parity(
    model: torch.nn.Module,
    onnx_path: Path,
    images: np.ndarray,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    heatmap_atol: float = 1e-3,
) -> Parity:
    """Compare PyTorch (eval) and onnxruntime FP32 outputs on the same images, with the module's tolerances."""
    return compare(run_torch(model, images), run_onnx(onnx_path, images), rtol, atol, heatmap_atol)
