"""Synthetic parts: determinism, MVTec layout, exact masks, conveyor video through real OpenCV."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from ganspect.edge.errors import GanspectError
from ganspect.train.synth import (
    DEFECT_KINDS,
    MASK_THRESHOLD_LEVELS,
    read_conveyor_truth,
    render_conveyor_frame,
    render_pair,
    render_part,
    synthesize_dataset,
    truth_path,
    write_conveyor_video,
)

SMALL = dict(size=32, n_train=3, n_test_good=2, n_test_bad=8)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _channel_max_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1)


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    synthesize_dataset(tmp_path / "a", seed=7, **SMALL)
    synthesize_dataset(tmp_path / "b", seed=7, **SMALL)
    synthesize_dataset(tmp_path / "c", seed=8, **SMALL)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys()
    assert a["train/good/000.png"] != c["train/good/000.png"]


def test_layout_counts_shapes_and_masks(tmp_path: Path) -> None:
    summary = synthesize_dataset(tmp_path, seed=0, **SMALL)
    assert summary == {
        "train/good": 3,
        "test/good": 2,
        "test/scratch": 2,
        "test/dent": 2,
        "test/stain": 2,
        "test/missing_material": 2,
    }
    for folder, count in summary.items():
        pngs = sorted((tmp_path / folder).glob("*.png"))
        assert [p.name for p in pngs] == [f"{i:03d}.png" for i in range(count)]
        for png in pngs:
            image = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
            assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    for kind in DEFECT_KINDS:
        for i in range(2):
            mask = cv2.imread(str(tmp_path / "ground_truth" / kind / f"{i:03d}_mask.png"), cv2.IMREAD_UNCHANGED)
            assert mask.shape == (32, 32)
            assert set(np.unique(mask)) == {0, 255}, f"{kind} {i}: mask must be binary and non-empty"
    assert not (tmp_path / "ground_truth" / "good").exists()


def test_rewrite_replaces_an_earlier_data_set_but_keeps_other_files(tmp_path: Path) -> None:
    synthesize_dataset(tmp_path, seed=0, **SMALL)
    (tmp_path / "notes.txt").write_text("keep me")
    synthesize_dataset(tmp_path, seed=0, size=32, n_train=2, n_test_good=1, n_test_bad=1)
    assert len(list((tmp_path / "train" / "good").iterdir())) == 2
    assert sorted(d.name for d in (tmp_path / "test").iterdir()) == ["good", "scratch"]
    assert sorted(d.name for d in (tmp_path / "ground_truth").iterdir()) == ["scratch"]
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(size=16, n_train=1, n_test_good=0, n_test_bad=0), "at least 32"),
        (dict(size=32, n_train=-1, n_test_good=0, n_test_bad=0), "n_train"),
        (dict(size=32, n_train=1, n_test_good=-2, n_test_bad=0), "n_test_good"),
        (dict(size=32, n_train=1, n_test_good=0, n_test_bad=-3), "n_test_bad"),
        (dict(size=32, n_train=0, n_test_good=1, n_test_bad=1), "n_train"),
        (dict(size=32, n_train=1, n_test_good=0, n_test_bad=0, seed=-1), "seed"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(GanspectError, match=message):
        synthesize_dataset(tmp_path / "out", **{"seed": 0, **kwargs})
    assert not (tmp_path / "out").exists()


def test_good_part_has_no_mask_and_no_difference() -> None:
    part = render_pair(np.random.default_rng(1), None, 256, 64)
    assert part.image.shape == (64, 64, 3)
    assert np.array_equal(part.image, part.clean)
    assert not part.mask.any()


def test_good_parts_vary_modestly() -> None:
    """Pose, light and noise differ from part to part, but the scene stays the same."""
    parts = np.stack([render_pair(np.random.default_rng(i), None, 256, 64).image for i in range(6)]).astype(float)
    spread = np.abs(parts - parts.mean(axis=0)).mean()  # grey levels a part differs from the average part
    scene_contrast = parts.std(axis=(1, 2, 3)).min()  # grey levels between washer, hole and belt
    assert spread > 2.0  # more than sensor noise: pose and light change too
    assert spread < 0.3 * scene_contrast  # but far less than the scene's own contrast
    assert not np.array_equal(parts[0], parts[1])


@pytest.mark.parametrize("kind", DEFECT_KINDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_agrees_with_the_visible_change(kind: str, seed: int) -> None:
    part = render_pair(np.random.default_rng([seed, 99]), kind, 256, 64)
    inside = part.mask > 0
    assert set(np.unique(part.mask)) == {0, 255}
    diff = _channel_max_diff(part.image, part.clean)
    # Outside the mask the two renderings differ by less than the threshold (plus rounding).
    assert diff[~inside].max() <= MASK_THRESHOLD_LEVELS + 1
    # ... and almost all of them not at all: the same sensor noise lies on both.
    assert (diff[~inside] > 0).mean() < 0.02
    # Inside it, the defect is what a person would flag: most pixels changed, and by a lot.
    assert (diff[inside] >= MASK_THRESHOLD_LEVELS).mean() > 0.8
    assert diff[inside].mean() > 15
    # About 1-8 % of the image at the model size (a few hundredths of a percent of slack).
    assert 0.005 < inside.mean() < 0.08


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defects_are_visible_in_grayscale(kind: str) -> None:
    part = render_pair(np.random.default_rng(3), kind, 256, 64)
    gray, clean = (cv2.cvtColor(im, cv2.COLOR_BGR2GRAY).astype(float) for im in (part.image, part.clean))
    assert np.abs(gray - clean)[part.mask > 0].mean() > 10


def test_render_part_returns_the_camera_frame_and_its_mask() -> None:
    image, mask = render_part(np.random.default_rng(4), "stain", 128)
    again = render_pair(np.random.default_rng(4), "stain", 128)
    assert image.shape == (128, 128, 3) and mask.shape == (128, 128)
    assert np.array_equal(image, again.image) and np.array_equal(mask, again.mask)
    with pytest.raises(GanspectError, match="unknown defect"):
        render_part(np.random.default_rng(4), "crack", 128)


def test_dataset_images_are_camera_frames_reduced_with_inter_area() -> None:
    part = render_pair(np.random.default_rng(5), "dent", 256, 64)
    full = render_pair(np.random.default_rng(5), "dent", 256)
    assert np.array_equal(part.image, cv2.resize(full.image, (64, 64), interpolation=cv2.INTER_AREA))


def _read_video(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened()
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def test_conveyor_video_round_trips_losslessly(tmp_path: Path) -> None:
    video = tmp_path / "line" / "conveyor.avi"
    parts = write_conveyor_video(video, n_parts=6, defect_rate=0.5, seed=3, fps=4.0, frame_size=64)
    assert [p.part_id for p in parts] == [f"P{i:04d}" for i in range(1, 7)]
    assert [p.frame_index for p in parts] == list(range(6))
    defects = [p.defect for p in parts if p.defect is not None]
    assert len(defects) == 3 and set(defects) <= set(DEFECT_KINDS)

    frames = _read_video(video)
    assert len(frames) == 6
    capture = cv2.VideoCapture(str(video))
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(4.0)
    capture.release()
    for part, frame in zip(parts, frames):
        assert np.array_equal(frame, render_conveyor_frame(part, 3, 64)), part
    # Each part has its own pose and light: no two frames alike.
    assert not np.array_equal(frames[0], frames[1])


def test_conveyor_truth_sidecar_round_trips(tmp_path: Path) -> None:
    video = tmp_path / "conveyor.avi"
    parts = write_conveyor_video(video, n_parts=4, defect_rate=0.25, seed=1, frame_size=32)
    sidecar = truth_path(video)
    assert sidecar == tmp_path / "conveyor.avi.truth.json"
    assert read_conveyor_truth(video) == parts
    assert read_conveyor_truth(sidecar) == parts
    doc = json.loads(sidecar.read_text())
    assert doc["parts"][0] == {"part_id": "P0001", "frame_index": 0, "defect": parts[0].defect}
    assert sum(p.defect is not None for p in parts) == 1


def test_conveyor_video_is_deterministic(tmp_path: Path) -> None:
    a = write_conveyor_video(tmp_path / "a.avi", 3, 0.34, seed=2, frame_size=32)
    b = write_conveyor_video(tmp_path / "b.avi", 3, 0.34, seed=2, frame_size=32)
    assert a == b
    for fa, fb in zip(_read_video(tmp_path / "a.avi"), _read_video(tmp_path / "b.avi")):
        assert np.array_equal(fa, fb)


def test_conveyor_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(GanspectError, match=r"\.avi"):
        write_conveyor_video(tmp_path / "c.mp4", 2, 0.5, seed=0, frame_size=32)
    with pytest.raises(GanspectError, match="defect_rate"):
        write_conveyor_video(tmp_path / "c.avi", 2, 1.5, seed=0, frame_size=32)
    with pytest.raises(GanspectError, match="n_parts"):
        write_conveyor_video(tmp_path / "c.avi", 0, 0.5, seed=0, frame_size=32)
    with pytest.raises(GanspectError, match="no ground-truth file"):
        read_conveyor_truth(tmp_path / "missing.avi")
    (tmp_path / "bad.avi.truth.json").write_text('{"parts": [{"part_id": "P1"}]}')
    with pytest.raises(GanspectError, match="not valid"):
        read_conveyor_truth(tmp_path / "bad.avi")
