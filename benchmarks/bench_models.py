"""The models the speed figures are measured on, built through the project's own paths.

Speed does not depend on what a model has learned, so the models are untrained: the
trainer's `train()` runs one optimisation step from its random initialisation on a few
synthetic parts (which gives a real run folder: config, checkpoint, calibration), and the
exporter's `export_run()` turns it into the same bundle the edge runs, with INT8
calibrated on those synthetic parts when the exporter can quantize.

`MODEL_KINDS` and `PRECISIONS` are the seams where the trainer's AnoGAN and the
exporter's INT8 plug in: a kind or precision this build cannot make is reported as "not
available in this build: <why>", never faked.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TRAIN_CONFIG_DIR = REPO / "configs" / "train"

# kind -> (label in RESULTS.md, the `--set` overrides that make the trainer build it)
MODEL_KINDS: dict[str, tuple[str, list[str]]] = {
    "efficient_gan": ("Efficient GAN (E, G and D in one graph)", ["model.kind=efficient_gan"]),
    # AnoGAN's edge graph is its one-pass encoder (f-AnoGAN izi_f) + G + D's features.
    "anogan": ("AnoGAN, one-pass encoder", ["model.kind=anogan", "anogan.encoder_steps=1"]),
}
# precision -> the bundle's file for it (ganspect.edge.manifest)
PRECISIONS: dict[str, str] = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
# Ops whose multiply-accumulates we count; the rest (normalisation, activations,
# residual arithmetic) are memory-bound and a small share of the work.
COUNTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    kind: str
    size: int
    channels: int
    overrides: tuple[str, ...] = ()  # extra `--set` settings of a variant (a lever), e.g. model.base_width=8

    @property
    def colour(self) -> str:
        return "colour" if self.channels == 3 else "gray"

    @property
    def variant(self) -> str:
        return ", ".join(self.overrides)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.size}x{self.size} {self.colour}" + (f" ({self.variant})" if self.overrides else "")

    @property
    def folder(self) -> str:
        extra = "".join("-" + "".join(c if c.isalnum() else "_" for c in o) for o in self.overrides)
        return f"{self.kind}-{self.size}-{self.colour}{extra}"


@dataclass
class BuiltModel:
    spec: ModelSpec
    bundle: Path | None
    files: dict[str, Path] = field(default_factory=dict)  # precision -> ONNX file
    unavailable: dict[str, str] = field(default_factory=dict)  # precision -> why not
    build_s: float = 0.0
    params: int | None = None  # learned weights in the FP32 graph
    macs_by_part: dict[str, int] = field(default_factory=dict)  # encoder, generator, discriminator, ...
    notes: list[str] = field(default_factory=list)


def base_config(kind: str) -> Path:
    """The repository's training config for `kind` (its own file when there is one)."""
    own = TRAIN_CONFIG_DIR / f"{kind}.yaml"
    return own if own.is_file() else TRAIN_CONFIG_DIR / "efficient_gan.yaml"


def synthetic_parts(
    root: Path, size: int, n_train: int = 16, n_test_good: int = 4, n_test_bad: int = 4, seed: int = 0
) -> Path:
    """A small MVTec-layout set of synthetic washers at `size` (written once per folder)."""
    from ganspect.train.synth import synthesize_dataset

    out = root / f"parts-{size}"
    done = out / ".complete"
    if not done.is_file():
        synthesize_dataset(out, size, n_train=n_train, n_test_good=n_test_good, n_test_bad=n_test_bad, seed=seed)
        done.write_text("synthesized by benchmarks\n", encoding="utf-8")
    return out


def part_image(data: Path, channels: int) -> np.ndarray:
    """One synthetic part from `data`'s test set as the edge hands it to the graph: uint8 (H, W, C)."""
    import cv2

    path = sorted((data / "test" / "good").glob("*.png"))[0]
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR)
    return np.ascontiguousarray(image[..., None] if channels == 1 else image)


def int8_unavailable_reason() -> str | None:
    """None when `export_run` can quantize, else why not (the exporter of this build)."""
    from ganspect.export.bundle import export_run

    if "int8" not in inspect.signature(export_run).parameters:
        return (
            "not available in this build: the exporter has no INT8 quantization yet (`ganspect export --int8`, issue 4)"
        )
    return None


