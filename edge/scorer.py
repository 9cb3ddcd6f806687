"""The bundle's ONNX graph under onnxruntime: `run_batch` is the one `session.run` the inspector makes per frame.

`Scorer.load` verifies the bundle (hashes, manifest) through `ganspect.edge.manifest`,
opens the chosen file on the CPU, checks that the graph's input and outputs are the
ones the manifest promises, warms the session up once, and runs the golden self-test:
the bundle's golden images must score what they scored at export, within the file's
stated tolerance. So the first real frame is not slow, and a wrong graph, or one that
computes differently on this machine, is refused before the line starts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from ganspect.edge.common import first_line
from ganspect.edge.errors import BundleError
from ganspect.edge.golden import read_golden_image
from ganspect.edge.manifest import Bundle, Manifest, ModelFile, load_bundle
from ganspect.edge.verdict import ResultState, judge

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Score:
    score: float
    threshold: float  # the one the frame is judged by: the bundle's, or an operator's override
    heatmap: np.ndarray  # (H, W) float32, model pixels (resize) or ROI pixels (tiles); 1.0 = largest normal residual
    peak_x: int  # column of the heatmap maximum, in the heatmap's pixels
    peak_y: int  # row of the heatmap maximum
    peak_value: float
    preprocess_ms: float
    inference_ms: float

    @property
    def result(self) -> ResultState:
        """As the verdict judges it (`verdict.judge`): a NaN score is UNDEFINED, never OK."""
        return judge(self.score, self.threshold).state


def _dim_matches(actual: int | str | None, expected: int) -> bool:
    # Symbolic or unknown dimensions cannot be checked here; the warm-up run checks them.
    return not isinstance(actual, int) or actual == expected


class Scorer:
    """Scores BGR frames with a verified bundle."""

    def __init__(self, bundle: Bundle, model_file: ModelFile, session: ort.InferenceSession) -> None:
        self.bundle = bundle
        self.manifest: Manifest = bundle.manifest
        self.model_file = model_file
        self._session = session
        outputs = self.manifest.outputs
        self._outputs = [outputs.score, outputs.heatmap, outputs.peak]

    @property
    def threshold(self) -> float:
        """The bundle's threshold for the file that runs (INT8 is calibrated on its own scores).

        An operator's override is not the model's: LiveModel holds it and hands the threshold in force
        to each inspection.
        """
        return self.model_file.threshold

    @classmethod
    def load(
        cls,
        root: str | Path,
        precision: Literal["auto", "fp32", "int8"] = "auto",
        intra_op_threads: int = 0,
        trusted_keys: Sequence[Path] = (),
    ) -> Scorer:
        """Verify the bundle (signed by one of `trusted_keys` when there are any) and open the chosen file."""
        bundle = load_bundle(root, trusted_keys)
        model_file = bundle.manifest.model_file(None if precision == "auto" else precision)
        path = bundle.path_of(model_file)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1  # one frame at a time: no parallel branches worth a thread
        # Idle inference threads sleep instead of spinning: on a small PC a spinning thread
        # takes the core that the capture thread needs to decode the next frame.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # onnxruntime warnings would drown the daemon's own log
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise BundleError(f"{path} is not a model onnxruntime can load: {first_line(exc)}") from exc
        scorer = cls(bundle, model_file, session)
        scorer._check_interface(path)
        scorer._warm_up(path)
        scorer._self_test(path)
        log.info(
            "model %s (%s, %s) loaded from %s; threshold %.4g; golden self-test passed on %d images",
            scorer.manifest.name,
            scorer.manifest.kind,
            model_file.precision,
            path,
            scorer.threshold,
            len(scorer.manifest.golden),
        )
        return scorer

    def _check_interface(self, path: Path) -> None:
        spec = self.manifest.input
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != spec.name:
            names = ", ".join(i.name for i in inputs)
            raise BundleError(f"{path} has input(s) [{names}], the manifest expects one input named {spec.name!r}")
        graph_input = inputs[0]
        if graph_input.type != "tensor(uint8)":
            raise BundleError(f"{path} input {spec.name!r} is {graph_input.type}; the contract is tensor(uint8)")
        expected = (spec.height, spec.width, spec.channels)
        shape = list(graph_input.shape)
        if len(shape) != 4 or not all(_dim_matches(a, e) for a, e in zip(shape[1:], expected)):
            raise BundleError(
                f"{path} input {spec.name!r} has shape {shape}; the manifest says (N, {spec.height}, "
                f"{spec.width}, {spec.channels}) (N, H, W, C): the manifest does not belong to this model"
            )
        outputs = {o.name for o in self._session.get_outputs()}
        missing = [name for name in self._outputs if name not in outputs]
        if missing:
            raise BundleError(
                f"{path} lacks output(s) {', '.join(missing)} named in the manifest "
                f"(it has: {', '.join(sorted(outputs))})"
            )

    def _warm_up(self, path: Path) -> None:
        spec = self.manifest.input
        blank = np.zeros((1, spec.height, spec.width, spec.channels), np.uint8)
        try:
            score, heatmap, peak = self._session.run(self._outputs, {spec.name: blank})
        except Exception as exc:
            raise BundleError(f"{path} fails on a blank {spec.height}x{spec.width} image: {first_line(exc)}") from exc
        if np.shape(score) != (1,) or np.shape(heatmap) != (1, spec.height, spec.width) or np.shape(peak) != (1, 2):
            raise BundleError(
                f"{path} returned score {np.shape(score)}, heatmap {np.shape(heatmap)} and peak {np.shape(peak)}; "
                f"the contract is (1,), (1, {spec.height}, {spec.width}) and (1, 2) for one image"
            )

    def _self_test(self, path: Path) -> None:
        """Score each golden image (batch 1, as on the line) and compare with what the exporter recorded."""
        expected = self.model_file.golden
        spec = self.manifest.input
        for i, golden in enumerate(self.manifest.golden):
            image = read_golden_image(self.bundle.root / golden.path, spec)
            score, heatmap, _ = self._session.run(self._outputs, {spec.name: image[None]})
            checks = (
                ("score", float(score[0]), expected.scores[i]),
                ("heatmap peak", float(np.max(heatmap[0])), expected.heatmap_peaks[i]),
            )
            for what, actual, wanted in checks:
                # Written so that NaN fails too.
                if not abs(actual - wanted) <= expected.allowed(wanted):
                    raise BundleError(
                        f"{path} fails its golden self-test: {what} {actual:.6g} on {golden.path}, expected "
                        f"{wanted:.6g} ± {expected.allowed(wanted):.2g} ({self.model_file.precision}); this machine "
                        "does not compute what the export machine did, so the model is not used"
                    )
            # Scores within tolerance can still fall on the other side of the threshold: the verdict is what counts.
            verdict = judge(float(score[0]), self.threshold).state
            if golden.expect is not None and verdict != golden.expect:
                raise BundleError(
                    f"{path} fails its golden self-test: {golden.path} ({golden.origin}) scores {float(score[0]):.6g} "
                    f"here, judged {verdict} by the threshold {self.threshold:.6g} instead of "
                    f"{golden.expect}; so the model is not used"
                )

    def run_batch(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N, H, W, C) uint8 model inputs -> scores (N,) and heatmaps (N, H, W) float32, and the heatmaps'
        peaks (N, 2) int64 (row, column), in one session.run."""
        score, heatmap, peak = self._session.run(self._outputs, {self.manifest.input.name: batch})
        return np.asarray(score, np.float32), np.asarray(heatmap, np.float32), np.asarray(peak, np.int64)
