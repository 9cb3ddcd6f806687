"""Median and p99 of repeated measurements, and the timing loop every speed figure uses."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Stats:
    median: float
    p99: float
    runs: int
    best: float = float("nan")  # the fastest run: what the machine does when nothing else runs

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        if not len(values):
            raise ValueError("no measurements")
        a = np.asarray(values, dtype=np.float64)
        return cls(median=float(np.median(a)), p99=float(np.percentile(a, 99)), runs=len(a), best=float(a.min()))


@dataclass(frozen=True)
class Budget:
    """How long to time one figure: at least `min_runs`, then until `seconds` or `max_runs`."""

    seconds: float
    min_runs: int
    max_runs: int
    warmup: int = 5


def time_calls(call: Callable[[], object], budget: Budget) -> Stats:
    """Milliseconds per call of `call`, after `budget.warmup` untimed calls."""
    for _ in range(budget.warmup):
        call()
    times: list[float] = []
    deadline = time.perf_counter() + budget.seconds
    while len(times) < budget.min_runs or (time.perf_counter() < deadline and len(times) < budget.max_runs):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1000.0)
    return Stats.of(times)
