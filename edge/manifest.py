"""The model bundle: the contract between the workstation and the edge.

A bundle is a folder with one or more ONNX files and `manifest.json`. The exporter
writes the manifest through this module and the edge reads it through this module, so
the two cannot disagree about a field. This module imports neither torch nor
onnxruntime: it only validates JSON and hashes files.

The ONNX graph's interface (fixed by format version 2):

- input `image`: uint8, shape (N, H, W, C), layout NHWC, pixels exactly as the edge hands
  them over after resizing to (W, H) with `input.resize_interpolation`; C = 1 for `GRAY`,
  3 for `BGR` (OpenCV's order). Normalisation happens inside the graph.
- output `score`: float32, shape (N,): the anomaly score, higher = more anomalous,
  compared with the running file's own `files[].threshold` (score > threshold means NG).
- output `heatmap`: float32, shape (N, H, W): smoothed per-pixel residual, scaled inside
  the graph so that 1.0 is the largest residual seen on normal validation images.
- output `peak`: int64, shape (N, 2): (row, column) of the heatmap maximum, the first one
  in row-major order on ties (numpy's argmax rule). The edge does no model maths (with
  tiling it finds the peak of the map it stitched from the tiles' heatmaps).

Version 2 over version 1: the `peak` output; a threshold per model file (an INT8 model is
calibrated on its own scores); golden images with each file's expected outputs, which the
edge runs as a self-test at load; and `content_sha256`, a digest of the manifest itself so
that a manifest edited after export is refused. The digest catches accidents and
hand edits, not an attacker (anyone can recompute it): it is not a signature. A signed
bundle (`ganspect export --sign`) also carries `signature.json`, checked on stations that
list trusted keys (`ganspect.edge.signature`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ganspect.edge.errors import BundleError, key_path
from ganspect.edge.verdict import judge

# Written here only: the exporter stamps bundles with it and load_bundle refuses others, so the
# two sides cannot disagree on which format is current.
FORMAT_VERSION: Final = 2
# The manifest's closed vocabularies, named so that the exporter writes them with the same types.
ModelKind = Literal["efficient_gan", "anogan"]
Precision = Literal["fp32", "int8"]
Discrimination = Literal["feature_matching", "cross_entropy"]
ScoreSource = Literal["residual", "segmentation"]
ThresholdMethod = Literal["normal_quantile", "pseudo_defects", "f1_optimal", "manual"]
MANIFEST_NAME = "manifest.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class InputSpec(_Strict):
    name: str = Field("image", description="Name of the ONNX input tensor.")
    height: int = Field(ge=8, le=4096, description="Model input height in pixels.")
    width: int = Field(ge=8, le=4096, description="Model input width in pixels.")
    channels: Literal[1, 3] = Field(description="1 for grayscale, 3 for colour.")
    colour_order: Literal["GRAY", "BGR"] = Field(description="Channel order of the input tensor.")
    layout: Literal["NHWC"] = Field("NHWC", description="Tensor layout of the input.")
    dtype: Literal["uint8"] = Field("uint8", description="Pixel type; normalisation is in the graph.")
    resize_interpolation: Literal["area", "linear"] = Field(
        "area", description="OpenCV interpolation used to resize a frame to the input size."
    )

    @model_validator(mode="after")
    def _channels_match_order(self) -> InputSpec:
        expected = 1 if self.colour_order == "GRAY" else 3
        if self.channels != expected:
            raise ValueError(f"colour_order {self.colour_order} needs {expected} channel(s), not {self.channels}")
        return self


class OutputSpec(_Strict):
    score: str = Field(default="score", description="Name of the (N,) float32 score output.")
    heatmap: str = Field(default="heatmap", description="Name of the (N, H, W) float32 heatmap output.")
    peak: str = Field(
        default="peak",
        description="Name of the (N, 2) int64 output: (row, column) of the heatmap maximum, "
        "the first in row-major order on ties.",
    )


class Normalisation(_Strict):
    inside_graph: Literal[True] = Field(True, description="Always true: the edge feeds raw uint8 pixels.")
    scale: float = Field(description="x_model = x_uint8 * scale + offset, applied inside the graph.")
    offset: float = Field(description="See scale.")


class ScoreSpec(_Strict):
    formula: str = Field(description="Human-readable score formula.")
    lambda_: float = Field(alias="lambda", ge=0.0, le=1.0, description="Weight of the discrimination loss.")
    discrimination: Discrimination = Field(description="How the discrimination loss L_D is computed.")
    residual_reduction: Literal["mean", "peak"] = Field(
        description="How L_R reduces the per-pixel residual: its mean, or the peak of its smoothed map."
    )
    source: ScoreSource = Field(
        "residual",
        description="residual: the score is the formula's A(x) and the heatmap the smoothed residual; "
        "segmentation: both come from the segmentation head's smoothed defect map (the "
        "score is its peak).",
    )


class ThresholdSpec(_Strict):
    method: ThresholdMethod = Field(
        description="How each file's threshold was chosen; every file's value comes from its own scores."
    )
    nu: float | None = Field(None, ge=0.0, le=1.0, description="Tolerated false-alarm rate for normal_quantile.")
    n_images: int = Field(ge=0, description="Number of images the thresholds were calibrated on.")


class RegionSpec(_Strict):
    x: int = Field(ge=0, description="Left edge in frame pixels.")
    y: int = Field(ge=0, description="Top edge in frame pixels.")
    width: int = Field(ge=8, description="Width in pixels.")
    height: int = Field(ge=8, description="Height in pixels.")


class TilingSpec(_Strict):
    """How the model was trained to see a frame; the edge frames it the same way."""

    mode: Literal["resize", "tiles"] = Field(
        description="resize: the ROI is resized to the input size; tiles: the ROI is cut into input-sized tiles "
        "(one frame pixel = one model pixel), scored as one batch, heatmaps stitched with the larger "
        "value where tiles overlap, the frame's score the worst tile's."
    )
    overlap: int = Field(
        ge=0,
        description="tiles: pixels shared by neighbouring tiles; the last tile of a row or "
        "column is flush with the ROI's edge.",
    )
    roi: RegionSpec | None = Field(
        None, description="The region of the frame the model was trained on; null = the whole frame."
    )


class HeatmapSpec(_Strict):
    scale: float = Field(gt=0.0, description="Raw residual that maps to 1.0 (largest normal residual).")
    smoothing_sigma: float = Field(ge=0.0, description="Gaussian sigma in pixels applied inside the graph.")
    spread: int = Field(
        0, ge=0, description="Pixels a max filter widened the map by on each side, inside the graph (after smoothing)."
    )
    inside_graph: Literal[True] = Field(True, description="Always true: the heatmap output is already scaled.")
    per_pixel: bool = Field(
        False,
        description="The map was normalised per pixel inside the graph ((map - mean) / "
        "spread of the held-out normals, aligned parts) before scaling.",
    )


_SHA256 = r"^[0-9a-f]{64}$"


class GoldenExpectation(_Strict):
    """What one model file must output for the bundle's golden images, in their order."""

    scores: list[float] = Field(description="Expected score per golden image, as computed at export.")
    heatmap_peaks: list[float] = Field(description="Expected heatmap maximum per golden image.")
    atol: float = Field(
        ge=0.0, description="Allowed |actual - expected| is atol + rtol * |expected| (scores and heatmap peaks alike)."
    )
    rtol: float = Field(ge=0.0, description="See atol.")

    def allowed(self, expected: float) -> float:
        return self.atol + self.rtol * abs(expected)


