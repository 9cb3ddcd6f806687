"""Several cameras on one PC: N edge daemons side by side, one per camera, one broker.

    python -m benchmarks.bench_stations [--repeats 3] [--seconds 15] [--out benchmarks/STATIONS.md]

For N = 1, 2 and 3 daemons, each with its own config, data folder, station path and
640x480 MJPG video (the same bundle: the shipped Efficient GAN recipe,
configs/train/efficient_gan.yaml, at 256x256 colour, INT8, untrained: speed does not
depend on training), one 256x256 region of each frame (`inspection.roi`; `--region frame`:
the whole frame, six tiles), under each CPU layout:

- `auto`: `model.intra_op_threads: 0` (onnxruntime: one thread per core), no pinning:
  the single-station default.
- `1 thread`: `model.intra_op_threads: 1`, no pinning: the kernel spreads the daemons.
- `1 thread, pinned`: `model.intra_op_threads: 1`, daemon i on core i mod cores
  (`taskset`, as a unit's `CPUAffinity=` would).

Each video is offered like a camera (`source.delivery: latest`, paced at the file's
30 fps), scored as fast as the daemon goes (`camera`: what each camera keeps of its
30 fps) and at a line's rate (`line`: `source.max_fps`, does every camera keep it?).
Per daemon, over a window that starts once every daemon has published and warmed up:
frames scored per second, frame-to-published latency (the subscriber's receipt time
minus the verdict's `captured_at`, same clock), and the share of a core it used. The
table gives the median over the repeats of the slowest daemon's fps and the worst p99.

The broker is a mosquitto started here on a free port; the subscriber is a paho client
in this process (on a line PC the broker is usually elsewhere, so both cost the daemons
a little CPU here that they would not on the line).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.bench_edge import Broker, ganspect_command, write_video
from benchmarks.bench_machine import describe_machine, load_average
from benchmarks.bench_stats import Stats

HERE = Path(__file__).resolve().parent
PREFIX = "bench"
CAMERA_FPS = 30.0
# A camera's rate the line needs scored; 10 parts a second is a fast conveyor.
LINE_FPS = 10.0
# (name, model.intra_op_threads, pinned)
LAYOUTS: dict[str, tuple[int, bool]] = {"auto": (0, False), "1 thread": (1, False), "1 thread, pinned": (1, True)}


@dataclass
class DaemonFigures:
    station: str
    cpus: str
    fps: float
    frame_to_published: Stats | None
    cpu_share: float | None  # of one core, over the window
    logged: int  # verdicts in the daemon's own log, whole run
    received: int  # of those, received by the subscriber


@dataclass
class StationsRun:
    count: int
    layout: str
    rate: str  # camera or line
    load: tuple[float, float, float]
    daemons: list[DaemonFigures] = field(default_factory=list)
    error: str | None = None

    @property
    def slowest_fps(self) -> float | None:
        return min((d.fps for d in self.daemons), default=None)

    @property
    def worst_p99(self) -> float | None:
        p99s = [d.frame_to_published.p99 for d in self.daemons if d.frame_to_published]
        return max(p99s) if p99s else None


class Receipts:
    """The receipt time of every verdict, by (station, result_id)."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.at: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-stations-{os.getpid()}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"{PREFIX}/+/+/+/verdict", qos=1)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("the benchmark's subscriber got no SUBACK from the broker")

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        now = time.time()
        station = message.topic.split("/")[3]
        try:
            result_id = str(json.loads(message.payload)["result_id"])
        except (ValueError, KeyError):
            return
        with self._lock:
            self.at.setdefault((station, result_id), now)  # a QoS 1 duplicate keeps the first receipt

    def stations_heard(self) -> set[str]:
        with self._lock:
            return {station for station, _ in self.at}

    def reset(self) -> None:
        with self._lock:
            self.at.clear()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _cpu_ticks(pid: int) -> int | None:
    """utime + stime of the process and its threads, in clock ticks."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def station_config(
    name: str, bundle: Path, video: Path, port: int, data: Path, threads: int, max_fps: float | None, region: str
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "station": {"site": "bench", "line": "line1", "station": name},
        "model": {"bundle": str(bundle), "precision": "int8", "intra_op_threads": threads},
        "source": {"uri": str(video), "loop": True, "delivery": "latest", **({"max_fps": max_fps} if max_fps else {})},
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": port, "prefix": PREFIX, "require_broker": True},
        "data": {"dir": str(data)},
        # An untrained model's NG rate is arbitrary; saving NG frames would measure that, not the line.
        "images": {"save": "none"},
        "display": {"window": "off"},
    }
    if region == "256":
        # One 256x256 region per frame, the model's input. The shipped recipe trains on tiles, so
        # the whole 640x480 frame (region "frame") is six 256x256 tiles, scored as one batch.
        config["inspection"] = {"roi": {"x": 192, "y": 112, "width": 256, "height": 256}}
    return config


@dataclass(frozen=True)
class Bench:
    """What every run shares: the bundle, one video per camera, the broker and its subscriber."""

    bundle: Path
    videos: list[Path]
    broker: Broker
    receipts: Receipts
    work: Path
    seconds: float
    warmup_s: float
    region: str


def run_stations(bench: Bench, count: int, layout: str, rate: str) -> StationsRun:
    threads, pinned = LAYOUTS[layout]
    cpus = sorted(os.sched_getaffinity(0))
    run = StationsRun(count=count, layout=layout, rate=rate, load=load_average())
    folder = Path(tempfile.mkdtemp(prefix=f"stations-{count}-{rate}-", dir=bench.work))
    receipts = bench.receipts
    receipts.reset()
    procs: list[tuple[str, str, subprocess.Popen[bytes], Path]] = []
    try:
        for i in range(count):
            name = f"cam{i + 1}"
            config = folder / f"{name}.yaml"
            config.write_text(
                yaml.safe_dump(
                    station_config(
                        name,
                        bench.bundle,
                        bench.videos[i],
                        bench.broker.port,
                        folder / name,
                        threads,
                        LINE_FPS if rate == "line" else None,
                        bench.region,
                    ),
                    sort_keys=False,
                ),
                encoding="utf-8",
            )
            mask = str(cpus[i % len(cpus)]) if pinned else ",".join(map(str, cpus))
            verdicts = folder / f"{name}.jsonl"
            command = ["taskset", "-c", mask, *ganspect_command(), "edge", "--config", str(config), "--headless"]
            with open(folder / f"{name}.log", "wb") as log:  # the daemon holds its own copy of the descriptor
                proc = subprocess.Popen(
                    [*command, "--verdict-log", str(verdicts)], stdout=log, stderr=subprocess.STDOUT
                )
            procs.append((name, mask, proc, verdicts))
        deadline = time.monotonic() + 120
        while receipts.stations_heard() != {name for name, *_ in procs}:
            if any(proc.poll() is not None for _, _, proc, _ in procs) or time.monotonic() > deadline:
                run.error = "a daemon exited or did not publish within 120 s; see " + str(folder)
                return run
            time.sleep(0.1)
        time.sleep(bench.warmup_s)
        t0 = time.time()
        ticks0 = {name: _cpu_ticks(proc.pid) for name, _, proc, _ in procs}
        time.sleep(bench.seconds)
        t1 = time.time()
        ticks1 = {name: _cpu_ticks(proc.pid) for name, _, proc, _ in procs}
        time.sleep(1.5)  # verdicts captured just before t1 reach the subscriber
    finally:
        for _, _, proc, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, _, proc, _ in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    time.sleep(0.5)
    hz = os.sysconf("SC_CLK_TCK")
    for name, mask, _, verdicts in procs:
        lines = verdicts.read_text(encoding="utf-8").splitlines() if verdicts.is_file() else []
        docs = [json.loads(line) for line in lines if line.strip()]
        window = [d for d in docs if t0 <= _parse_time(d["captured_at"]) < t1]
        delays = [
            (receipts.at[(name, d["result_id"])] - _parse_time(d["captured_at"])) * 1000.0
            for d in window
            if (name, d["result_id"]) in receipts.at
        ]
        a, b = ticks0.get(name), ticks1.get(name)
        run.daemons.append(
            DaemonFigures(
                station=name,
                cpus=mask,
                fps=len(window) / (t1 - t0),
                frame_to_published=Stats.of(delays) if delays else None,
                cpu_share=(b - a) / hz / (t1 - t0) if a is not None and b is not None else None,
                logged=len(docs),
                received=sum((name, d["result_id"]) in receipts.at for d in docs),
            )
        )
    return run


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def render(
    runs: list[StationsRun], machine_line: str, command: str, started: str, finished: str, region: str = "256"
) -> str:
    loads = [r.load[0] for r in runs]
    lines = [
        "# Several cameras on one PC",
        "",
        "Region scored per frame: "
        + ("one 256x256 region (one image per run)" if region == "256" else "the whole 640x480 frame (six tiles)")
        + ".",
        "",
        f"Written by `{command}`, {started} to {finished}. {machine_line}. "
        f"1-minute load average at the start of each run: {min(loads):.2f} to {max(loads):.2f} "
        f"(median {float(np.median(loads)):.2f}). How to read it: the docstring of `benchmarks/bench_stations.py`.",
        "",
        f"*camera*: each daemon scores the newest frame of its {CAMERA_FPS:g} fps camera as fast as it goes; "
        f"*line*: at most {LINE_FPS:g} per second (`source.max_fps`). fps is the slowest daemon's, p99 the worst "
        "daemon's frame-to-published latency; medians over the repeats (the range in brackets). CPU: the "
        "daemons' summed share of one core.",
        "",
        "| cameras | layout | rate | fps each (slowest) | p99 frame-to-published ms (worst) | CPU (cores) | "
        "verdicts received / logged | repeats |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[int, str, str], list[StationsRun]] = {}
    for r in runs:
        groups.setdefault((r.count, r.layout, r.rate), []).append(r)
    for (count, layout, rate), group in groups.items():
        good = [r for r in group if r.error is None and r.daemons]
        fps = [r.slowest_fps for r in good if r.slowest_fps is not None]
        p99 = [r.worst_p99 for r in good if r.worst_p99 is not None]
        cpu = [sum(d.cpu_share or 0.0 for d in r.daemons) for r in good]
        logged = sum(d.logged for r in good for d in r.daemons)
        received = sum(d.received for r in good for d in r.daemons)
        fps_text = f"{_fmt(_median(fps))} ({_fmt(min(fps))}–{_fmt(max(fps))})" if fps else "—"
        p99_text = f"{_fmt(_median(p99), 0)} ({_fmt(min(p99), 0)}–{_fmt(max(p99), 0)})" if p99 else "—"
        errors = [r.error for r in group if r.error]
        lines.append(
            f"| {count} | {layout} | {rate} | {fps_text} | {p99_text} | {_fmt(_median(cpu), 2)} | "
            f"{received} / {logged} | {len(good)}" + (f" ({len(errors)} failed: {errors[0]})" if errors else "") + " |"
        )
    lines += ["", "Each run, each daemon (fps, p50 / p99 ms, core share, CPUs):", ""]
    for r in runs:
        each = "; ".join(
            f"{d.station} {d.fps:.1f} fps, "
            + (
                f"{d.frame_to_published.median:.0f} / {d.frame_to_published.p99:.0f} ms"
                if d.frame_to_published
                else "no latency"
            )
            + f", {_fmt(d.cpu_share, 2)} core on CPU {d.cpus}"
            for d in r.daemons
        )
        lines.append(f"- {r.count} × {r.layout}, {r.rate}, load {r.load[0]:.2f}: {r.error or each}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_stations", description=__doc__.splitlines()[0])
    p.add_argument("--counts", nargs="+", type=int, default=[1, 2, 3], help="numbers of daemons side by side")
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    p.add_argument("--rates", nargs="+", choices=["camera", "line"], default=["camera", "line"])
    p.add_argument(
        "--region",
        choices=["256", "frame"],
        default="256",
        help="256: one 256x256 region of each frame (default); frame: the whole 640x480 frame, six tiles",
    )
    p.add_argument("--seconds", type=float, default=15.0, help="measured window per run")
    p.add_argument("--warmup-s", type=float, default=3.0, help="after every daemon has published")
    p.add_argument("--repeats", type=int, default=3, help="each figure is the median over this many runs")
    p.add_argument("--bundle", type=Path, default=None, help="a bundle to use instead of building the default one")
    p.add_argument("--workdir", type=Path, default=None, help="keep models, videos and daemon logs here")
    p.add_argument("--out", type=Path, default=HERE / "STATIONS.md")
    args = p.parse_args(argv)
    command = "python -m benchmarks.bench_stations " + " ".join(argv if argv is not None else sys.argv[1:])
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = describe_machine()
    machine_line = (
        f"Machine: {machine.cpu_model}, {machine.logical_cpus} logical CPU(s), {machine.usable_cpus} usable; "
        f"onnxruntime {machine.versions.get('onnxruntime', '?')}"
    )
    print(f"[stations] {machine_line}; load {machine.load_start[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="ganspect-stations-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        bundle = args.bundle
        if bundle is None:
            from benchmarks.bench_models import ModelSpec, build_model, synthetic_parts

            print("[stations] building efficient_gan 256x256 colour (the shipped recipe), INT8", flush=True)
            built = build_model(ModelSpec("efficient_gan", 256, 3), work, synthetic_parts(work / "data", 256))
            if built.bundle is None or "int8" not in built.files:
                raise SystemExit(f"the INT8 bundle could not be built: {built.unavailable}")
            bundle = built.bundle
        videos = [
            write_video(work / "stations" / f"cam{i + 1}.avi", 40, CAMERA_FPS, seed=i) for i in range(max(args.counts))
        ]
        broker = Broker(work / "stations")
        receipts = Receipts(broker.port)
        bench = Bench(bundle, videos, broker, receipts, work / "stations", args.seconds, args.warmup_s, args.region)
        runs: list[StationsRun] = []
        try:
            # Repeats outermost: a burst of load from elsewhere then disturbs one repeat of every figure,
            # not every repeat of one.
            for repeat in range(args.repeats):
                for count in args.counts:
                    for layout in args.layouts:
                        for rate in args.rates:
                            run = run_stations(bench, count, layout, rate)
                            runs.append(run)
                            print(
                                f"[stations] repeat {repeat + 1}: {count} × {layout}, {rate}, load {run.load[0]:.2f}: "
                                + (
                                    run.error
                                    or f"slowest {run.slowest_fps:.1f} fps, worst p99 {_fmt(run.worst_p99, 0)} ms"
                                ),
                                flush=True,
                            )
        finally:
            receipts.close()
            broker.stop()
    finished = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = render(runs, machine_line, command.strip(), started, finished, args.region)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
