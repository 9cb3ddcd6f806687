"""Turn a trained run folder into a model bundle.

    model.onnx           FP32 graph: uint8 NHWC image -> score, heatmap, peak
    model.int8.onnx      (--int8) QDQ INT8 graph, kept only when the accuracy guard passes (or --force)
    golden/*.png         golden images; the manifest holds each file's expected outputs for them
    manifest.json        the contract (ganspect.edge.manifest), with SHA-256 of every file
    export_report.md     parity, guard, latency and size figures measured by this export

The bundle is assembled in a temporary sibling folder and renamed into place only after
the ONNX graph has passed the parity check against PyTorch (and, with --int8, the INT8
model has passed its guard), so a failed export leaves nothing half-written. An existing
bundle at the destination is replaced; any other non-empty folder is refused.

The export is generic over the run's scoring module (`ganspect.train.loop.load_run_model`):
any module whose forward is `uint8 (N, H, W, C) -> (score (N,), heatmap (N, H, W))` and that
carries `threshold` and `heatmap_scale` buffers and a `cfg` with the input size.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ganspect.edge.errors import GanspectError
from ganspect.edge.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Discrimination,
    GoldenExpectation,
    GoldenImage,
    HeatmapSpec,
    InputSpec,
    Manifest,
    ModelFile,
    ModelKind,
    Normalisation,
    Precision,
    RegionSpec,
    ScoreSource,
    ScoreSpec,
    ThresholdSpec,
    TilingSpec,
    TrainingData,
    describe_file,
    describe_golden,
    utc_now,
    write_manifest,
)

if TYPE_CHECKING:  # at run time these load torch and onnx, which only an export needs
    from ganspect.export.onnx_export import Parity
    from ganspect.export.quantize import GuardResult, Int8Settings
    from ganspect.export.report import Latency

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
REPORT_FILE = "export_report.md"
# Golden self-test tolerances: |actual - expected| <= atol + rtol * |expected|. FP32 differs
# between CPUs only by float summation order; INT8 also by rounding at each quantize step,
# and by saturation on CPUs without VNNI, which is what the looser bound still catches.
GOLDEN_TOLERANCE = {"fp32": (1e-4, 1e-3), "int8": (1e-3, 2e-2)}
# Held-out normals scored when choosing the golden ones (a few fail at the false-alarm rate nu by design).
_GOLDEN_CANDIDATES = 20
Verdict = Literal["OK", "NG"]
SCORE_FORMULAS = {
    "efficient_gan": (
        "A(x) = (1 - lambda) * L_R + lambda * L_D with lambda = {lam:g}; x = image / 127.5 - 1; "
        "r = {r}; L_R = {residual}; L_D = {discrimination}"
    ),
    "anogan": (
        "A(x) = (1 - lambda) * L_R + lambda * L_D with lambda = {lam:g}; x = image / 127.5 - 1; z = E(x) from the "
        "encoder trained with the GAN frozen; r = {r}; L_R = {residual}; "
        "L_D = {discrimination}"
    ),
}
# r by `residual_polarity`; for AnoGAN G(E(x)) is its G(z) with z = E(x).
RESIDUAL_PIXEL_FORMULA = {
    "both": "mean over channels of |x - G(E(x))|",
    "darker": "max(0, mean over channels of G(E(x)) - x) (only where the image is darker than its reconstruction)",
    "brighter": "max(0, mean over channels of x - G(E(x))) (only where the image is brighter than its reconstruction)",
}
DISCRIMINATION_FORMULA = {
    ("efficient_gan", "feature_matching"): "mean |f_D(x, E(x)) - f_D(G(E(x)), E(x))| (feature matching)",
    ("efficient_gan", "cross_entropy"): "BCE(D(x, E(x)), real) (cross-entropy)",
    ("anogan", "feature_matching"): "mean |f_D(x) - f_D(G(z))| (feature matching)",
}
RESIDUAL_FORMULA = {"mean": "mean of r over H, W", "peak": "max over H, W of Gaussian-smoothed r"}
SEGMENTATION_FORMULA = (
    "score = max over H, W of the Gaussian-smoothed sigmoid(S(x, G(E(x)), |x - G(E(x))|)), S the segmentation head "
    "trained on pseudo-defects; x = image / 127.5 - 1 (A(x) with lambda = {lam:g}, L_R = {residual} and "
    "L_D = {discrimination} stay available on the workstation)"
)


def _ganspect_version() -> str:
    try:
        return version("ganspect")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class RunImages:
    """The run's images, re-read from its data set (same size, channels and held-out split as training)."""

    train: np.ndarray  # normal training images (INT8 calibration)
    holdout: np.ndarray  # held-out normals (thresholds; first part of the guard set)
    holdout_names: list[str]
    test: np.ndarray | None  # the data set's test images, when it has an MVTec-style test/ folder
    test_labels: np.ndarray | None
    test_names: list[str]
    test_kinds: list[str]
    test_source: str
    # Tiling mode tiles: the held-out normals at native size (their per-image scores set the thresholds);
    # every other field then holds model-sized tiles cut from the images as the edge cuts them.
    holdout_frames: Any = None


