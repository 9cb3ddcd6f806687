"""Trigger-mode capacity: `cmd/trigger` commands at a steady rate into the daemon, verdicts out, on a real broker.

The daemon (`ganspect edge --headless` under `taskset`, trigger.mode mqtt, the configured
defaults otherwise) watches a 640x480 MJPG video read like a camera at `--fps` (25 by
default: `delivery` latest paces a file at its own frame rate). A paho client in this
process plays the PLC: it sends `--triggers` commands at each offered rate, evenly spaced,
each with its own trigger_id, and a subscriber records when each verdict and each answer
on `cmd/result` arrived. Same process, same clock, so trigger-to-published is the
verdict's receipt time minus the command's send time.

Per offered rate: how many triggers were accepted and refused (by reason), how many got a
verdict, how many of those were UNDEFINED, the rate verdicts came out at, and the median /
p99 / worst trigger-to-published. The *sustained* figure is the highest offered rate at
which every trigger got exactly one OK/NG verdict, none was refused, and verdicts kept the
offered pace (at least 95 % of it); each round is run `--repeat` times and the table gives
the median round.

    .venv/bin/python -m benchmarks.bench_triggers                 # 5 ... 40 triggers/s, 3 rounds
    .venv/bin/python -m benchmarks.bench_triggers --tag before    # results/triggers_before.{json,md}

Writes `benchmarks/results/triggers[_TAG].json` and `.md` with the machine and its load.
With `--profile`, py-spy samples the daemon during one extra run at the highest rate, and
the busiest lines per thread are listed (the sampler's CPU makes that run's figures moot).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.bench_edge import (
    PREFIX,
    STATION,
    Broker,
    ganspect_command,
    profile_daemon,
    py_spy,
    read_profile,
    write_video,
)
from benchmarks.bench_machine import describe_machine, load_average
from benchmarks.common import RESULTS, command_line

BASE = f"{PREFIX}/{STATION['site']}/{STATION['line']}/{STATION['station']}"
SUSTAINED_SHARE = 0.95  # verdicts must come out at this share of the offered rate at least


class Plc:
    """Sends triggers and records, per trigger_id, when it went out, its answer and its verdict."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self._lock = threading.Lock()
        self.sent: dict[str, float] = {}
        self.answers: dict[str, tuple[float, str, str | None]] = {}  # trigger_id -> (time, outcome, code)
        self.verdicts: dict[str, list[tuple[float, str, str]]] = {}  # trigger_id -> [(time, state, result_id)]
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-plc-{os.getpid()}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([(f"{BASE}/verdict", 1), (f"{BASE}/cmd/result", 1), (f"{BASE}/status", 1)])
        self.client.loop_start()
        self.online = threading.Event()
        if not self._subscribed.wait(10):
            raise RuntimeError("the benchmark's PLC client got no SUBACK from the broker")

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        now = time.time()
        if message.topic.endswith("/status"):
            if message.payload == b"online":
                self.online.set()
            return
        try:
            doc = json.loads(message.payload)
        except ValueError:
            return
        with self._lock:
            if message.topic.endswith("/verdict"):
                seen = self.verdicts.setdefault(str(doc.get("trigger_id")), [])
                if all(rid != doc["result_id"] for _, _, rid in seen):  # a QoS 1 duplicate is the same verdict
                    seen.append((now, doc["evaluation"]["state"], doc["result_id"]))
            elif message.topic.endswith("/cmd/result"):
                self.answers.setdefault(str(doc.get("command_id")), (now, doc.get("outcome", "?"), doc.get("code")))

    def send(self, trigger_id: str) -> None:
        with self._lock:
            self.sent[trigger_id] = time.time()
        self.client.publish(
            f"{BASE}/cmd/trigger", json.dumps({"part_id": f"P-{trigger_id}", "trigger_id": trigger_id}), qos=1
        )

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def daemon_config(bundle: Path, video: Path, port: int, data_dir: Path) -> dict[str, Any]:
    return {
        "station": STATION,
        "model": {"bundle": str(bundle), "precision": "auto"},
        "source": {"uri": str(video), "loop": True},
        "trigger": {"mode": "mqtt"},
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": port, "prefix": PREFIX, "require_broker": True},
        "data": {"dir": str(data_dir)},
        "display": {"window": "off"},
        # An untrained model's NG rate is arbitrary; saving NG frames would measure that, not the triggers.
        "images": {"save": "none"},
    }


