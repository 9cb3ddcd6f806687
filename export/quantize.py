"""INT8 static quantization (onnxruntime, QDQ, per-channel weights) and its accuracy guard.

What is quantized: the learned layers only, i.e. Conv, ConvTranspose, Gemm and MatMul nodes
whose weight is one of the model's parameters. The in-graph normalisation, the residual,
the Gaussian smoothing (a Conv whose weight is a buffer, not a parameter), the heatmap
scale and the score arithmetic stay in float: they are cheap, and 8 bits there would
cost exactly the small residual differences anomaly scores are made of.

Types: U8S8 (uint8 activations, int8 weights), no `reduce_range`. onnxruntime's x86 int8
kernels multiply u8 by s8; on CPUs with VNNI (AVX512-VNNI, AVX-VNNI) that is exact, on
AVX2 or AVX512 CPUs without VNNI the VPMADDUBSW instruction can saturate 16-bit pair sums,
which `reduce_range` (7-bit weights) avoids at some accuracy cost. The workstation this
was written on has AVX512-VNNI; pass `reduce_range=True` (`--int8-reduce-range`) when
the edge PC lacks VNNI. Either way the golden self-test at load catches a model that
computes differently on the edge CPU.

Calibration (MinMax) runs on normal *training* images, never on the held-out normals or
the test set. The guard then compares INT8 with FP32 on the guard images (held-out
normals, plus the data set's test images when it has them; the test images only measure
the guard, they choose nothing): AUROC drop when anomalies are present, Spearman rank
correlation of the scores, and OK/NG agreement, each model at its own threshold (the
INT8 threshold is chosen by the run's method on the INT8 scores: the same nu-quantile of
the held-out normals, or the same cut against the same painted copies or anomalies).
Sensitive layers are the first learned layers after the input and the last ones before
the outputs (for Efficient GAN: E's and D's first convolutions, G's output layer, D's
feature layer f_D; with a segmentation head, its first convolution and its output layer).
The convolutions among them stay in FP32 from the start: one to three channels on one
side at full resolution, where 8-bit kernels gain nothing and rounding costs most. When
the guard fails, quantization is retried with all sensitive layers kept in FP32.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader
from pydantic import BaseModel, ConfigDict, Field

from ganspect.edge.errors import GanspectError
from ganspect.export.onnx_export import INPUT_NAME, Outputs

log = logging.getLogger(__name__)

QUANTIZED_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class Int8Settings(BaseModel):
    """How the INT8 model is made and when it is refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reduce_range: bool = Field(False, description="7-bit weights for edge CPUs without VNNI (AVX2-only).")
    calibration_images: int = Field(64, ge=1, description="Normal training images the activation ranges come from.")
    max_auroc_drop: float = Field(
        0.01, ge=0.0, description="Refuse when INT8 image AUROC is lower than FP32's by more."
    )
    min_spearman: float = Field(0.95, ge=-1.0, le=1.0, description="Refuse when the score rank correlation is lower.")
    min_agreement: float = Field(
        0.95, ge=0.0, le=1.0, description="Refuse when fewer guard images get the same OK/NG from both models."
    )


@dataclass
class GuardData:
    """Images the guard compares the two models on, with labels (0 normal, 1 anomalous)."""

    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int (N,)
    n_holdout: int  # the first n_holdout images are the held-out normals (they set thresholds)
    description: str


@dataclass
class GuardResult:
    attempt: str
    fp32_nodes: list[str]  # learned layers kept in FP32 in this attempt
    int8_threshold: float
    spearman: float
    agreement: float
    fp32_auroc: float | None
    int8_auroc: float | None
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def auroc_drop(self) -> float | None:
        if self.fp32_auroc is None or self.int8_auroc is None:
            return None
        return self.fp32_auroc - self.int8_auroc


def learned_layers(proto: Any, parameter_names: Iterable[str]) -> list[str]:
    """Names of the nodes worth quantizing: Conv/ConvTranspose/Gemm/MatMul with a parameter as weight."""
    params = set(parameter_names)
    return [
        n.name for n in proto.graph.node if n.op_type in QUANTIZED_OP_TYPES and any(i in params for i in n.input[1:2])
    ]


def sensitive_layers(proto: Any, layers: Sequence[str]) -> list[str]:
    """Learned layers next to the graph's input or outputs (no other learned layer in between).

    Forward from the input: a learned layer that reads the input through float-only ops is a
    first layer. Backward from the outputs: one whose output reaches an output through
    float-only ops is a last layer (the generator's output layer, D's feature layer).
    """
    candidates = set(layers)
    nodes = list(proto.graph.node)  # ONNX requires topological order
    from_input = {i.name for i in proto.graph.input}
    first: list[str] = []
    for node in nodes:
        if any(t in from_input for t in node.input):
            if node.name in candidates:
                first.append(node.name)
            else:
                from_input.update(node.output)
    to_output = {o.name for o in proto.graph.output}
    last: list[str] = []
    for node in reversed(nodes):
        if any(t in to_output for t in node.output):
            if node.name in candidates:
                last.append(node.name)
            else:
                to_output.update(t for t in node.input if t)
    return list(dict.fromkeys(first + last[::-1]))


