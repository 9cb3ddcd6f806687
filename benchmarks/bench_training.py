"""Training speed (and, in full mode, time to the final AUROC), and one pass vs latent search.

Training runs the project's trainer (`ganspect.train.loop.train`) on synthetic parts;
images per second come from its own `losses.csv` (the `step` and `seconds` columns),
between the first and the last logged step, so start-up and the first step's warm-up
are not counted. In full mode the run is long enough to mean something: it is evaluated
(`ganspect eval`'s `evaluate_run`) and exported with `--int8`, whose accuracy guard gives
the FP32 and INT8 image AUROC on the same images.

Latent search is the trainer's `AnoGAN.search` (Adam on z, one image at a time, PyTorch),
timed against the one-pass encoder of the same model in PyTorch and in ONNX.
"""

from __future__ import annotations

import csv
import inspect
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_models import base_config, quietly
from benchmarks.bench_stats import Budget, Stats, time_calls


@dataclass
class TrainingFigure:
    size: int
    channels: int
    batch_size: int
    steps: int
    images_per_s: float | None
    wall_s: float  # train() from start to calibrated run folder
    loop_s: float | None  # the optimisation loop alone (losses.csv)
    auroc_fp32: float | None = None  # ganspect eval on the synthetic test set (full mode)
    int8_guard: dict[str, float | None] = field(default_factory=dict)  # from the --int8 export's manifest
    int8_error: str | None = None
    notes: list[str] = field(default_factory=list)


def _loop_rate(losses_csv: Path, batch_size: int) -> tuple[float | None, float | None]:
    """(images/s between the first and last logged step, loop seconds) from the trainer's losses.csv."""
    rows = list(csv.DictReader(losses_csv.open(encoding="utf-8"))) if losses_csv.is_file() else []
    points = [(int(r["step"]), float(r["seconds"])) for r in rows if r.get("step") and r.get("seconds")]
    if len(points) < 2 or points[-1][1] <= points[0][1]:
        return None, points[-1][1] if points else None
    (s0, t0), (s1, t1) = points[0], points[-1]
    return (s1 - s0) * batch_size / (t1 - t0), t1


def measure_training(
    work: Path, data: Path, size: int, channels: int, steps: int, batch_size: int, evaluate: bool
) -> TrainingFigure:
    """Train Efficient GAN at `size` on `data` for `steps` steps; with `evaluate`, AUROC and the INT8 guard too."""
    from ganspect.train.config import load_train_config
    from ganspect.train.loop import train

    run = work / "runs" / f"training-{size}-{channels}-{steps}"
    log_every = max(1, min(25, steps // 4))
    config = load_train_config(
        base_config("efficient_gan"),
        [
            f"model.image_size={size}",
            f"model.channels={channels}",
            f"train.steps={steps}",
            f"train.batch_size={batch_size}",
            f"train.log_every={log_every}",
            f"train.checkpoint_every={steps}",
            "train.seed=0",
            "train.device=cpu",
        ],
    )
    shutil.rmtree(run, ignore_errors=True)  # the trainer refuses a folder that holds a run
    started = time.perf_counter()
    with quietly():
        train(config, data, run)
    wall = time.perf_counter() - started
    rate, loop_s = _loop_rate(run / "losses.csv", batch_size)
    figure = TrainingFigure(
        size=size, channels=channels, batch_size=batch_size, steps=steps, images_per_s=rate, wall_s=wall, loop_s=loop_s
    )
    if evaluate:
        _evaluate(figure, run, data, work)
    return figure


def _evaluate(figure: TrainingFigure, run: Path, data: Path, work: Path) -> None:
    from ganspect.export.bundle import export_run
    from ganspect.train.evaluate import evaluate_run

    with quietly():
        metrics = evaluate_run(run, data)
    auroc = metrics.get("image_auroc")
    figure.auroc_fp32 = float(auroc) if isinstance(auroc, (int, float)) else None
    if "int8" not in inspect.signature(export_run).parameters:
        figure.int8_error = "not available in this build: the exporter has no INT8 quantization yet (issue 4)"
        return
    try:
        with quietly():
            # force: a refused INT8 model still shows its AUROC; the guard's verdict is reported as is.
            bundle = export_run(run, work / "bundles" / run.name, int8=True, force=True)
        manifest = json.loads((Path(bundle) / "manifest.json").read_text(encoding="utf-8"))
        metrics = manifest.get("metrics", {})
        figure.int8_guard = {
            k: metrics.get(k)
            for k in (
                "int8_guard_passed",
                "int8_guard_fp32_auroc",
                "int8_guard_int8_auroc",
                "int8_guard_spearman",
                "int8_guard_agreement",
                "int8_layers_kept_fp32",
            )
        }
    except Exception as exc:  # a piece under construction: say what failed, keep the rest
        figure.int8_error = f"INT8 export failed: {type(exc).__name__}: {str(exc).strip()[:200]}"


# ---------------------------------------------------------------------------------------
# One pass vs latent search


@dataclass
class SearchFigure:
    size: int
    channels: int
    search_steps_timed: int
    search_steps_target: int
    search_ms_per_step: Stats | None = None
    search_ms_target: float | None = None  # per image at search_steps_target steps
    extrapolated: bool = False
    onepass_torch_ms: Stats | None = None
    error: str | None = None


def measure_search(
    run: Path, image: np.ndarray, steps_timed: int, steps_target: int, repeats: int, budget: Budget
) -> SearchFigure:
    """Time AnoGAN's latent search per image (1 thread, PyTorch) against its one-pass forward."""
    import torch

    from ganspect.train.loop import load_run_model

    figure = SearchFigure(
        size=image.shape[0],
        channels=image.shape[2],
        search_steps_timed=steps_timed,
        search_steps_target=steps_target,
        extrapolated=steps_timed != steps_target,
    )
    model, _ = load_run_model(run)
    if not hasattr(model, "search"):
        figure.error = f"not available in this build: {type(model).__name__} has no latent search (issue 3)"
        return figure
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batch = torch.from_numpy(np.ascontiguousarray(image[None]))
        x = model.normalise(batch)
        generator = torch.Generator().manual_seed(0)
        model.search(x, steps=2, generator=generator)  # warm-up
        per_step: list[float] = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.search(x, steps=steps_timed, generator=generator)
            per_step.append((time.perf_counter() - t0) * 1000.0 / steps_timed)
        figure.search_ms_per_step = Stats.of(per_step)
        figure.search_ms_target = figure.search_ms_per_step.median * steps_target
        with torch.no_grad():
            figure.onepass_torch_ms = time_calls(lambda: model(batch), budget)
    finally:
        torch.set_num_threads(threads)
    return figure


def anogan_available() -> str | None:
    """None when the trainer has AnoGAN, else why not."""
    try:
        import ganspect.train.models.anogan  # noqa: F401
    except ImportError:
        return "not available in this build: the trainer has no AnoGAN yet (issue 3)"
    return None


def read_seed003(results: Path) -> dict[str, Any] | None:
    """The trainer's seed-003 experiment (AnoGAN search vs encoder on MNIST), when it has been run."""
    candidates = sorted(p for p in results.glob("seed003*.json") if "smoke" not in p.name)
    if not candidates:
        return None
    return json.loads(candidates[-1].read_text(encoding="utf-8")) | {"file": candidates[-1].name}
