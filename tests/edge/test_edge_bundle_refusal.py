"""The daemon refuses a bundle that does not match its manifest: one line, exit 2, no traceback.

Each fault gets its own message: a changed ONNX file, a changed manifest, a missing file,
a changed golden image, an invalid manifest field, an old format version, a wrong input
shape, and a graph that fails the golden self-test.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ganspect.edge.errors import BundleError
from ganspect.edge.manifest import manifest_digest
from ganspect.edge.scorer import Scorer


def _tamper_byte(bundle: Path) -> str:
    model = bundle / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    return "does not match its manifest (SHA-256"


def _delete_model(bundle: Path) -> str:
    (bundle / "model.onnx").unlink()
    return "is missing model.onnx named in its manifest"


def _reseal(bundle: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit the manifest and recompute its content digest, as a foreign tool writing a manifest would."""
    raw = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    edit(raw)
    raw["content_sha256"] = manifest_digest(raw)
    (bundle / "manifest.json").write_text(json.dumps(raw), encoding="utf-8")


def _invalid_field(bundle: Path) -> str:
    _reseal(bundle, lambda raw: raw["input"].update(colour_order="RGB"))
    return "is not a valid manifest: input.colour_order"


def _edited_threshold(bundle: Path) -> str:
    # Someone "tunes" the threshold by hand: valid JSON, valid manifest, but not what was exported.
    raw = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    raw["files"][0]["threshold"] = 0.5
    (bundle / "manifest.json").write_text(json.dumps(raw, indent=2), encoding="utf-8")
    return "manifest.json was changed after export (its content no longer matches content_sha256)"


def _delete_golden(bundle: Path) -> str:
    (bundle / "golden" / "1_ng.png").unlink()
    return "is missing golden/1_ng.png named in its manifest"


def _changed_golden(bundle: Path) -> str:
    import cv2

    path = bundle / "golden" / "0_ok.png"
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    image[0, 0] ^= 1
    cv2.imwrite(str(path), image)
    return "0_ok.png does not match its manifest (SHA-256"


def _old_format(bundle: Path) -> str:
    _reseal(bundle, lambda raw: raw.update(format_version=1))
    return "has format_version 1; this ganspect reads format_version 2: re-export"


def _golden_mismatch(bundle: Path) -> str:
    # A graph that scores differently on this machine cannot be produced on demand with real
    # onnxruntime, so the recorded expectation is moved instead (and the manifest resealed).
    def edit(raw: dict[str, Any]) -> None:
        raw["files"][0]["golden"]["scores"][1] += 0.01

    _reseal(bundle, edit)
    return "fails its golden self-test: score"


def _threshold(value: float) -> Callable[[Path], str]:
    # A threshold "tuned" in the manifest by someone who recomputes content_sha256 (anyone can): 1e30 makes every
    # part OK, -1 every part NG. The bundle's own golden images contradict it.
    def tamper(bundle: Path) -> str:
        _reseal(bundle, lambda raw: raw["files"][0].update(threshold=value))
        return (
            "judges the golden image golden/1_ng.png (tests/conftest.py part_image, score 0.283896) OK, not NG"
            if value > 0
            else "judges the golden image golden/0_ok.png (tests/conftest.py part_image, score 0.00566023) NG, not OK"
        )

    return tamper


def _nan_threshold(bundle: Path) -> str:
    raw = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    raw["files"][0]["threshold"] = float("nan")  # json writes NaN, which Python's json reads back
    (bundle / "manifest.json").write_text(json.dumps(raw), encoding="utf-8")
    return "is not a valid manifest: files.0.threshold: Input should be a finite number"


def _metrics_disagree(bundle: Path) -> str:
    _reseal(bundle, lambda raw: raw["metrics"].update(threshold=0.25, image_auroc=1.0))
    return "metrics.threshold 0.25 (what the run was evaluated at) disagrees with files[0].threshold 0.15"


def _verdict_flips_within_tolerance(bundle: Path) -> str:
    # A score that this machine computes within the golden tolerance yet on the other side of the threshold
    # cannot be produced on demand with real onnxruntime: the threshold and the recorded score are placed around
    # the measured score instead (the manifest resealed). Measured 0.2838963, recorded 0.2839163, threshold
    # 0.2839063: the recorded score says NG and lies within tolerance, the measured one says OK.
    def edit(raw: dict[str, Any]) -> None:
        measured = raw["files"][0]["golden"]["scores"][1]
        raw["files"][0]["golden"]["scores"][1] = measured + 2e-5
        raw["files"][0]["threshold"] = measured + 1e-5

    _reseal(bundle, edit)
    return "fails its golden self-test: golden/1_ng.png (tests/conftest.py part_image) scores 0.283896 here, judged OK"


