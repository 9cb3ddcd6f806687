"""Detection quality on any MVTec-layout data set: train, evaluate, export INT8 and time it, per seed.

    .venv/bin/python benchmarks/quality.py --data DIR [--config FILE] [--set KEY=VALUE ...]
                                           [--seeds 0 1 2] [--tag NAME]

For each seed: `ganspect train` on `DIR/train/good` (a seeded slice held out for the
threshold and the heatmap scale), `ganspect eval` on `DIR/test` (scored exactly as the
edge scores: tiles stitched at the station's resolution in tiling mode tiles), then
`ganspect export --int8`, and the INT8 graph timed on one thread: per tile, per 256x256
region (the tiles covering it, one batch) and per full test frame. The test split never
chooses anything: it is read only by the evaluation.

Writes `benchmarks/results/quality_<tag>.md` and `.json` (mean ± std over the seeds,
the machine, the command). Resumable: finished seeds are skipped, a half-trained model
resumes from its checkpoint (run folders under `benchmarks/runs/quality_<tag>/`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Experiment, fmt, write_markdown

from ganspect.train.config import load_train_config

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "train" / "efficient_gan.yaml"
HEADLINE = ("image_auroc", "image_auprc", "pixel_auroc", "f1", "f1_at_f1_optimal", "precision", "recall")


def _median_ms(session: Any, batch: np.ndarray, budget_s: float = 2.0, min_runs: int = 10) -> float:
    """Median wall milliseconds of one session.run on `batch`, after one warm-up run."""
    from ganspect.export.onnx_export import INPUT_NAME, OUTPUT_NAMES

    session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - started < budget_s:
        t0 = time.perf_counter()
        session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
        times.append((time.perf_counter() - t0) * 1000.0)
        if len(times) >= 200:
            break
    return float(np.median(times))


def time_int8(bundle: Path, config: Any, frame_shape: tuple[int, ...]) -> dict[str, Any]:
    """INT8 milliseconds on 1 thread: one tile, a 256x256 region, one full frame of `frame_shape`."""
    from ganspect.export.onnx_export import onnx_session
    from ganspect.train.calibrate import tile_origins

    size, channels = config.model.image_size, config.model.channels
    session = onnx_session(bundle / "model.int8.onnx", threads=1)
    rng = np.random.default_rng(0)
    tiles = config.tiling.mode == "tiles"

    def tiles_for(height: int, width: int) -> int:
        if not tiles:
            return 1
        return len(tile_origins(max(height, size), max(width, size), size, config.tiling.overlap))

    n_region = tiles_for(256, 256)
    n_frame = tiles_for(*frame_shape[:2])
    one = rng.integers(0, 256, (1, size, size, channels), np.uint8)
    result = {
        "tile_ms": _median_ms(session, one),
        "tile_px": size,
        "tiles_per_256_region": n_region,
        "tiles_per_frame": n_frame,
        "frame": f"{frame_shape[1]}x{frame_shape[0]}",
    }
    result["region_256_ms"] = _median_ms(session, rng.integers(0, 256, (n_region, size, size, channels), np.uint8))
    result["frame_ms"] = _median_ms(
        session, rng.integers(0, 256, (n_frame, size, size, channels), np.uint8), budget_s=3.0, min_runs=5
    )
    return result


def run_seed(args: argparse.Namespace, seed: int, exp: Experiment) -> dict[str, Any]:
    from ganspect.edge.errors import GanspectError
    from ganspect.export.bundle import export_run
    from ganspect.train.evaluate import evaluate_run
    from ganspect.train.loop import CHECKPOINT, load_checkpoint, read_run_config, train

    config = load_train_config(args.config, [*args.set, f"train.seed={seed}", f"train.threads={args.threads}"])
    run = exp.run_dir(f"seed{seed}")
    ckpt = run / CHECKPOINT
    started = time.monotonic()
    if not (ckpt.is_file() and load_checkpoint(ckpt).get("calibrated")):
        train(config, args.data, run, resume=ckpt.is_file())
    train_s = time.monotonic() - started
    losses = run / "losses.csv"
    if losses.is_file():  # the trainer's own clock survives a resume; ours would count only the last part
        last = losses.read_text(encoding="utf-8").strip().splitlines()[-1].split(",")
        train_s = float(last[-1])
    print(f"[seed {seed}] evaluating", flush=True)
    metrics = evaluate_run(run, args.data, report=True)
    result: dict[str, Any] = {k: metrics.get(k) for k in HEADLINE}
    result.update(
        seed=seed,
        train_seconds=round(train_s, 1),
        threshold=metrics["threshold"],
        auroc_by_kind=metrics.get("image_auroc_by_kind", {}),
        false_alarm_rate_held_out=metrics.get("false_alarm_rate_held_out"),
        n_test_good=metrics["n_test_good"],
        n_test_bad=metrics["n_test_bad"],
        n_calibration=metrics["n_calibration"],
        report=str(metrics.get("report", "")),
    )
    if not args.no_export:
        bundle = run / "bundle"
        if not (bundle / "manifest.json").is_file():
            print(f"[seed {seed}] exporting INT8", flush=True)
            try:
                export_run(run, bundle, int8=True, latency_budget_s=0.5)
            except GanspectError as exc:
                if "accuracy guard" not in str(exc):
                    raise
                # The timing is still worth having; the table says the guard refused this model.
                print(f"[seed {seed}] {exc}; timing it anyway (--force)", flush=True)
                export_run(run, bundle, int8=True, force=True, latency_budget_s=0.5)
        trained = read_run_config(run)  # as trained: the tiles fit the images (model.image_size is the largest)
        result["int8"] = time_int8(bundle, trained, _first_test_shape(args.data, trained))
        result["int8"].update(_guard_of(bundle))
    return result


def _guard_of(bundle: Path) -> dict[str, Any]:
    """The INT8 guard's verdict and AUROCs as the export recorded them in the manifest."""
    metrics = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))["metrics"]
    return {
        "guard_passed": bool(metrics.get("int8_guard_passed")),
        "guard_auroc_fp32": metrics.get("int8_guard_fp32_auroc"),
        "guard_auroc_int8": metrics.get("int8_guard_int8_auroc"),
    }