# Tiles drawn per group (training, held-out, test normal, test defect) for INT8 calibration and the guard.
MAX_GUARD_TILES = 256


def _tiles_of(
    images: Any, size: int, overlap: int, rng: np.random.Generator, masks: Any = None, names: list[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Up to MAX_GUARD_TILES seeded tiles (T, S, S, C) of the edge's grid; with masks, only tiles on a defect."""
    from ganspect.train.calibrate import tile_origins

    picked: list[tuple[int, int, int]] = []
    for i, image in enumerate(images):
        for y, x in tile_origins(image.shape[0], image.shape[1], size, overlap):
            if masks is None or masks[i][y : y + size, x : x + size].any():
                picked.append((i, y, x))
    chosen = sorted(rng.choice(len(picked), min(MAX_GUARD_TILES, len(picked)), replace=False)) if picked else []
    tiles = [
        images[picked[c][0]][picked[c][1] : picked[c][1] + size, picked[c][2] : picked[c][2] + size] for c in chosen
    ]
    labels = [
        f"{(names or [])[picked[c][0]] if names else picked[c][0]} tile at ({picked[c][1]}, {picked[c][2]})"
        for c in chosen
    ]
    return np.stack(tiles) if tiles else np.zeros((0, size, size, images[0].shape[-1]), np.uint8), labels


def _run_images(
    source: Path,
    size: int,
    channels: int,
    holdout: float,
    seed: int,
    guard_source: Path | None = None,
    tiling: Any = None,
) -> RunImages | None:
    """The run's images; the test images come from `guard_source` when given, else from the run's data set."""
    from ganspect.train.data import Framing, is_mvtec_layout, load_normal_images, load_test_set, split_holdout

    if not source.exists():
        return None
    framing = Framing.of(size, tiling)
    train, held = split_holdout(load_normal_images(source, size, channels, framing), holdout, seed)
    if guard_source is not None and not is_mvtec_layout(guard_source):
        raise GanspectError(f"--guard-data {guard_source} has no MVTec-style test/ folder (test/good, test/<defect>)")
    test_source = guard_source if guard_source is not None else source
    test = load_test_set(test_source, size, channels, framing) if (test_source / "test").is_dir() else None
    if framing.tiles:
        rng = np.random.default_rng(seed)
        overlap = tiling.overlap
        train_tiles, _ = _tiles_of(train.images, size, overlap, rng)
        held_tiles, held_names = _tiles_of(held.images, size, overlap, rng, names=list(held.names))
        test_tiles, test_labels, test_names, test_kinds = None, None, [], []
        if test is not None and len(test):
            good = [i for i, label in enumerate(test.labels) if label == 0]
            bad = [i for i, label in enumerate(test.labels) if label == 1]
            parts = [
                _tiles_of([test.images[i] for i in good], size, overlap, rng, names=[test.names[i] for i in good]),
                _tiles_of(
                    [test.images[i] for i in bad],
                    size,
                    overlap,
                    rng,
                    masks=None if test.masks is None else [test.masks[i] for i in bad],
                    names=[test.names[i] for i in bad],
                ),
            ]
            test_tiles = np.concatenate([parts[0][0], parts[1][0]])
            test_labels = np.array([0] * len(parts[0][0]) + [1] * len(parts[1][0]))
            test_names = parts[0][1] + parts[1][1]
            bad_kinds = {test.names[i]: test.kinds[i] for i in bad}
            test_kinds = ["good"] * len(parts[0][0]) + [
                bad_kinds.get(n.split(" tile at ")[0], "defect") for n in parts[1][1]
            ]
        return RunImages(
            train=train_tiles,
            holdout=held_tiles,
            holdout_names=held_names,
            test=test_tiles,
            test_labels=test_labels,
            test_names=test_names,
            test_kinds=test_kinds,
            test_source=str(test_source),
            holdout_frames=held.images,
        )
    return RunImages(
        train=np.ascontiguousarray(train.images),
        holdout=np.ascontiguousarray(held.images),
        holdout_names=list(held.names),
        test=None if test is None or not len(test.images) else np.ascontiguousarray(test.images),
        test_labels=None if test is None else np.asarray(test.labels).astype(int),
        test_names=[] if test is None else list(test.names),
        test_kinds=[] if test is None else list(test.kinds),
        test_source=str(test_source),
    )


def _frame_scores(path: Path, frames: Any, config: Any) -> np.ndarray:
    """The file's score of each frame as the edge scores it: tiles mode takes the worst tile of each."""
    from ganspect.export.onnx_export import run_onnx
    from ganspect.train.calibrate import cut_tiles

    if config.tiling.mode != "tiles":
        return np.asarray(run_onnx(path, np.ascontiguousarray(frames)).score)
    per_frame = [cut_tiles(frame, config.model.image_size, config.tiling.overlap)[0] for frame in frames]
    scores = run_onnx(path, np.concatenate(per_frame)).score  # one session for all frames' tiles
    ends = np.cumsum([len(tiles) for tiles in per_frame])
    return np.asarray([float(np.max(chunk)) for chunk in np.split(scores, ends[:-1])])


def _file_threshold(path: Path, images: RunImages, src: _Run) -> float:
    """The file's own threshold, chosen by the run's method on this file's scores of the images training used.

    normal_quantile: the (1 - nu) quantile of the held-out normals; pseudo_defects: the cut between them and
    the very copies training painted (same seed); f1_optimal: the cut between them and the labelled anomalies.
    """
    from ganspect.train.calibrate import choose_threshold, threshold_anomalies

    config = src.config
    normals = images.holdout_frames if images.holdout_frames is not None else images.holdout
    method = src.calibration.get("method", "normal_quantile")
    anomalies = threshold_anomalies(normals, config, method)
    anomaly_scores = None if anomalies is None else _frame_scores(path, anomalies, config)
    per_pixel = getattr(src.model.cfg, "pixel_calibration", False)
    normal_scores = (
        _leave_one_out_file_scores(path, normals, src) if per_pixel else _frame_scores(path, normals, config)
    )
    return choose_threshold(normal_scores, src.nu, method, anomaly_scores)


def _leave_one_out_file_scores(path: Path, normals: np.ndarray, src: _Run) -> np.ndarray:
    """A per-pixel run's held-out normals scored by the file as calibration scored them: leave-one-out.

    The graph normalises each map with statistics these very normals helped estimate, so
    its own scores of them are lower than an unseen part's, and a threshold on them sits
    too low. Its raw maps are undone from its heatmap (heatmap x scale x spread + mean)
    and each is measured against the other normals' statistics again.
    """
    from ganspect.export.onnx_export import run_onnx
    from ganspect.train.calibrate import leave_one_out_scores

    model = src.model
    out = run_onnx(path, np.ascontiguousarray(normals))
    z = np.asarray(out.heatmap, np.float64) * float(model.heatmap_scale)
    maps = z * model.pixel_spread.numpy() + model.pixel_mean.numpy()
    lam = model.cfg.lambda_
    if getattr(model.cfg, "scoring", "residual") == "segmentation" or lam == 0:
        l_d = np.zeros(len(z))
    else:  # score = (1 - lambda) peak + lambda L_D, so L_D is what the peak leaves of the score
        l_d = (np.asarray(out.score, np.float64) - (1 - lam) * z.reshape(len(z), -1).max(axis=1)) / lam
    return leave_one_out_scores(model.cfg, maps, l_d, src.calibration["per_pixel"]["spread_floor"])[2]


def _guard_data(images: RunImages) -> Any:
    from ganspect.export.quantize import GuardData

    parts, labels = [images.holdout], [np.zeros(len(images.holdout), int)]
    description = f"{len(images.holdout)} held-out normal training images"
    if images.test is not None and images.test_labels is not None:
        parts.append(images.test)
        labels.append(images.test_labels)
        n_bad = int(images.test_labels.sum())
        description += (
            f" + {len(images.test)} test images of {images.test_source} ({len(images.test) - n_bad} good, "
            f"{n_bad} anomalous), used only to measure the guard, never to choose anything"
        )
    return GuardData(
        images=np.concatenate(parts),
        labels=np.concatenate(labels),
        n_holdout=len(images.holdout),
        description=description,
    )


def _golden_choice(
    images: RunImages | None, size: int, channels: int, seed: int, files: dict[Path, tuple[str, float]]
) -> list[tuple[np.ndarray, str, Verdict | None]]:
    """(image, origin, expected verdict): two held-out normals and up to two test anomalies of different kinds.

    Every golden image checks that the edge computes what the exporter did; those labelled
    also check the thresholds (the edge refuses a threshold that judges one otherwise). A
    normal is labelled OK, an anomaly NG, only where every file (path: (precision,
    threshold)) judges it so by more than the golden tolerance, so that the edge's
    self-test cannot tip it over; such images are preferred, the others unlabelled. Seeded
    noise, unlabelled, when the run's data is gone.
    """
    if images is None:
        rng = np.random.default_rng(seed)
        return [
            (rng.integers(0, 256, (size, size, channels), dtype=np.uint8), f"seeded random pixels #{i}", None)
            for i in range(2)
        ]
    from ganspect.export.onnx_export import INPUT_NAME, OUTPUT_NAMES, onnx_session

    sessions: dict[Path, Any] = {path: onnx_session(path) for path in files}

    def label(image: np.ndarray, verdict: Verdict) -> Verdict | None:
        for path, (precision, threshold) in files.items():
            score = float(sessions[path].run([OUTPUT_NAMES[0]], {INPUT_NAME: image[None]})[0][0])
            atol, rtol = GOLDEN_TOLERANCE[precision]
            margin = atol + rtol * abs(score)
            if not (score <= threshold - margin if verdict == "OK" else score > threshold + margin):
                return None
        return verdict

    def pick(candidates: list[tuple[np.ndarray, str]], verdict: Verdict) -> tuple[np.ndarray, str, Verdict | None]:
        labelled = [(image, origin, label(image, verdict)) for image, origin in candidates[:_GOLDEN_CANDIDATES]]
        return next((c for c in labelled if c[2] is not None), (*candidates[0], None))

    normals = [(images.holdout[i], f"held-out normal {images.holdout_names[i]}") for i in range(len(images.holdout))]
    chosen = []
    for _ in range(min(2, len(normals))):
        choice = pick(normals, "OK")
        chosen.append(choice)
        normals = [n for n in normals if n[1] != choice[1]]
    if images.test is not None and images.test_labels is not None:
        kinds: dict[str, list[tuple[np.ndarray, str]]] = {}
        for i, bad in enumerate(images.test_labels):
            if bad == 1:
                origin = f"test anomaly {images.test_names[i]}"
                kinds.setdefault(images.test_kinds[i], []).append((images.test[i], origin))
        picks = [pick(of_kind, "NG") for of_kind in kinds.values()]
        # Two kinds at most, those with a detected image first (their verdicts check the threshold from above).
        chosen += sorted(picks, key=lambda c: c[2] is None)[:2]
    if not any(verdict == "NG" for _, _, verdict in chosen):
        log.warning(
            "no golden image is a test anomaly that every file's threshold judges NG with a margin: the "
            "edge can refute a threshold set too low, not one set too high"
        )
    return chosen


def _golden_expectation(path: Path, golden: list[np.ndarray], precision: str) -> GoldenExpectation:
    """What the file outputs for each golden image, scored one at a time as the edge does."""
    from ganspect.export.onnx_export import INPUT_NAME, OUTPUT_NAMES, onnx_session

    session: Any = onnx_session(path)
    scores, peaks = [], []
    for image in golden:
        score, heatmap, _ = session.run(list(OUTPUT_NAMES), {INPUT_NAME: image[None]})
        scores.append(float(score[0]))
        peaks.append(float(heatmap[0].max()))
    atol, rtol = GOLDEN_TOLERANCE[precision]
    return GoldenExpectation(scores=scores, heatmap_peaks=peaks, atol=atol, rtol=rtol)


def _scalar_metrics(run: Path) -> dict[str, float | None]:
    path = run / "metrics.json"
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text(encoding="utf-8"))
    return {
        k: (float(v) if v is not None else None)
        for k, v in raw.items()
        if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
    }


def _prepare_destination(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise GanspectError(f"--out {out} is a file; give a folder for the bundle")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise GanspectError(f"--out {out} is a non-empty folder that is not a model bundle; refusing to overwrite it")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Replace `out` with `tmp`; the old bundle is removed only after the new one is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


FP32_PARITY = "PyTorch eval vs ONNX FP32"
INT8_PARITY = "ONNX FP32 vs ONNX INT8"
PRECISIONS: dict[str, Precision] = {MODEL_FILE: "fp32", INT8_FILE: "int8"}


@dataclass(frozen=True)
class _Run:
    """A trained run as the export reads it, checked to be one this ganspect can export."""

    path: Path
    config: Any  # TrainConfig
    info: dict[str, Any]  # run.json
    calibration: dict[str, Any]  # calibration.json
    model: Any  # the scoring module (ganspect.train.loop.load_run_model)
    discrimination: Discrimination

    @property
    def kind(self) -> ModelKind:
        kind: ModelKind = self.config.model.kind  # checked against SCORE_FORMULAS when the run was read
        return kind

    @property
    def threshold(self) -> float:
        return float(self.model.threshold)

    @property
    def nu(self) -> float:
        return float(self.calibration.get("nu", self.config.calibration.nu))


@dataclass(frozen=True)
class _CheckImages:
    """The images every ONNX file is checked on; `images` is None when the training data is gone."""

    images: RunImages | None
    guard_set: Any  # GuardData, or None without the training data
    pixels: np.ndarray  # uint8 (N, H, W, C)
    description: str


@dataclass(frozen=True)
class _Fp32:
    path: Path
    torch_out: Any  # Outputs of the PyTorch module on the check images
    onnx_out: Any  # Outputs of the FP32 graph on them
    parity: Parity


@dataclass(frozen=True)
class _Int8:
    guard: list[GuardResult]  # each attempt, the one shipped last
    threshold: float
    parity: dict[str, Parity]


def _read_run(run: Path) -> _Run:
    from ganspect.train.loop import load_run_model, read_run_config, read_run_info

    config = read_run_config(run)
    info = read_run_info(run)
    kind = config.model.kind
    if kind not in SCORE_FORMULAS:
        raise GanspectError(f"{run}: model kind {kind!r} cannot be exported by this ganspect")
    model, ckpt = load_run_model(run)
    if not ckpt.get("calibrated"):
        raise GanspectError(f"{run}: training did not finish (not calibrated); resume it before exporting")
    discrimination: Discrimination = config.model.discrimination
    if (kind, discrimination) not in DISCRIMINATION_FORMULA:
        raise GanspectError(f"{run}: {kind} with discrimination {discrimination!r} cannot be exported by this ganspect")
    calibration = json.loads((run / "calibration.json").read_text(encoding="utf-8"))
    return _Run(run, config, info, calibration, model, discrimination)


def _check_images(src: _Run, guard_data: Path | None, int8: bool) -> _CheckImages:
    cfg, config = src.model.cfg, src.config
    size, channels = cfg.image_size, cfg.channels
    images = _run_images(
        Path(src.info["source"]),
        size,
        channels,
        config.data.holdout,
        config.train.seed,
        Path(guard_data) if guard_data is not None else None,
        config.tiling,
    )
    if images is None:
        if int8:
            raise GanspectError(
                f"--int8 needs the run's training data at {src.info['source']} (calibration and the "
                "accuracy guard run on it); it is gone"
            )
        log.warning("training data %s is gone: checking ONNX parity on random images instead", src.info["source"])
        pixels = np.random.default_rng(config.train.seed).integers(0, 256, (16, size, size, channels), np.uint8)
        return _CheckImages(None, None, pixels, "16 images of seeded random pixels (the training data is gone)")
    guard_set = _guard_data(images)
    return _CheckImages(images, guard_set, guard_set.images, guard_set.description)


def _export_fp32(src: _Run, checks: _CheckImages, tmp: Path) -> _Fp32:
    """The FP32 graph, refused unless it agrees with PyTorch on the check images."""
    from ganspect.export.onnx_export import compare, export_onnx, opset_of, run_onnx, run_torch

    cfg = src.model.cfg
    size, channels = cfg.image_size, cfg.channels
    log.info("exporting %s (%s, %dx%dx%d) to ONNX", src.path, src.kind, size, size, channels)
    path = export_onnx(src.model, tmp / MODEL_FILE, size, channels)
    torch_out = run_torch(src.model, checks.pixels)
    onnx_out = run_onnx(path, checks.pixels)
    parity = compare(torch_out, onnx_out)
    if not parity.ok:
        raise GanspectError(
            f"ONNX and PyTorch disagree on {parity.n_images} images (max score difference "
            f"{parity.max_abs_score_diff:.3g}, heatmap {parity.max_abs_heatmap_diff:.3g}, same peak "
            f"{parity.peak_agreement:.0%}); bundle not written"
        )
    log.info(
        "ONNX opset %d; parity on %d images: max |score diff| %.2e, max |heatmap diff| %.2e",
        opset_of(path),
        parity.n_images,
        parity.max_abs_score_diff,
        parity.max_abs_heatmap_diff,
    )
    return _Fp32(path, torch_out, onnx_out, parity)


def _export_int8(src: _Run, checks: _CheckImages, fp32: _Fp32, settings: Int8Settings, force: bool) -> _Int8:
    """INT8 beside the FP32 file: the first and last convolutions kept in FP32, then all sensitive layers.

    Those convolutions read the image or write a map: one to three channels on one side at
    full resolution, where 8-bit kernels gain nothing (in a 256x256 gray model they made it
    10 % slower, the image's requantization included) and rounding costs most. When the
    guard fails and other sensitive layers exist (D's feature layer), they are kept in FP32
    too. The first attempt that passes the accuracy guard is kept; when none does, the
    export is refused unless `force`, which ships the last.
    """
    import onnx

    from ganspect.export.onnx_export import compare, parameter_names, run_onnx
    from ganspect.export.quantize import describe_layers, judge, learned_layers, quantize, sensitive_layers

    images, guard_set = checks.images, checks.guard_set
    assert images is not None and guard_set is not None  # _check_images refuses --int8 without the training data
    rng = np.random.default_rng(src.config.train.seed)
    n_cal = min(settings.calibration_images, len(images.train))
    calibration = images.train[np.sort(rng.choice(len(images.train), n_cal, replace=False))]
    proto = onnx.load(str(fp32.path))
    layers = learned_layers(proto, parameter_names(src.model))
    keep = sensitive_layers(proto, layers)
    op_type = {n.name: n.op_type for n in proto.graph.node}
    convolutions = [n for n in keep if op_type[n] == "Conv"]
    attempts = [("first/last convolutions kept in FP32", convolutions)]
    if len(convolutions) < len(keep):
        attempts.append(("first/last layers and D's feature layer kept in FP32", keep))
    guard: list[GuardResult] = []
    int8_path = fp32.path.with_name(INT8_FILE)
    for label, kept in attempts:
        kept_names = describe_layers(proto, kept)
        log.info("quantizing to INT8 (%s) on %d normal training images", label, n_cal)
        quantize(fp32.path, int8_path, calibration, layers, kept, settings)
        int8_out = run_onnx(int8_path, checks.pixels)
        int8_threshold = _file_threshold(int8_path, images, src)
        result = judge(
            label,
            kept_names,
            guard_set,
            fp32.onnx_out,
            src.threshold,
            int8_out,
            src.nu,
            settings,
            int8_threshold=int8_threshold,
        )
        guard.append(result)
        log.info("INT8 guard (%s): %s", label, "pass" if result.ok else "; ".join(result.failures))
        if result.ok:
            break
    final = guard[-1]
    if not final.ok and not force:
        raise GanspectError(
            f"INT8 model refused by the accuracy guard: {'; '.join(final.failures)} (with "
            f"{len(keep)} sensitive layers kept in FP32); nothing was written: export without --int8, "
            "or pass --force to ship it anyway"
        )
    if not final.ok:
        log.warning("INT8 model failed its guard (%s) and is shipped because of --force", "; ".join(final.failures))
    parity = {
        INT8_PARITY: compare(fp32.onnx_out, int8_out),
        "PyTorch eval vs ONNX INT8": compare(fp32.torch_out, int8_out),
    }
    return _Int8(guard, final.int8_threshold, parity)


def _write_golden(
    src: _Run, images: RunImages | None, tmp: Path, thresholds: dict[str, float]
) -> tuple[list[GoldenImage], list[ModelFile]]:
    """The golden images, and each ONNX file described with what it outputs for them."""
    from ganspect.edge.golden import write_golden_image

    cfg = src.model.cfg
    chosen = _golden_choice(
        images,
        cfg.image_size,
        cfg.channels,
        src.config.train.seed,
        {tmp / name: (PRECISIONS[name], thresholds[name]) for name in thresholds},
    )
    golden: list[GoldenImage] = []
    for i, (image, origin, expect) in enumerate(chosen):
        name = f"golden/{i}.png"
        write_golden_image(tmp / name, image)
        golden.append(describe_golden(tmp, name, origin, expect))
    files: list[ModelFile] = [
        describe_file(
            tmp,
            name,
            PRECISIONS[name],
            thresholds[name],
            _golden_expectation(tmp / name, [g for g, _, _ in chosen], PRECISIONS[name]),
        )
        for name in thresholds
    ]
    return golden, files


def _bundle_metrics(
    run: Path,
    thresholds: dict[str, float],
    parity: dict[str, Parity],
    latency: dict[str, list[Latency]],
    guard: list[GuardResult] | None,
) -> dict[str, float | None]:
    """The manifest's metrics: the run's evaluation, and the parity, latency and guard figures of this export."""
    metrics = _scalar_metrics(run)
    evaluated_at = metrics.get("threshold")
    if evaluated_at is not None and not math.isclose(evaluated_at, thresholds[MODEL_FILE], rel_tol=1e-6, abs_tol=1e-12):
        # The edge refuses a bundle whose metrics were measured at another threshold than its model's.
        raise GanspectError(
            f"{run / 'metrics.json'} was measured at the threshold {evaluated_at:.9g}, the model's is "
            f"{thresholds[MODEL_FILE]:.9g} (calibrated again since?): run `ganspect eval {run}` again, then export"
        )
    for label, key in ((FP32_PARITY, "fp32"), (INT8_PARITY, "int8_vs_fp32")):
        if label in parity:
            metrics[f"parity_{key}_max_abs_score_diff"] = parity[label].max_abs_score_diff
            metrics[f"parity_{key}_max_abs_heatmap_diff"] = parity[label].max_abs_heatmap_diff
            metrics[f"parity_{key}_peak_agreement"] = parity[label].peak_agreement
    for name, lat in latency.items():
        tag = PRECISIONS[name]
        metrics[f"latency_ms_{tag}_1_thread"] = lat[0].median_ms
        metrics[f"latency_ms_{tag}_all_threads"] = lat[1].median_ms
    if guard is not None:
        final = guard[-1]
        metrics.update(
            {
                "int8_guard_passed": float(final.ok),
                "int8_guard_spearman": final.spearman,
                "int8_guard_agreement": final.agreement,
                "int8_guard_fp32_auroc": final.fp32_auroc,
                "int8_guard_int8_auroc": final.int8_auroc,
                "int8_layers_kept_fp32": float(len(final.fp32_nodes)),
            }
        )
    return {k: _finite(v) for k, v in metrics.items()}


def _manifest(
    src: _Run, metrics: dict[str, float | None], files: list[ModelFile], golden: list[GoldenImage]
) -> Manifest:
    cfg, config, cal, kind = src.model.cfg, src.config, src.calibration, src.kind
    source: ScoreSource = config.model.scoring
    roi = config.tiling.roi
    return Manifest(
        format_version=FORMAT_VERSION,
        name=f"{kind}-{src.path.resolve().name}",
        kind=kind,
        created_at=utc_now(),
        ganspect_version=_ganspect_version(),
        input=InputSpec(
            height=cfg.image_size,
            width=cfg.image_size,
            channels=cfg.channels,
            colour_order="GRAY" if cfg.channels == 1 else "BGR",
            resize_interpolation="area",
        ),
        normalisation=Normalisation(scale=1 / 127.5, offset=-1.0),
        score=ScoreSpec(
            formula=(SEGMENTATION_FORMULA if source == "segmentation" else SCORE_FORMULAS[kind]).format(
                lam=cfg.lambda_,
                residual=RESIDUAL_FORMULA[cfg.residual_reduction],
                r=RESIDUAL_PIXEL_FORMULA[cfg.residual_polarity],
                discrimination=DISCRIMINATION_FORMULA[(kind, src.discrimination)],
            ),
            lambda_=cfg.lambda_,
            discrimination=src.discrimination,
            residual_reduction=cfg.residual_reduction,
            source=source,
        ),
        threshold=ThresholdSpec(
            method=cal.get("method", "normal_quantile"), nu=cal.get("nu"), n_images=int(cal.get("n_images", 0))
        ),
        heatmap=HeatmapSpec(
            scale=float(src.model.heatmap_scale),
            smoothing_sigma=cfg.heatmap_sigma,
            spread=cfg.heatmap_spread,
            per_pixel=bool(getattr(cfg, "pixel_calibration", False)),
        ),
        tiling=TilingSpec(
            mode=config.tiling.mode,
            overlap=config.tiling.overlap,
            roi=None if roi is None else RegionSpec(**roi.model_dump()),
        ),
        training_data=TrainingData(
            source=str(src.info["source"]), n_train=int(src.info["n_train"]), n_val=int(src.info["n_val"])
        ),
        metrics=metrics,
        files=files,
        golden=golden,
    )


def export_run(
    run: Path,
    out: Path,
    int8: bool = False,
    force: bool = False,
    settings: Any = None,
    latency_budget_s: float = 1.0,
    guard_data: Path | None = None,
    sign: Path | None = None,
) -> Path:
    """Export the run's calibrated model to ONNX (and INT8), verify it, write the bundle; return its folder.

    `sign` is an Ed25519 private key (PEM): the bundle then carries `signature.json`, which
    stations with `model.trusted_keys` require (`ganspect.export.signing`).

    `settings` is an Int8Settings (defaults when None); `latency_budget_s` is the time spent
    timing each file at each thread count (at least 20 runs); `guard_data` is an MVTec-layout
    data set whose test images (good and defective) join the held-out normals in the parity
    checks and the INT8 guard, instead of the run's own data set's test images.
    """
    from ganspect.export.quantize import Int8Settings
    from ganspect.export.report import ExportFigures, measure_latency, write_report
    from ganspect.export.signing import load_signing_key, sign_bundle

    run, out = Path(run), Path(out)
    settings = settings or Int8Settings()
    if force and not int8:
        raise GanspectError("--force only applies to --int8 (it ships an INT8 model that failed its guard)")
    _prepare_destination(out)
    # Read first: a wrong key or pass phrase should fail in a second, not after the export's minutes of work.
    signing_key = load_signing_key(sign) if sign is not None else None
    src = _read_run(run)
    checks = _check_images(src, guard_data, int8)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        fp32 = _export_fp32(src, checks, tmp)
        thresholds = {MODEL_FILE: src.threshold}
        parity = {FP32_PARITY: fp32.parity}
        quantized = _export_int8(src, checks, fp32, settings, force) if int8 else None
        if quantized is not None:
            thresholds[INT8_FILE] = quantized.threshold
            parity.update(quantized.parity)
        golden, files = _write_golden(src, checks.images, tmp, thresholds)

        log.info("measuring batch-1 latency")
        latency = {
            name: [
                measure_latency(tmp / name, checks.pixels[0], threads, budget_s=latency_budget_s) for threads in (1, 0)
            ]
            for name in thresholds
        }
        guard = quantized.guard if quantized is not None else None
        manifest = _manifest(src, _bundle_metrics(run, thresholds, parity, latency, guard), files, golden)
        write_manifest(tmp, manifest)
        figures = ExportFigures(
            name=manifest.name,
            kind=src.kind,
            image_size=src.model.cfg.image_size,
            channels=src.model.cfg.channels,
            files={f.path: f.bytes for f in files},
            thresholds=thresholds,
            latency=latency,
            parity=parity,
            parity_images=checks.description,
            guard=guard,
            guard_data=checks.guard_set.description if checks.guard_set is not None else None,
            settings=settings if int8 else None,
            forced=force,
            golden=[f"{g.path}: {g.origin}" for g in golden],
        )
        write_report(tmp / REPORT_FILE, figures)
        if signing_key is not None:
            # Last, over the finished manifest (it holds the hashes of every file the report names).
            log.info("bundle signed with the Ed25519 key %s", sign_bundle(tmp, signing_key))
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