def describe_layers(proto: Any, names: Sequence[str]) -> list[str]:
    """'node (op, module path)' for a report, from the exporter's name-scope metadata when present."""
    by_name = {n.name: n for n in proto.graph.node}
    out = []
    for name in names:
        node = by_name[name]
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = meta.get("pkg.torch.onnx.name_scopes", "")
        module = ""
        if scopes:
            try:
                parts = [p.strip(" '\"") for p in scopes.strip("[]").split(",")]
                module = next((p for p in reversed(parts[:-1]) if p), "").removeprefix("scoring.")
            except (ValueError, IndexError):
                module = ""
        out.append(f"{name} ({node.op_type}{', ' + module if module else ''})")
    return out


class _ImageReader(CalibrationDataReader):
    """Calibration data for onnxruntime: uint8 NHWC images, a few at a time."""

    def __init__(self, images: np.ndarray, batch_size: int = 8) -> None:
        self._batches: Iterator[np.ndarray] = iter(
            [np.ascontiguousarray(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize(
    fp32_path: Path,
    out_path: Path,
    calibration_images: np.ndarray,
    layers: Sequence[str],
    keep_fp32: Sequence[str],
    settings: Int8Settings,
) -> Path:
    """Write the QDQ INT8 model of `fp32_path`, quantizing `layers` except `keep_fp32`."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    to_quantize = [n for n in layers if n not in set(keep_fp32)]
    if not to_quantize:
        raise GanspectError("no learned layer left to quantize")

    with tempfile.TemporaryDirectory(prefix="ganspect-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference only: onnxruntime's own optimisations would rename the nodes chosen above
        # (and it applies them anyway when it loads the model).
        quant_pre_process(str(fp32_path), str(prepared), skip_optimization=True, skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out_path),
            _ImageReader(calibration_images),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=settings.reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(QUANTIZED_OP_TYPES),
            nodes_to_quantize=to_quantize,
            calibration_providers=["CPUExecutionProvider"],
        )
    return out_path


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(labels)) < 2:
        return None
    return float(roc_auc_score(labels, scores))


def judge(  # noqa: PLR0913 — both models' outputs and thresholds, the data and limits they are judged on, and the attempt
    attempt: str,
    keep_fp32: list[str],
    data: GuardData,
    fp32: Outputs,
    fp32_threshold: float,
    int8: Outputs,
    nu: float,
    settings: Int8Settings,
    int8_threshold: float | None = None,
) -> GuardResult:
    """Compare the INT8 outputs with FP32's on the guard images; calibrate the INT8 threshold.

    `int8_threshold` is given when the threshold is not one of the guard images' (tiles
    of frames: the frame's score is its worst tile's, calibrated on whole frames).
    """
    from scipy.stats import spearmanr

    from ganspect.train.calibrate import normal_quantile_threshold

    if int8_threshold is None:
        int8_threshold = normal_quantile_threshold(int8.score[: data.n_holdout], nu)
    finite = bool(np.all(np.isfinite(int8.score)))
    if not finite:
        rho = float("nan")
    elif np.ptp(fp32.score) == 0 or np.ptp(int8.score) == 0:
        rho = 1.0 if np.array_equal(fp32.score, int8.score) else 0.0
    else:
        rho = float(spearmanr(fp32.score, int8.score).statistic)
    # Written so that NaN scores count as NG, as at the edge.
    agreement = float(np.mean((~(fp32.score <= fp32_threshold)) == (~(int8.score <= int8_threshold))))
    result = GuardResult(
        attempt=attempt,
        fp32_nodes=list(keep_fp32),
        int8_threshold=int8_threshold,
        spearman=rho,
        agreement=agreement,
        fp32_auroc=_auroc(data.labels, fp32.score),
        int8_auroc=_auroc(data.labels, int8.score) if finite else None,
    )
    if not finite:
        result.failures.append("INT8 scores are not all finite")
    drop = result.auroc_drop
    if drop is not None and drop > settings.max_auroc_drop:
        result.failures.append(
            f"image AUROC drops by {drop:.3f} ({result.fp32_auroc:.3f} -> {result.int8_auroc:.3f}; "
            f"limit {settings.max_auroc_drop:g})"
        )
    if not rho >= settings.min_spearman:
        result.failures.append(f"score rank correlation {rho:.3f} < {settings.min_spearman:g}")
    if not agreement >= settings.min_agreement:
        result.failures.append(f"OK/NG agreement {agreement:.1%} < {settings.min_agreement:.0%}")
    return result
