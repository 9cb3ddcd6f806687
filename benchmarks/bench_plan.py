"""What a quick and a full run measure, and how many times."""

from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks.bench_stats import Budget

SECTIONS = ("inference", "edge", "search", "training", "accuracy")


@dataclass
class Plan:
    mode: str  # quick or full
    models: list[tuple[str, int, int]]  # inference table: (kind, size, channels)
    inference_budget: Budget
    matmul_budget_s: float
    matmul_n: int
    edge_frames: int  # throughput run, frames scored
    edge_paced_frames: int
    edge_paced_fps: float
    edge_video_frames: int  # distinct frames in the video (looped)
    # Daemon runs as (cores, model.intra_op_threads): all cores is what onnxruntime picks by default
    # (intra_op_threads: 0); one inference thread on two cores leaves a core to capture and delivery.
    edge_runs: list[tuple[int, int]]
    edge_model: tuple[str, int, int]  # kind, size, channels of the daemon's bundle
    edge_profile_s: float  # py-spy sampling of a separate 2-core run
    search_size: int
    search_steps_timed: int
    search_steps_target: int
    search_repeats: int
    training_size: int
    training_steps: int
    training_batch: int
    training_evaluate: bool
    training_data: tuple[int, int, int]  # n_train, n_test_good, n_test_bad
    profile_runs: int
    # Variants that show what a change would buy: (kind, size, channels, trainer --set overrides)
    levers: list[tuple[str, int, int, list[str]]] = field(default_factory=list)
    sections: list[str] = field(default_factory=lambda: list(SECTIONS))


def quick_plan() -> Plan:
    return Plan(
        mode="quick",
        # AnoGAN at the search section's size only: one build less per size keeps quick mode quick.
        models=[("efficient_gan", size, 3) for size in (64, 128, 256)] + [("anogan", 64, 3)],
        inference_budget=Budget(seconds=0.6, min_runs=30, max_runs=400),
        matmul_budget_s=0.8,
        matmul_n=512,
        edge_frames=600,
        edge_paced_frames=300,
        edge_paced_fps=60.0,
        edge_video_frames=40,
        edge_runs=[(1, 1), (2, 2), (2, 1)],
        edge_model=("efficient_gan", 64, 3),
        edge_profile_s=4,
        search_size=64,
        search_steps_timed=20,
        search_steps_target=500,
        search_repeats=3,
        training_size=128,
        training_steps=12,
        training_batch=16,
        training_evaluate=False,
        training_data=(40, 4, 4),
        profile_runs=10,
        levers=[("efficient_gan", 256, 3, ["model.base_width=8"])],
    )


def full_plan() -> Plan:
    return Plan(
        mode="full",
        models=[
            (kind, size, channels)
            for kind in ("efficient_gan", "anogan")
            for size in (64, 128, 256)
            for channels in (3, 1)
        ],
        inference_budget=Budget(seconds=5.0, min_runs=300, max_runs=3000, warmup=10),
        matmul_budget_s=3.0,
        matmul_n=512,
        edge_frames=10_000,
        edge_paced_frames=3000,
        edge_paced_fps=60.0,
        edge_video_frames=200,
        edge_runs=[(1, 1), (2, 2), (2, 1)],
        edge_model=("efficient_gan", 64, 3),
        edge_profile_s=20,
        search_size=64,
        search_steps_timed=500,
        search_steps_target=500,
        search_repeats=3,
        training_size=128,
        training_steps=1000,
        training_batch=16,
        training_evaluate=True,
        training_data=(400, 40, 60),
        profile_runs=50,
        levers=[("efficient_gan", size, 3, ["model.base_width=8"]) for size in (128, 256)],
    )
