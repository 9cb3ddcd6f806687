"""`python -m benchmarks [--quick] [--out benchmarks/RESULTS.md]`: measure, judge, write RESULTS.md.

Run from the repository root with the development install (`pip install -e '.[dev]'`).
Sections run one after another (never in parallel: they would time each other); a
section that cannot run in this build says why in the file instead of a figure.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import bench_report
from benchmarks.bench_machine import describe_machine, load_average, matmul_peak
from benchmarks.bench_plan import SECTIONS, Plan, full_plan, quick_plan

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "RESULTS.md"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _say(text: str) -> None:
    print(text, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the under-5-minutes subset (fewer runs, colour models only)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"Markdown file to write (default {DEFAULT_OUT})")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where models, videos and daemon state go (default: a temporary folder, removed at the end)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        default=None,
        metavar="SECTION",
        help=f"run only these sections ({', '.join(SECTIONS)}); the machine and targets are always written",
    )
    p.add_argument("--sizes", nargs="+", type=int, default=None, help="model sizes for the inference table")
    p.add_argument("--kinds", nargs="+", default=None, help="model kinds for the inference table")
    p.add_argument("--channels", nargs="+", type=int, choices=(1, 3), default=None, help="1 gray, 3 colour")
    p.add_argument("--budget-s", type=float, default=None, help="seconds of timing per inference figure")
    p.add_argument("--min-runs", type=int, default=None, help="at least this many timed runs per inference figure")
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    plan = quick_plan() if args.quick else full_plan()
    if args.only:
        plan.sections = list(args.only)
    if args.sizes or args.kinds or args.channels:
        kinds = args.kinds or sorted({k for k, _, _ in plan.models})
        sizes = args.sizes or sorted({s for _, s, _ in plan.models})
        channels = args.channels or sorted({c for _, _, c in plan.models}, reverse=True)
        plan.models = [(k, s, c) for k in kinds for s in sizes for c in channels]
    if args.budget_s is not None or args.min_runs is not None:
        b = plan.inference_budget
        plan.inference_budget = type(b)(
            seconds=args.budget_s if args.budget_s is not None else b.seconds,
            min_runs=args.min_runs or b.min_runs,
            max_runs=max(b.max_runs, args.min_runs or 0),
            warmup=b.warmup,
        )
    return plan


# ---------------------------------------------------------------------------------------
# Sections


def run_inference(r: bench_report.Results, work: Path) -> None:
    from benchmarks.bench_inference import InferenceFigure, Profile, op_profile, time_file
    from benchmarks.bench_models import MODEL_KINDS, ModelSpec, build_model, graph_macs, part_image, synthetic_parts

    plan = r.plan
    for kind, size, channels in plan.models:
        if kind not in MODEL_KINDS:
            raise SystemExit(f"unknown model kind {kind!r}; known: {', '.join(MODEL_KINDS)}")
        data = synthetic_parts(work / "data", size)
        spec = ModelSpec(kind, size, channels)
        _say(f"[inference] building {spec.label}")
        built = build_model(spec, work, data)
        r.built.append(built)
        if not built.files:
            _say(f"[inference]   {next(iter(built.unavailable.values()), 'not built')}")
            continue
        macs = sum(graph_macs(built.files["fp32"]).values())
        image = part_image(data, channels)
        for precision, path in built.files.items():
            for threads in (1, 0):
                ms = time_file(path, image, threads, plan.inference_budget)
                r.inference.append(
                    InferenceFigure(
                        label=spec.label,
                        kind=kind,
                        size=size,
                        channels=channels,
                        precision=precision,
                        threads=threads,
                        ms=ms,
                        macs=macs,
                        file_bytes=path.stat().st_size,
                    )
                )
                _say(
                    f"[inference]   {precision} {threads or 'all'} thread(s): median {ms.median:.2f} ms, "
                    f"p99 {ms.p99:.2f} ms ({ms.runs} runs)"
                )
    for kind, size, channels, overrides in plan.levers:
        spec = ModelSpec(kind, size, channels, tuple(overrides))
        _say(f"[levers] building {spec.label}")
        built = build_model(spec, work, synthetic_parts(work / "data", size))
        r.levers.append(built)
        image = part_image(synthetic_parts(work / "data", size), channels)
        for precision, path in built.files.items():
            ms = time_file(path, image, 1, plan.inference_budget)
            r.lever_figures.append(
                InferenceFigure(
                    label=spec.label,
                    kind=kind,
                    size=size,
                    channels=channels,
                    precision=precision,
                    threads=1,
                    ms=ms,
                    macs=sum(built.macs_by_part.values()),
                    file_bytes=path.stat().st_size,
                )
            )
            _say(f"[levers]   {precision} 1 thread: median {ms.median:.2f} ms")
    # The hot path of the largest Efficient GAN: INT8 when there is one (what ships), else FP32.
    largest = [b for b in r.built if b.spec.kind == "efficient_gan" and b.files]
    if largest:
        b = max(largest, key=lambda b: (b.spec.size, b.spec.channels))
        precision = "int8" if "int8" in b.files else "fp32"
        data = synthetic_parts(work / "data", b.spec.size)
        by_op, by_part = op_profile(b.files[precision], part_image(data, b.spec.channels), 1, plan.profile_runs)
        r.profile = Profile(b.spec.label, precision, by_op, by_part)


def run_edge_section(r: bench_report.Results, work: Path) -> None:
    from benchmarks.bench_edge import Broker, Subscriber, py_spy, run_daemon, write_video
    from benchmarks.bench_models import ModelSpec, build_model, synthetic_parts

    plan = r.plan
    kind, size, channels = plan.edge_model
    spec = ModelSpec(kind, size, channels)
    built = next((b for b in r.built if b.spec == spec and b.files), None)
    if built is None:
        _say(f"[edge] building {spec.label}")
        built = build_model(spec, work, synthetic_parts(work / "data", size))
    if built.bundle is None or not built.files:
        r.skipped["edge"] = f"The daemon's model {spec.label} could not be built: {built.unavailable}"
        return
    precision = "int8" if "int8" in built.files else "fp32"
    r.edge_model = f"{spec.label} {precision.upper()} (untrained)"
    _say(f"[edge] writing a 640x480 video of {plan.edge_video_frames} parts")
    video = write_video(work / "edge" / "parts-640x480.avi", plan.edge_video_frames, plan.edge_paced_fps)
    broker = Broker(work / "edge")
    subscriber = Subscriber(broker.port)
    try:
        for cores, threads in plan.edge_runs:
            for frames, fps in ((plan.edge_frames, None), (plan.edge_paced_frames, plan.edge_paced_fps)):
                expected_s = frames / (fps or 30.0)
                run = run_daemon(
                    built.bundle,
                    video,
                    broker,
                    subscriber,
                    work / "edge",
                    cores,
                    frames,
                    fps,
                    warmup_frames=max(20, frames // 20),
                    timeout_s=60 + 4 * expected_s,
                    inference_threads=threads,
                )
                r.edge.append(run)
                f2p = run.frame_to_published
                _say(
                    f"[edge] {cores} core(s), {threads} inference thread(s), {run.mode}: {run.frames} frames, "
                    f"{run.fps or 0:.1f} fps, "
                    f"frame-to-published p99 {f2p.p99 if f2p else float('nan'):.1f} ms, RSS end "
                    f"{run.rss_end_mib or 0:.0f} MiB" + (f" ({run.error})" if run.error else "")
                )
        if py_spy() is None:
            r.edge_profile_note = "py-spy is not installed (`pip install py-spy`): no profile of the daemon's threads"
        else:
            # A run of its own: the sampler takes CPU, so this run's speed is not reported.
            frames = plan.edge_paced_frames * 2
            _say(f"[edge] profiling the daemon's threads with py-spy over {frames} frames")
            r.edge_profiled = run_daemon(
                built.bundle,
                video,
                broker,
                subscriber,
                work / "edge",
                2,
                frames,
                None,
                warmup_frames=max(20, frames // 10),
                timeout_s=120 + frames / 10,
                profile_s=plan.edge_profile_s,
            )
    finally:
        subscriber.close()
        broker.stop()


def run_search_section(r: bench_report.Results, work: Path) -> None:
    from benchmarks.bench_inference import InferenceFigure, time_file
    from benchmarks.bench_models import ModelSpec, build_model, graph_macs, part_image, synthetic_parts
    from benchmarks.bench_training import anogan_available, measure_search, read_seed003

    plan = r.plan
    r.seed003 = read_seed003(HERE / "results")
    why = anogan_available()
    if why:
        r.skipped["search"] = why.capitalize() + "; the rows fill in when it lands."
        return
    size = plan.search_size
    data = synthetic_parts(work / "data", size)
    image = part_image(data, 3)
    figures: dict[str, InferenceFigure] = {}
    for kind in ("anogan", "efficient_gan"):
        spec = ModelSpec(kind, size, 3)
        built = next((b for b in r.built if b.spec == spec and b.files), None)
        if built is None:
            _say(f"[search] building {spec.label}")
            built = build_model(spec, work, data)
        if "fp32" not in built.files:
            r.skipped["search"] = f"{spec.label}: {built.unavailable.get('fp32')}"
            return
        existing = next(
            (
                f
                for f in r.inference
                if (f.kind, f.size, f.channels, f.precision, f.threads) == (kind, size, 3, "fp32", 1)
            ),
            None,
        )
        figures[kind] = existing or InferenceFigure(
            label=spec.label,
            kind=kind,
            size=size,
            channels=3,
            precision="fp32",
            threads=1,
            ms=time_file(built.files["fp32"], image, 1, plan.inference_budget),
            macs=sum(graph_macs(built.files["fp32"]).values()),
            file_bytes=built.files["fp32"].stat().st_size,
        )
    run = work / "runs" / ModelSpec("anogan", size, 3).folder
    _say(f"[search] timing {plan.search_steps_timed}-step latent search x {plan.search_repeats}")
    r.search = measure_search(
        run, image, plan.search_steps_timed, plan.search_steps_target, plan.search_repeats, plan.inference_budget
    )
    r.search_onepass_onnx = figures["anogan"]
    r.search_efficient_gan = figures["efficient_gan"]


def run_training_section(r: bench_report.Results, work: Path) -> None:
    from benchmarks.bench_models import synthetic_parts
    from benchmarks.bench_training import measure_training

    plan = r.plan
    n_train, n_good, n_bad = plan.training_data
    data = synthetic_parts(
        work / "training-data", plan.training_size, n_train=n_train, n_test_good=n_good, n_test_bad=n_bad, seed=1
    )
    _say(f"[training] Efficient GAN {plan.training_size}x{plan.training_size}, {plan.training_steps} steps")
    r.training = measure_training(
        work, data, plan.training_size, 3, plan.training_steps, plan.training_batch, evaluate=plan.training_evaluate
    )
    _say(f"[training]   {r.training.images_per_s or 0:.1f} images/s")


def run_accuracy_section(r: bench_report.Results, work: Path) -> None:
    results = HERE / "results"
    files = sorted(results.glob("*.md")) if results.is_dir() else []
    kept = [p for p in files if "smoke" not in p.name]
    r.accuracy = [(p.name, p.read_text(encoding="utf-8")) for p in kept]
    names = " ".join(p.name.lower() for p in kept)
    for what, keys in (
        ("the seeds' MNIST experiments", ("mnist", "seed0")),
        ("ELPV (solar cells)", ("elpv",)),
        ("the synthetic parts", ("synth", "parts")),
    ):
        if not any(k in names for k in keys):
            r.accuracy_missing.append(what)


SECTION_RUNNERS: dict[str, Callable[[bench_report.Results, Path], None]] = {
    "inference": run_inference,
    "edge": run_edge_section,
    "search": run_search_section,
    "training": run_training_section,
    "accuracy": run_accuracy_section,
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    started = time.monotonic()
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    machine = describe_machine()
    r = bench_report.Results(plan=plan, machine=machine, command=command.strip(), started_utc=_now())
    _say(f"[machine] {machine.cpu_model}, {machine.logical_cpus} CPU(s), load {machine.load_start[0]:.2f}")
    for threads in (1, 0):
        r.peaks[threads] = matmul_peak(threads, n=plan.matmul_n, budget_s=plan.matmul_budget_s)
        _say(f"[machine] matmul peak, {threads or 'all'} thread(s): {r.peaks[threads].best_gflops:.0f} GFLOP/s")
    with tempfile.TemporaryDirectory(prefix="ganspect-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for section in SECTIONS:
            if section not in plan.sections:
                r.skipped[section] = f"Not run: this run measured only {', '.join(plan.sections)} (`--only`)."
                continue
            try:
                SECTION_RUNNERS[section](r, work)
            except Exception as exc:  # one broken section must not lose the others' figures
                traceback.print_exc()
                r.skipped[section] = f"Failed in this run: {type(exc).__name__}: {str(exc).strip()[:300]}"
        r.machine.load_end = load_average()
        r.finished_utc = _now()
        r.elapsed_s = time.monotonic() - started
        # Written while the work folder exists: the report reads the model files' sizes.
        path = bench_report.write(r, args.out)
        targets = bench_report.evaluate_targets(r)
    _say(f"wrote {path} in {r.elapsed_s / 60:.1f} min")
    for t in targets:
        _say(f"  {t.status:>12}: {t.statement}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