def offer(plc: Plc, rate: float, n: int, round_no: int, settle_s: float) -> dict[str, Any]:
    """Send `n` triggers `1/rate` apart, wait for their verdicts, and sum up."""
    ids = [f"r{round_no}-{rate:g}-{i}" for i in range(n)]
    start = time.monotonic()
    for i, trigger_id in enumerate(ids):
        due = start + i / rate
        time.sleep(max(0.0, due - time.monotonic()))
        plc.send(trigger_id)
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        with plc._lock:
            done = sum(
                1 for t in ids if t in plc.verdicts or plc.answers.get(t, (0, "accepted", None))[1] != "accepted"
            )
        if done == n:
            break
        time.sleep(0.05)
    time.sleep(0.3)  # a duplicate or a late second verdict would show
    with plc._lock:
        sent = [plc.sent[t] for t in ids]
        answers = [plc.answers.get(t) for t in ids]
        verdicts = [plc.verdicts.get(t, []) for t in ids]
    refused: dict[str, int] = {}
    for a in answers:
        if a is not None and a[1] != "accepted":
            refused[str(a[2])] = refused.get(str(a[2]), 0) + 1
    got = [(s, v[0]) for s, v in zip(sent, verdicts, strict=True) if v]
    delays = np.array([(v[0] - s) * 1000.0 for s, v in got]) if got else np.array([])
    states: dict[str, int] = {}
    for _, v in got:
        states[v[1]] = states.get(v[1], 0) + 1
    out_rate = None
    if len(got) > 1:
        times = sorted(v[0] for _, v in got)
        out_rate = (len(times) - 1) / max(1e-9, times[-1] - times[0])
    return {
        "offered_per_s": rate,
        "sent": n,
        "accepted": sum(1 for a in answers if a is not None and a[1] == "accepted"),
        "unanswered": sum(1 for a in answers if a is None),
        "refused": refused,
        "with_verdict": len(got),
        "more_than_one_verdict": sum(1 for v in verdicts if len(v) > 1),
        "states": states,
        "verdicts_per_s": out_rate,
        "trigger_to_published_ms": None
        if not len(delays)
        else {
            "p50": float(np.percentile(delays, 50)),
            "p99": float(np.percentile(delays, 99)),
            "max": float(delays.max()),
        },
    }


def kept_up(r: dict[str, Any]) -> bool:
    ok_ng = r["states"].get("OK", 0) + r["states"].get("NG", 0)
    return (
        r["with_verdict"] == r["sent"]
        and ok_ng == r["sent"]
        and not r["refused"]
        and not r["more_than_one_verdict"]
        and r["verdicts_per_s"] is not None
        and r["verdicts_per_s"] >= SUSTAINED_SHARE * r["offered_per_s"]
    )