def _first_test_shape(data: Path, config: Any) -> tuple[int, ...]:
    """The shape of the first test image as the station sees it (after the ROI)."""
    from ganspect.train.data import IMAGE_SUFFIXES, Framing, read_image

    test = Path(data) / "test"
    first = next(p for p in sorted(test.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES)
    m = config.model
    framing = Framing.of(m.image_size, config.tiling)
    return read_image(first, m.image_size, m.channels, framing).shape


def _tile_side(timing: dict[str, Any]) -> str:
    return f" of {timing['tile_px']} px" if "tile_px" in timing else ""  # results written before it was recorded


def _shown(path: Path) -> Path:
    """A path inside the repository relative to its root, as the command line is given."""
    resolved = path.resolve()
    return resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else path


def _mean_std(values: list[float | None]) -> str:
    v = [float(x) for x in values if x is not None and not np.isnan(x)]
    if not v:
        return "n/a"
    return f"{fmt(float(np.mean(v)))} ± {fmt(float(np.std(v)))}"


def write_results(exp: Experiment, name: str, args: argparse.Namespace) -> Path:
    units = [u for _, u in sorted(exp.data["units"].items())]
    rows = [
        ("image AUROC", "image_auroc"),
        ("image AUPRC", "image_auprc"),
        ("pixel AUROC", "pixel_auroc"),
        ("F1 at the held-out threshold", "f1"),
        ("best F1 on the test set (information only)", "f1_at_f1_optimal"),
        ("precision at the threshold", "precision"),
        ("recall at the threshold", "recall"),
        ("false alarms on held-out normals", "false_alarm_rate_held_out"),
    ]
    lines = [
        "| metric | mean ± std | " + " | ".join(f"seed {u['seed']}" for u in units) + " |",
        "|---|---|" + "---|" * len(units),
    ]
    for label, key in rows:
        lines.append(
            f"| {label} | {_mean_std([u.get(key) for u in units])} | "
            + " | ".join(fmt(u.get(key)) for u in units)
            + " |"
        )
    gap = [u["f1_at_f1_optimal"] - u["f1"] for u in units if u.get("f1") is not None and u.get("f1_at_f1_optimal")]
    lines.append(f"| best F1 - F1 at the threshold | {_mean_std(gap)} | " + " | ".join(fmt(g) for g in gap) + " |")
    kinds = sorted({k for u in units for k in u.get("auroc_by_kind", {})})
    for kind in kinds:
        values = [u.get("auroc_by_kind", {}).get(kind) for u in units]
        lines.append(f"| image AUROC, {kind} | {_mean_std(values)} | " + " | ".join(fmt(v) for v in values) + " |")
    lines.append(
        f"| training wall time (min) | {_mean_std([u['train_seconds'] / 60 for u in units])} | "
        + " | ".join(f"{u['train_seconds'] / 60:.1f}" for u in units)
        + " |"
    )
    if units and "int8" in units[0]:
        for label, key in (
            ("INT8 ms per tile, 1 thread", "tile_ms"),
            ("INT8 ms per 256x256 region, 1 thread", "region_256_ms"),
            (f"INT8 ms per {units[0]['int8']['frame']} frame, 1 thread", "frame_ms"),
        ):
            values = [u["int8"][key] for u in units if "int8" in u]
            lines.append(f"| {label} | {_mean_std(values)} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
        guards = [u["int8"].get("guard_passed") for u in units if "int8" in u]
        lines.append(
            f"| INT8 accuracy guard | {sum(bool(g) for g in guards)} of {len(guards)} passed | "
            + " | ".join("passed" if g else "refused (exported with --force)" for g in guards)
            + " |"
        )
    u0 = units[0] if units else {}
    tiles = u0.get("int8", {})
    body = (
        f"Data: `{args.data}` ({u0.get('n_test_good', '?')} good and {u0.get('n_test_bad', '?')} defective "
        f"test images; threshold from {u0.get('n_calibration', '?')} held-out normal training images). "
        f"Config: `{_shown(args.config)}`"
        + (f" with `{' '.join(args.set)}`" if args.set else "")
        + ". "
        + (
            f"{tiles['tiles_per_frame']} tiles{_tile_side(tiles)} per frame, "
            f"{tiles['tiles_per_256_region']} per 256x256 region. "
            if tiles
            else ""
        )
        + "std over seeds is the population std.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    return write_markdown(name, f"Detection quality: {args.tag or Path(args.data).name}", exp, body)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="MVTec-layout data set (train/good, test/...)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="training config (default: the shipped one)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override; repeatable")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tag", default="", help="results name: quality_<tag> (default: the data folder's name)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training run (default 1)")
    p.add_argument("--no-export", action="store_true", help="skip the INT8 export and its timing")
    p.add_argument(
        "--retime",
        action="store_true",
        help="time the INT8 models of finished seeds again (on a quiet machine: timings taken while other "
        "runs trained are noise); everything else they measured is kept",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not (args.data / "train").is_dir() or not (args.data / "test").is_dir():
        raise SystemExit(f"{args.data}: expected the MVTec layout (train/good, test/good, test/<defect>)")

    import torch

    from ganspect.train.loop import read_run_config

    torch.set_num_threads(args.threads)
    name = "quality_" + (args.tag or args.data.name)
    exp = Experiment(name)
    for seed in args.seeds:
        unit = f"seed{seed}"
        result = exp.unit(unit, lambda seed=seed: run_seed(args, seed, exp))
        bundle = exp.run_dir(unit) / "bundle"
        if "int8" in result and (bundle / "manifest.json").is_file():
            if args.retime and "retimed" not in result["int8"]:
                print(f"[{name}] {unit}: timing INT8 again", flush=True)
                trained = read_run_config(exp.run_dir(unit))
                result["int8"] = {**time_int8(bundle, trained, _first_test_shape(args.data, trained)), "retimed": True}
            if "guard_passed" not in result["int8"]:  # retimed, or stored before the guard was recorded
                result["int8"].update(_guard_of(bundle))
                exp.save()
        write_results(exp, name, args)
    print(f"results: benchmarks/results/{name}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
