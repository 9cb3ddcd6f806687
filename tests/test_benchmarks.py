"""The benchmark command end to end on its smallest piece, and the FLOP count it reports.

No timed assertions: the figures are whatever this machine gives; what is checked is that
the command runs from the repository root, writes RESULTS.md with the machine, the
targets (each met, missed or not measured) and a measured inference row, and that the
multiply-accumulate count matches a graph whose count is known by hand.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
# `benchmarks` is a folder of the repository, not an installed package: `python -m pytest`
# finds it from the root, a bare `pytest` does not.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.mark.slow
def test_quick_inference_piece_writes_results_file(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--only",
            "inference",
            "--sizes",
            "32",
            "--kinds",
            "efficient_gan",
            "--channels",
            "3",
            "--budget-s",
            "0.05",
            "--min-runs",
            "5",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # Without --workdir: models go to a temporary folder that is gone by the end, as on a fresh setup.
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = out.read_text(encoding="utf-8")

    for heading in (
        "# ganspect benchmarks",
        "## Machine",
        "## Targets",
        "## 1. Inference",
        "## 2. End to end: the edge daemon",
        "## 3. One pass vs latent search",
        "## 4. Training",
        "## 5. Accuracy summary",
    ):
        assert f"\n{heading}\n" in f"\n{text}", heading
    assert re.search(r"^- CPU: .+ logical CPU", text, re.MULTILINE)
    assert re.search(r"^- versions: Python [\d.]+, .*onnxruntime [\d.]+", text, re.MULTILINE)
    assert re.search(r"load average .*: [\d.]+ / [\d.]+ / [\d.]+ at start, [\d.]+ / [\d.]+ / [\d.]+ at the end", text)
    assert re.search(r"matrix-multiply peak, 1 thread: \d+ GFLOP/s", text)

    targets = re.findall(r"^\| (.+?) \| \**(met|missed|not measured)\** \| (.+) \|$", text, re.MULTILINE)
    assert len(targets) == 7, targets
    statements = " ".join(t[0] for t in targets)
    for phrase in (
        "INT8 at least 2x faster",
        "256x256 colour INT8 at most 5 ms",
        "128x128 colour INT8 under 3 ms",
        "under 20 MB",
        ">= 60 frames per second",
        "under 250 MB",
        "300x faster",
    ):
        assert phrase in statements, phrase
    # Sections this run skipped are not measured, and say why.
    daemon = next(t for t in targets if "60 frames per second" in t[0])
    assert daemon[1] == "not measured" and "--only" in daemon[2]
    assert "193 ms per image on one core" in text and "16.5 GFLOP" in text

    row = re.search(
        r"^\| efficient_gan \| 32 \| colour \| fp32 \| 1 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (\d+) "
        r"\| ([\d.]+) \|",
        text,
        re.MULTILINE,
    )
    assert row, text
    median, p99, fastest, runs, gflop = float(row[1]), float(row[2]), float(row[3]), int(row[4]), float(row[5])
    assert 0 < fastest <= median <= p99 and runs >= 5 and gflop > 0
    # INT8 is either measured or says why it is not.
    assert re.search(r"^\| efficient_gan \| 32 \| colour \| int8 \| (1|–) \|", text, re.MULTILINE)


def test_graph_macs_counts_conv_convtranspose_and_gemm(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    from benchmarks.bench_models import graph_macs

    def weight(name: str, shape: list[int]) -> object:
        return helper.make_tensor(name, TensorProto.FLOAT, shape, np.zeros(shape, np.float32).ravel())

    nodes = [
        # (1, 3, 16, 16) -> (1, 8, 8, 8): 8*8*8 outputs x 3*4*4 = 24,576 MACs
        helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1]),
        # (1, 8, 8, 8) -> (1, 4, 16, 16): 8*8*8 inputs x 4*4*4 = 32,768 MACs
        helper.make_node("ConvTranspose", ["c1", "w2"], ["c2"], kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c2"], ["f"]),
        # (1, 1024) x (1024, 10): 10,240 MACs
        helper.make_node("Gemm", ["f", "w3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "macs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        initializer=[weight("w1", [8, 3, 4, 4]), weight("w2", [8, 4, 4, 4]), weight("w3", [1024, 10])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "macs.onnx"
    onnx.save(model, str(path))

    macs = graph_macs(path)
    assert macs == {"Conv": 24_576, "ConvTranspose": 32_768, "Gemm": 10_240, "MatMul": 0}


def test_node_part_reads_every_input_so_the_smoothing_matmul_counts_as_smoothing() -> None:
    from onnx import helper

    from benchmarks.bench_models import node_part

    # S @ r: the constant smoothing matrix is the *first* input of the MatMul.
    assert node_part(helper.make_node("MatMul", ["scoring.smooth_matrix", "abs_1"], ["m"])) == "smooth"
    assert node_part(helper.make_node("Conv", ["relu_2", "scoring.generator.net.9.phase01"], ["c"])) == "generator"
    assert node_part(helper.make_node("Add", ["a", "b"], ["c"])) is None


def test_accuracy_section_links_point_into_the_results_folder() -> None:
    from benchmarks.bench_report import _from_results_folder

    text = "![h](seed003_anogan_histogram.png) [r](synthetic128/efficient_gan/report.md) [w](https://x.org/a) [t](#top)"
    assert _from_results_folder(text) == (
        "![h](results/seed003_anogan_histogram.png) "
        "[r](results/synthetic128/efficient_gan/report.md) "
        "[w](https://x.org/a) [t](#top)"
    )


@pytest.mark.slow
def test_quality_benchmark_on_a_new_folder_trains_evaluates_exports_and_resumes(tmp_path: Path) -> None:
    # A new user's own MVTec-layout folder, with --data and a few --set overrides only.
    from ganspect.train.synth import synthesize_dataset

    data = tmp_path / "parts"
    synthesize_dataset(data, size=32, n_train=16, n_test_good=4, n_test_bad=4, seed=1)
    env = {
        **__import__("os").environ,
        "GANSPECT_BENCH_RESULTS": str(tmp_path / "results"),
        "GANSPECT_BENCH_RUNS": str(tmp_path / "runs"),
    }
    command = [
        sys.executable,
        "benchmarks/quality.py",
        "--data",
        str(data),
        "--seeds",
        "0",
        "--tag",
        "tiny",
        "--set",
        "model.image_size=32",
        "--set",
        "model.latent_stride=4",
        "--set",
        "model.latent_dim=8",
        "--set",
        "model.base_width=8",
        "--set",
        "model.head_width=4",
        "--set",
        "train.steps=3",
        "--set",
        "train.batch_size=4",
    ]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (tmp_path / "results" / "quality_tiny.md").read_text(encoding="utf-8")
    for row in (
        "image AUROC",
        "image AUPRC",
        "pixel AUROC",
        "F1 at the held-out threshold",
        "best F1 on the test set (information only)",
        "image AUROC, scratch",
        "training wall time (min)",
        "INT8 ms per tile, 1 thread",
        "INT8 ms per 256x256 region, 1 thread",
        "INT8 ms per 32x32 frame, 1 thread",
    ):
        assert re.search(rf"^\| {re.escape(row)} \| \d+\.\d+ ± \d+\.\d+ \| [\d.]+ \|$", text, re.MULTILINE), row
    # A few steps cannot make a model the INT8 guard accepts: the table says so instead of failing.
    assert re.search(r"^\| INT8 accuracy guard \| [01] of 1 passed \|", text, re.MULTILINE)
    assert "- machine: " in text and "benchmarks/quality.py --data" in text
    results = __import__("json").loads((tmp_path / "results" / "quality_tiny.json").read_text(encoding="utf-8"))
    assert set(results["units"]) == {"seed0"}
    # 32x32 images cut into 32x32 tiles: one tile a frame.
    assert results["units"]["seed0"]["int8"]["tiles_per_frame"] == 1

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and again.stdout.count("done earlier, skipped") == 1, again.stdout[-2000:]

    # --retime measures the finished seed's INT8 model again and keeps everything else it measured.
    retimed = subprocess.run([*command, "--retime"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert retimed.returncode == 0 and "timing INT8 again" in retimed.stdout, retimed.stdout[-2000:]
    after = __import__("json").loads((tmp_path / "results" / "quality_tiny.json").read_text(encoding="utf-8"))
    unit, before = after["units"]["seed0"], results["units"]["seed0"]
    assert unit["int8"]["retimed"] is True and unit["int8"]["tile_ms"] > 0
    assert unit["int8"]["guard_passed"] == before["int8"]["guard_passed"]
    assert {k: v for k, v in unit.items() if k != "int8"} == {k: v for k, v in before.items() if k != "int8"}