def run_round(  # noqa: PLR0913 — one round's settings, each a command-line flag of main
    bundle: Path,
    video: Path,
    broker: Broker,
    work: Path,
    cores: int,
    rates: list[float],
    n: int,
    round_no: int,
    profile_s: float | None = None,
) -> tuple[list[dict[str, Any]], str | None, Any]:
    folder = Path(tempfile.mkdtemp(prefix=f"triggers-{round_no}-", dir=work))
    config = folder / "edge.yaml"
    config.write_text(
        yaml.safe_dump(daemon_config(bundle, video, broker.port, folder / "data"), sort_keys=False), encoding="utf-8"
    )
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:cores])
    command = ["taskset", "-c", cpus, *ganspect_command(), "edge", "--config", str(config), "--headless"]
    plc = Plc(broker.port)
    results: list[dict[str, Any]] = []
    error = None
    profile = None
    with open(folder / "daemon.log", "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            if not plc.online.wait(60):
                raise RuntimeError(f"the daemon did not come online; see {folder / 'daemon.log'}")
            time.sleep(1.0)  # its cmd/+ subscription follows the online status
            for rate in rates:
                spy = profile_daemon(proc.pid, profile_s, folder / "py-spy.txt") if profile_s else None
                results.append(offer(plc, rate, n, round_no, settle_s=10.0 + n / rate))
                if spy is not None:
                    spy.wait(timeout=60)
                    profile = read_profile(folder / "py-spy.txt", top=6)
                time.sleep(1.0)  # the token bucket refills; the queue empties
        finally:
            plc.close()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        tail = (folder / "daemon.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        error = f"exit code {proc.returncode}: {' | '.join(tail)}"
    return results, error, profile


def _fmt_ms(d: dict[str, float] | None, key: str) -> str:
    return "–" if d is None else f"{d[key]:.0f}"


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round whose p99 trigger-to-published is the median one (a whole round, not a mix of figures)."""

    def p99(r: dict[str, Any]) -> float:
        t = r["trigger_to_published_ms"]
        return float("inf") if t is None else t["p99"]

    ranked = sorted(rounds, key=lambda r: (not kept_up(r), p99(r)))
    return ranked[(len(ranked) - 1) // 2]


def markdown(data: dict[str, Any]) -> str:
    lines = [
        "# Trigger-mode capacity",
        "",
        f"`ganspect edge --headless` in trigger mode (`trigger.mode: mqtt`, defaults otherwise) on "
        f"{data['cores']} core(s) (`taskset`), model {data['model']}; the source is a 640x480 MJPG video read "
        f"like a camera at {data['fps']:g} fps; `cmd/trigger` commands sent by a paho client at each offered rate, "
        f"{data['triggers']} per rate, through a mosquitto on a free port. Each rate was run {data['repeat']} "
        "time(s); the row is the median round (by p99), the last column lists every round's p99.",
        "",
        f"**Sustained: {data['sustained_per_s']:g} triggers/s** (the highest offered rate at which, in the median "
        f"round, every trigger got exactly one OK/NG verdict, none was refused and verdicts kept "
        f"{SUSTAINED_SHARE:.0%} of the pace).",
        "",
        "| offered /s | accepted | refused | with verdict | UNDEFINED | verdicts /s | trigger-to-published "
        "p50 / p99 / max ms | kept up | p99 of each round ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rate in data["rates"]:
        rounds = [r for r in data["rounds"] if r["offered_per_s"] == rate]
        r = median_round(rounds)
        t = r["trigger_to_published_ms"]
        refused = ", ".join(f"{k} {v}" for k, v in r["refused"].items()) or "0"
        each = ", ".join(_fmt_ms(x["trigger_to_published_ms"], "p99") for x in rounds)
        lines.append(
            f"| {rate:g} | {r['accepted']}/{r['sent']} | {refused} | {r['with_verdict']} | "
            f"{r['states'].get('UNDEFINED', 0)} | {r['verdicts_per_s'] or 0:.1f} | "
            f"{_fmt_ms(t, 'p50')} / {_fmt_ms(t, 'p99')} / {_fmt_ms(t, 'max')} | "
            f"{'yes' if kept_up(r) else 'no'} | {each} |"
        )
    if data.get("profile"):
        p = data["profile"]
        lines += ["", f"py-spy during the {data['rates'][-1]:g}/s run ({p['samples']} samples of running threads):", ""]
        for thread, share, busiest in p["threads"]:
            where = "; ".join(f"{w} {s:.0%}" for w, s in busiest)
            lines.append(f"- {thread} {share:.0%}: {where}")
    m = data["machine"]
    lines += [
        "",
        f"- machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs ({m['usable_cpus']} usable), "
        f"{m['memory_gib']} GiB, kernel {m['kernel']}; onnxruntime {m['versions'].get('onnxruntime', '?')}, "
        f"paho-mqtt {m['versions'].get('paho-mqtt', '?')}",
        f"- load average at start {data['load_start'][0]:.2f}, at end {data['load_end'][0]:.2f} (1 min)"
        + (" — other work shared the machine: figures are noisy" if data["load_start"][0] >= 1.0 else ""),
        f"- code: {data['code']}",
        f"- when: {data['when']}",
        f"- command (from the repository root): `{data['command']}`",
    ]
    if data.get("errors"):
        lines.append(f"- daemon errors: {'; '.join(data['errors'])}")
    return "\n".join(lines) + "\n"


def _git_describe() -> str:
    """The commit of the edge code the daemon runs (where `ganspect.edge` is imported from), and that folder."""
    import ganspect.edge

    folder = Path(ganspect.edge.__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(folder), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()[:100]
    except (OSError, subprocess.SubprocessError):
        head = "unknown commit"
    return f"{head} ({folder})"


def main(argv: list[str] | None = None) -> int:  # noqa: PLR0915 — mostly its argparse flags, one statement each
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="5,10,15,20,25,30,40", help="offered triggers per second, comma-separated")
    parser.add_argument("--triggers", type=int, default=150, help="triggers sent at each rate")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (one daemon each)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--fps", type=float, default=25.0, help="the camera's frame rate")
    parser.add_argument(
        "--tiling",
        choices=("tiles", "resize"),
        default="resize",
        help="the model's framing: resize (the frame squashed to 64x64: the trigger path's own cost shows) or "
        "tiles (the station-scale recipe: 64x64 tiles over the whole 640x480 frame, ~130 per frame)",
    )
    parser.add_argument("--tag", default="", help="results/triggers_TAG.{json,md}")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the model, video and daemon logs here")
    parser.add_argument("--profile", action="store_true", help="py-spy the daemon during an extra round")
    args = parser.parse_args(argv)
    rates = [float(x) for x in args.rates.split(",")]

    from benchmarks.bench_models import ModelSpec, build_model, synthetic_parts

    machine = describe_machine()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-triggers-"))
    work.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec("efficient_gan", 64, 3, (f"tiling.mode={args.tiling}",))
    built = build_model(spec, work, synthetic_parts(work / "data", 64))
    if built.bundle is None:
        raise SystemExit(f"the model could not be built: {built.unavailable}")
    precision = "INT8" if "int8" in built.files else "FP32"
    video = write_video(work / "parts-640x480.avi", 100, args.fps)
    broker = Broker(work)
    data: dict[str, Any] = {
        "model": f"{spec.label} {precision} (untrained)",
        "cores": args.cores,
        "fps": args.fps,
        "triggers": args.triggers,
        "repeat": args.repeat,
        "rates": rates,
        "rounds": [],
        "errors": [],
        "machine": {k: v for k, v in machine.__dict__.items() if k not in ("load_start", "load_end", "notes")},
        "load_start": list(load_average()),
        "code": _git_describe(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": command_line(),
    }
    try:
        for round_no in range(args.repeat):
            results, error, _ = run_round(built.bundle, video, broker, work, args.cores, rates, args.triggers, round_no)
            data["rounds"] += results
            if error:
                data["errors"].append(error)
            for r in results:
                t = r["trigger_to_published_ms"]
                print(
                    f"round {round_no} {r['offered_per_s']:g}/s: {r['with_verdict']}/{r['sent']} verdicts, refused "
                    f"{r['refused'] or 0}, {r['verdicts_per_s'] or 0:.1f}/s out, p50 {_fmt_ms(t, 'p50')} p99 "
                    f"{_fmt_ms(t, 'p99')} ms{'' if kept_up(r) else '  (did not keep up)'}",
                    flush=True,
                )
        if args.profile and py_spy() is not None:
            _, _, profile = run_round(
                built.bundle, video, broker, work, args.cores, [rates[-1]], args.triggers, 99, profile_s=8.0
            )
            if profile is not None:
                data["profile"] = {"samples": profile.samples, "threads": profile.threads}
    finally:
        broker.stop()
    data["load_end"] = list(load_average())
    sustained = [
        rate for rate in rates if kept_up(median_round([r for r in data["rounds"] if r["offered_per_s"] == rate]))
    ]
    # The highest rate below which every rate kept up: a lucky high rate after a failed lower one is not capacity.
    ceiling = 0.0
    for rate in rates:
        if rate not in sustained:
            break
        ceiling = rate
    data["sustained_per_s"] = ceiling
    name = "triggers" + (f"_{args.tag}" if args.tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    text = markdown(data)
    (RESULTS / f"{name}.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"written: {RESULTS / name}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