def quietly() -> contextlib.ExitStack:
    """Silence progress bars and INFO logs of the trainer and exporter while they build throwaway models."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    stack.callback(logging.disable, previous)
    return stack


def build_model(spec: ModelSpec, work: Path, data: Path, latency_budget_s: float = 0.05) -> BuiltModel:
    """Train `spec` for one step (an untrained model) and export it, INT8 too when the exporter can."""
    from ganspect.edge.errors import GanspectError
    from ganspect.export.bundle import export_run
    from ganspect.train.config import load_train_config
    from ganspect.train.loop import train

    built = BuiltModel(spec=spec, bundle=None)
    _label, kind_overrides = MODEL_KINDS[spec.kind]
    overrides = [
        *kind_overrides,
        f"model.image_size={spec.size}",
        f"model.channels={spec.channels}",
        "train.steps=1",
        "train.batch_size=2",
        "train.seed=0",
        "train.device=cpu",
        *spec.overrides,
    ]
    started = time.perf_counter()
    try:
        config = load_train_config(base_config(spec.kind), overrides)
    except GanspectError as exc:
        # The message starts with the config file's path; what it says about the keys is what matters.
        reason = f"not available in this build: the trainer does not accept it ({str(exc).split(': ', 1)[-1]})"
        built.unavailable = {p: reason for p in PRECISIONS}
        return built
    run = work / "runs" / spec.folder
    bundle = work / "bundles" / run.name
    int8_reason = int8_unavailable_reason()
    kwargs: dict[str, Any] = {}
    params = inspect.signature(export_run).parameters
    if int8_reason is None:
        # The guard judges accuracy, which an untrained model has none of: force keeps the
        # INT8 file for its speed, and RESULTS.md takes accuracy from trained runs only.
        kwargs.update(int8=True, force=True)
    if "latency_budget_s" in params:
        kwargs["latency_budget_s"] = latency_budget_s  # we time the files ourselves
    try:
        # Always a fresh run: a run folder left in --workdir may hold an older architecture.
        shutil.rmtree(run, ignore_errors=True)
        with quietly():
            train(config, data, run)
            export_run(run, bundle, **kwargs)
    except Exception as exc:  # any failure of a piece under construction becomes a row that says so
        reason = f"not available in this build: building it failed ({type(exc).__name__}: {str(exc).strip()[:200]})"
        built.unavailable = {p: reason for p in PRECISIONS}
        return built
    built.bundle = bundle
    built.build_s = time.perf_counter() - started
    for precision, name in PRECISIONS.items():
        if (bundle / name).is_file():
            built.files[precision] = bundle / name
        elif precision == "int8":
            built.unavailable[precision] = int8_reason or "the exporter wrote no INT8 file"
        else:
            built.unavailable[precision] = f"the exporter wrote no {name}"
    if "fp32" in built.files:
        built.params = parameter_count(built.files["fp32"])
        built.macs_by_part = graph_macs(built.files["fp32"], by="part")
    if "int8" in built.files:
        built.notes.append("INT8 exported with --force: the accuracy guard cannot pass on an untrained model")
    return built


# ---------------------------------------------------------------------------------------
# Multiply-accumulates from the graph


def _shapes(model: Any) -> dict[str, list[int | None]]:
    """Every tensor's shape after onnx shape inference; symbolic dimensions (the batch) as None."""
    graph = model.graph
    shapes: dict[str, list[int | None]] = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = list(attr.t.dims)
    return shapes


def _numel(shape: list[int | None]) -> int:
    # A symbolic dimension is the batch: one image.
    return int(np.prod([d if d else 1 for d in shape])) if shape else 1


# Network parts, recognised in the names of the weights a node multiplies by (the
# exporter keeps the PyTorch module paths, e.g. `scoring.encoder.net.0.weight`).
PARTS = ("encoder", "generator", "discriminator", "smooth")


def node_part(node: Any) -> str | None:
    """The network part a node's weights belong to, from their names or, where the exporter folded
    them into an anonymous constant (spectral norm), from the node's module path metadata."""
    for text in [*node.input, *(p.value for p in node.metadata_props if p.key == "namespace")]:
        found = next((p for p in PARTS if p in text), None)
        if found:
            return found
    return None


def graph_macs(path: Path, by: str = "op") -> dict[str, int]:
    """Multiply-accumulates per image (batch 1) by op type (`by="op"`) or network part (`"part"`).

    Conv: each output element takes C_in/groups * kH * kW MACs. ConvTranspose: each input
    element is scattered to C_out/groups * kH * kW outputs. Gemm/MatMul: M * N * K.
    """
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = _shapes(model)
    macs = {op: 0 for op in COUNTED_OPS} if by == "op" else {part: 0 for part in (*PARTS, "other")}
    unknown = 0
    for node in model.graph.node:
        if node.op_type not in COUNTED_OPS:
            continue
        key = node.op_type if by == "op" else (node_part(node) or "other")
        try:
            if node.op_type == "Conv":
                w = shapes[node.input[1]]  # (C_out, C_in/groups, kH, kW)
                macs[key] += _numel(shapes[node.output[0]]) * _numel(w[1:])
            elif node.op_type == "ConvTranspose":
                w = shapes[node.input[1]]  # (C_in, C_out/groups, kH, kW)
                macs[key] += _numel(shapes[node.input[0]]) * _numel(w[1:])
            else:
                a, out = shapes[node.input[0]], shapes[node.output[0]]
                k = a[-1]
                trans_a = any(attr.name == "transA" and attr.i for attr in node.attribute)
                if node.op_type == "Gemm" and trans_a:
                    k = a[0]
                macs[key] += _numel(out) * int(k or 1)
        except (KeyError, IndexError):
            unknown += 1
    if unknown:
        log.warning("%s: %d counted op(s) without inferred shapes are left out of the MACs", path, unknown)
    return macs


def parameter_count(path: Path) -> int:
    import onnx

    model = onnx.load(str(path))
    return int(sum(_numel(list(init.dims)) for init in model.graph.initializer))
