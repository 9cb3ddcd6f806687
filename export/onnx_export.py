"""ONNX export of a model's inference `forward`, and the PyTorch-vs-onnxruntime parity check.

The graph is the edge contract of ganspect.edge.manifest: input `image` uint8
(N, H, W, C) with a dynamic batch axis, outputs `score` (N,) and `heatmap` (N, H, W).
We use the dynamo exporter (torch.export based, torch's default since 2.9) with
`external_data=False` so that the bundle is one self-contained file.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ganspect.edge.errors import GanspectError

log = logging.getLogger(__name__)

OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAMES = ("score", "heatmap")


def export_onnx(model: torch.nn.Module, path: Path, image_size: int, channels: int, opset: int = OPSET) -> Path:
    """Export `model` (uint8 NHWC -> score, heatmap) to `path` with a dynamic batch axis."""
    import onnx

    model = model.eval().cpu()
    # Batch 2, not 1: the exporter may specialise a size-1 dimension to a constant.
    example = torch.zeros(2, image_size, image_size, channels, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    param = next(iter(_forward_params(model)))
    with torch.no_grad(), warnings.catch_warnings():
        # torch.export's internals warn about their own deprecations; nothing for the user to act on.
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            model, (example,), dynamo=True, external_data=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_shapes={param: {0: batch}}, optimize=True, verbose=False,
        )
    if program is None:
        raise GanspectError("the ONNX exporter returned no program")
    program.save(str(path), external_data=False)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    _check_interface(proto, image_size, channels)
    return Path(path)


def _forward_params(model: torch.nn.Module) -> list[str]:
    import inspect

    return list(inspect.signature(model.forward).parameters)


def _check_interface(proto: object, image_size: int, channels: int) -> None:
    """Fail loudly if the graph's names, types or shapes drift from the contract."""
    import onnx

    graph = proto.graph  # type: ignore[attr-defined]
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


def run_onnx(path: Path, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Score uint8 NHWC images with onnxruntime on CPU: (scores (N,), heatmaps (N, H, W))."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores, heatmaps = [], []
    for start in range(0, len(images), batch_size):
        s, h = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images[start:start + batch_size]})
        scores.append(s)
        heatmaps.append(h)
    return np.concatenate(scores), np.concatenate(heatmaps)


def run_torch(model: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    model = model.eval().cpu()
    scores, heatmaps = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            s, h = model(torch.from_numpy(images[start:start + batch_size]))
            scores.append(s.numpy())
            heatmaps.append(h.numpy())
    return np.concatenate(scores), np.concatenate(heatmaps)


@dataclass
class Parity:
    n_images: int
    max_abs_score_diff: float
    max_rel_score_diff: float
    max_abs_heatmap_diff: float
    ok: bool

    def to_dict(self) -> dict[str, float | int | bool]:
        return dict(self.__dict__)


def check_parity(model: torch.nn.Module, onnx_path: Path, images: np.ndarray,
                 rtol: float = 1e-3, atol: float = 1e-4, heatmap_atol: float = 1e-3) -> Parity:
    """Compare PyTorch and onnxruntime outputs on the same images (scores: rtol/atol; heatmaps: atol)."""
    ts, th = run_torch(model, images)
    os_, oh = run_onnx(onnx_path, images)
    if os_.shape != ts.shape or oh.shape != th.shape:
        raise GanspectError(f"ONNX output shapes {os_.shape}, {oh.shape} differ from PyTorch's {ts.shape}, {th.shape}")
    abs_diff = np.abs(os_ - ts)
    ok = bool(np.allclose(os_, ts, rtol=rtol, atol=atol) and np.allclose(oh, th, rtol=rtol, atol=heatmap_atol))
    return Parity(
        n_images=len(images),
        max_abs_score_diff=float(abs_diff.max(initial=0.0)),
        max_rel_score_diff=float((abs_diff / np.maximum(np.abs(ts), 1e-12)).max(initial=0.0)),
        max_abs_heatmap_diff=float(np.abs(oh - th).max(initial=0.0)),
        ok=ok,
    )