TAMPERINGS: dict[str, Callable[[Path], str]] = {
    "changed byte": _tamper_byte,
    "missing model file": _delete_model,
    "invalid manifest field": _invalid_field,
    "edited manifest": _edited_threshold,
    "missing golden image": _delete_golden,
    "changed golden image": _changed_golden,
    "old format version": _old_format,
    "golden self-test fails": _golden_mismatch,
    "threshold 1e30": _threshold(1e30),
    "threshold -1": _threshold(-1.0),
    "threshold NaN": _nan_threshold,
    "metrics.threshold disagrees": _metrics_disagree,
    "golden verdict flips within tolerance": _verdict_flips_within_tolerance,
}


@pytest.mark.parametrize("how", list(TAMPERINGS))
def test_damaged_bundle_is_refused_by_the_daemon(how, tiny_bundle, tiny_video, make_edge_config, ganspect_cli):
    Scorer.load(tiny_bundle)  # intact, it loads and passes its self-test
    words = TAMPERINGS[how](tiny_bundle)
    with pytest.raises(BundleError) as refused:
        Scorer.load(tiny_bundle)
    assert words in str(refused.value) and "\n" not in str(refused.value)
    config = make_edge_config(tiny_bundle, tiny_video.path, None)
    proc = ganspect_cli("edge", "--config", str(config), "--headless")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ganspect edge: error:")]
    assert len(errors) == 1, proc.stderr
    assert words in errors[0]
    assert proc.stdout == ""  # no verdict, no summary


def test_manifest_shape_disagreeing_with_graph_is_refused(
    tmp_path, make_bundle, tiny_video, make_edge_config, ganspect_cli
):
    # The manifest says 32x32 grey; the graph (hash valid) takes 24x24 grey.
    bundle = make_bundle(tmp_path / "bundle", height=32, width=32, graph_shape=(24, 24, 1))
    with pytest.raises(BundleError, match=r"has shape \['N', 24, 24, 1\]; the manifest says \(N, 32, 32, 1\)"):
        Scorer.load(bundle)
    config = make_edge_config(bundle, tiny_video.path, None)
    proc = ganspect_cli("edge", "--config", str(config), "--headless")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "the manifest does not belong to this model" in proc.stderr


def test_channel_count_mismatch_is_refused(tmp_path, make_bundle):
    # Manifest BGR (3 channels), graph grey (1 channel).
    bundle = make_bundle(tmp_path / "bundle", colour_order="BGR", graph_shape=(32, 32, 1))
    with pytest.raises(BundleError, match="the manifest does not belong to this model"):
        Scorer.load(bundle)


def test_file_that_is_not_onnx_is_refused(tmp_path, make_bundle):
    from ganspect.edge.manifest import Manifest, describe_file, write_manifest

    bundle = make_bundle(tmp_path / "bundle")
    (bundle / "model.onnx").write_bytes(b"\x00not an onnx model at all")
    manifest = Manifest.model_validate_json((bundle / "manifest.json").read_text(encoding="utf-8"))
    old = manifest.files[0]
    write_manifest(
        bundle,
        manifest.model_copy(update={"files": [describe_file(bundle, "model.onnx", "fp32", old.threshold, old.golden)]}),
    )
    with pytest.raises(BundleError, match="is not a model onnxruntime can load"):
        Scorer.load(bundle)


def test_requested_precision_missing_is_refused(tiny_bundle):
    with pytest.raises(BundleError, match="bundle has no int8 model"):
        Scorer.load(tiny_bundle, precision="int8")


def test_a_manifest_key_with_a_newline_stays_one_line(tiny_bundle):
    # Found by tests/fuzz: the key is quoted instead of breaking the message in two.
    import json

    from ganspect.edge.errors import BundleError
    from ganspect.edge.manifest import load_bundle

    path = tiny_bundle / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["outputs"]["\n"] = None
    path.write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(BundleError) as err:
        load_bundle(tiny_bundle)
    assert "\n" not in str(err.value) and "outputs.'\\n': Extra inputs are not permitted" in str(err.value)


def test_a_single_threshold_value_in_the_manifest_is_refused_naming_the_key(tiny_bundle):
    # Each file has its own threshold; a `threshold.value` beside them (format 1's, or a running threshold
    # written back) would be a second one that the edge does not judge by.
    from ganspect.edge.manifest import load_bundle

    _reseal(tiny_bundle, lambda raw: raw["threshold"].update(value=0.5))
    with pytest.raises(BundleError, match=r"is not a valid manifest: threshold\.value: Extra inputs are not permitted"):
        load_bundle(tiny_bundle)


@pytest.mark.parametrize("value", [1e30, -1.0])
def test_install_model_refuses_a_threshold_the_golden_images_contradict(
    value, tmp_path, make_bundle, tiny_video, make_edge_config, ganspect_cli
):
    # The audit's case: files[0].threshold edited, content_sha256 recomputed; install-model said "verified".
    bundle = make_bundle(tmp_path / "export")
    _threshold(value)(bundle)
    config = make_edge_config(tmp_path / "models" / "current", tiny_video.path, None)
    proc = ganspect_cli("edge", "install-model", str(bundle), "--config", str(config))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ganspect edge: error:")]
    assert len(errors) == 1 and "the threshold does not belong to this model" in errors[0], proc.stderr
    assert "verified" not in proc.stdout
    assert not (tmp_path / "models" / "current").exists()