class ModelFile(_Strict):
    path: str = Field(description="File name inside the bundle folder.")
    precision: Precision = Field(description="Numeric precision of the graph.")
    sha256: str = Field(pattern=_SHA256, description="SHA-256 of the file, lower-case hex.")
    bytes: int = Field(ge=1, description="File size.")
    threshold: float = Field(
        allow_inf_nan=False,
        description="Decision threshold for this file's scores (score > threshold means NG), "
        "calibrated on this file's own scores by `threshold.method`.",
    )
    golden: GoldenExpectation = Field(description="Expected outputs for the golden images (load-time self-test).")


class GoldenImage(_Strict):
    """A model-sized image stored losslessly in the bundle, scored by the edge at load."""

    path: str = Field(description="PNG path relative to the bundle folder, e.g. golden/0_normal.png.")
    sha256: str = Field(pattern=_SHA256, description="SHA-256 of the file, lower-case hex.")
    bytes: int = Field(ge=1, description="File size.")
    origin: str = Field(description="Where the image came from (held-out normal, test anomaly, ...).")
    expect: Literal["OK", "NG"] | None = Field(
        None,
        description="The verdict every model file must give this image by its own threshold, checked at load "
        "on the recorded and on the measured score: OK for a held-out normal, NG for a test "
        "anomaly the model detects; null: no verdict is checked (e.g. seeded random pixels).",
    )


class TrainingData(_Strict):
    source: str = Field(description="Data set path or name the model was trained on.")
    n_train: int = Field(ge=0, description="Normal images used for training.")
    n_val: int = Field(ge=0, description="Held-out normal images used for threshold and heatmap scale.")


class Manifest(_Strict):
    format_version: Literal[2] = Field(description="Bundle format version.")
    name: str = Field(min_length=1, description="Model name shown in verdicts.")
    kind: ModelKind = Field(description="Model family.")
    created_at: datetime = Field(description="UTC time of export.")
    ganspect_version: str = Field(description="Version of ganspect that exported the bundle.")
    input: InputSpec
    outputs: OutputSpec = OutputSpec()
    normalisation: Normalisation
    score: ScoreSpec
    threshold: ThresholdSpec
    heatmap: HeatmapSpec
    tiling: TilingSpec | None = Field(
        None,
        description="How frames reach the model, as in training; null (bundles from before tiling was "
        "recorded) = as the station's inspection settings say.",
    )
    training_data: TrainingData
    metrics: dict[str, float | None] = Field(default_factory=dict, description="Metrics measured at export.")
    files: list[ModelFile] = Field(min_length=1, description="ONNX files in the bundle with their hashes.")
    golden: list[GoldenImage] = Field(min_length=1, description="Golden images for the load-time self-test.")
    content_sha256: str | None = Field(
        None,
        pattern=_SHA256,
        description="SHA-256 of this manifest's canonical JSON (sorted keys, no spaces) without this field; "
        "written by write_manifest, required by load_bundle.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        precisions = [f.precision for f in self.files]
        if len(set(precisions)) != len(precisions):
            raise ValueError(f"files: one file per precision, got {precisions}")
        for f in self.files:
            n = len(self.golden)
            if len(f.golden.scores) != n or len(f.golden.heatmap_peaks) != n:
                raise ValueError(
                    f"files: {f.path} has {len(f.golden.scores)} golden scores and "
                    f"{len(f.golden.heatmap_peaks)} heatmap peaks for {n} golden images"
                )
        return self

    def model_file(self, precision: Precision | None = None) -> ModelFile:
        """The file to run: the requested precision, or INT8 when present, else FP32."""
        by_precision = {f.precision: f for f in self.files}
        if precision is None:
            return by_precision.get("int8") or by_precision["fp32"]
        if precision not in by_precision:
            raise BundleError(f"bundle has no {precision} model (it has: {', '.join(sorted(by_precision))})")
        return by_precision[precision]


class Bundle(_Strict):
    """A bundle folder whose manifest validated and whose files matched their hashes."""

    root: Path
    manifest: Manifest

    def path_of(self, model_file: ModelFile) -> Path:
        return self.root / model_file.path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_file(
    root: Path, name: str, precision: Precision, threshold: float, golden: GoldenExpectation
) -> ModelFile:
    path = root / name
    return ModelFile(
        path=name,
        precision=precision,
        sha256=sha256_file(path),
        bytes=path.stat().st_size,
        threshold=threshold,
        golden=golden,
    )


def describe_golden(root: Path, name: str, origin: str, expect: Literal["OK", "NG"] | None = None) -> GoldenImage:
    path = root / name
    return GoldenImage(path=name, sha256=sha256_file(path), bytes=path.stat().st_size, origin=origin, expect=expect)


def manifest_digest(raw: Mapping[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON without `content_sha256` (key order and spacing do not count)."""
    body = {k: v for k, v in raw.items() if k != "content_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def write_manifest(root: Path, manifest: Manifest) -> Path:
    """Write manifest.json with its `content_sha256` filled in (any value the model held is replaced)."""
    raw = manifest.model_dump(mode="json", by_alias=True, exclude={"content_sha256"})
    raw["content_sha256"] = manifest_digest(raw)
    path = Path(root) / MANIFEST_NAME
    path.write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _validation_summary(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = key_path(err["loc"]) or "(top level)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def load_bundle(root: str | Path, trusted_keys: Sequence[Path] = ()) -> Bundle:
    """Read and verify a bundle; raise BundleError with a message an operator can act on.

    With `trusted_keys` (PEM public keys, `model.trusted_keys`), the bundle must first carry a
    signature by one of them over its manifest (`ganspect.edge.signature`).
    """
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"model bundle {root} is not a folder")
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"model bundle {root} has no {MANIFEST_NAME}")
    if trusted_keys:
        from ganspect.edge.signature import verify_signature  # cryptography: only where keys are configured

        verify_signature(root, trusted_keys)
    try:
        raw: Any = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not readable JSON: {exc}") from exc
    if isinstance(raw, dict) and raw.get("format_version") not in (None, FORMAT_VERSION):
        raise BundleError(
            f"{manifest_path} has format_version {raw.get('format_version')!r}; "
            f"this ganspect reads format_version {FORMAT_VERSION}: re-export the run with this version's `ganspect export`"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(f"{manifest_path} is not a valid manifest: {_validation_summary(exc)}") from exc
    if manifest.content_sha256 is None:
        raise BundleError(f"{manifest_path} has no content_sha256: it was not written by `ganspect export`")
    if manifest_digest(raw) != manifest.content_sha256:
        raise BundleError(
            f"{manifest_path} was changed after export (its content no longer matches content_sha256): "
            "re-export or re-copy the bundle; never edit a manifest by hand"
        )
    entries = [(f.path, f.sha256) for f in manifest.files] + [(g.path, g.sha256) for g in manifest.golden]
    for name, expected in entries:
        _verify_file(root, manifest_path, name, expected)
    _check_thresholds(manifest_path, manifest)
    return Bundle(root=root, manifest=manifest)


def _check_thresholds(manifest_path: Path, manifest: Manifest) -> None:
    """Refuse thresholds that contradict the bundle's own evidence (the content digest proves no author)."""
    for index, model_file in enumerate(manifest.files):
        for i, golden in enumerate(manifest.golden):
            recorded = model_file.golden.scores[i]
            # The edge's own rule, so that the bundle is judged as the line will judge its parts.
            verdict = judge(recorded, model_file.threshold).state
            if golden.expect is not None and verdict != golden.expect:
                raise BundleError(
                    f"{manifest_path}: files[{index}].threshold {model_file.threshold:.6g} ({model_file.path}) "
                    f"judges the golden image {golden.path} ({golden.origin}, score {recorded:.6g}) "
                    f"{verdict}, not {golden.expect}: the threshold does not belong to this model; re-export the run"
                )
    measured = manifest.metrics.get("threshold")
    fp32 = next((f for f in manifest.files if f.precision == "fp32"), None)
    # metrics.threshold is the FP32 model's threshold that the run's evaluation used (INT8 has its own).
    if (
        measured is not None
        and fp32 is not None
        and not math.isclose(measured, fp32.threshold, rel_tol=1e-6, abs_tol=1e-12)
    ):
        raise BundleError(
            f"{manifest_path}: metrics.threshold {measured:.9g} (what the run was evaluated at) disagrees with "
            f"files[{manifest.files.index(fp32)}].threshold {fp32.threshold:.9g} ({fp32.path}): the metrics are not "
            "this model's; re-export the run"
        )


def _verify_file(root: Path, manifest_path: Path, name: str, expected_sha256: str) -> None:
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise BundleError(f"{manifest_path}: file {name!r} must be a path inside the bundle")
    path = root / relative
    if not path.is_file():
        raise BundleError(f"model bundle {root} is missing {name} named in its manifest")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise BundleError(
            f"{path} does not match its manifest (SHA-256 {actual[:12]}…, expected "
            f"{expected_sha256[:12]}…): the file was changed or damaged; re-export or re-copy the bundle"
        )


def manifest_json_schema() -> dict[str, Any]:
    return Manifest.model_json_schema(by_alias=True)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)
